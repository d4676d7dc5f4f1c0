"""Our paged-KV Llama-family model against Hugging Face transformers (eager attention, float32).

Every scenario (batched prefill, chunked prefill, decode, mixed batches, prefix-cache hits) must reproduce
HF's full-sequence logits at every computed position to 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from hetserve.core.model_config import ModelConfig
from hetserve.engine.attention import AttentionMetadata, get_attention_backend
from hetserve.engine.model.llama import LlamaForCausalLM
from hetserve.engine.model.loader import load_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-4

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-llama3-gqa": ("llama", {}),
    "llama-ropescaling-spelling-mha": ("llama", {"rope_style": "rope_scaling", "num_kv_heads": 4}),
    "llama-linear": ("llama", {"rope_style": "rope_scaling", "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "llama-yarn-tied": (
        "llama",
        {
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
            "tie_word_embeddings": True,
        },
    ),
    "qwen2-bias-tied": ("qwen2", {}),
    "qwen2-sliding6": ("qwen2", {"sliding_window": 6, "rope_style": "rope_scaling", "tie_word_embeddings": False}),
    "qwen3-qknorm-headdim32": ("qwen3", {"head_dim": 32}),
    "mistral": ("mistral", {}),
    "mistral-sliding8-mqa": ("mistral", {"sliding_window": 8, "num_kv_heads": 1}),
}


@dataclass
class PagedCache:
    """A hand-rolled block manager: per-sequence block tables over shuffled free blocks, and metadata builder."""

    cfg: ModelConfig
    block_size: int
    num_blocks: int = 96
    seed: int = 0
    kv_caches: list[torch.Tensor] = field(init=False)
    free: list[int] = field(init=False)
    tables: dict[str, list[int]] = field(default_factory=dict)
    num_computed: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (2, self.num_blocks, self.block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)
        # NaN-filled so any read of a slot that was never written poisons the output
        self.kv_caches = [torch.full(shape, float("nan")) for _ in range(self.cfg.num_hidden_layers)]
        order = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(self.seed))
        self.free = order.tolist()

    def share_prefix(self, seq: str, source: str, num_blocks: int) -> None:
        """Prefix-cache hit: ``seq`` starts with ``source``'s first full blocks, already computed."""
        self.tables[seq] = list(self.tables[source][:num_blocks])
        self.num_computed[seq] = num_blocks * self.block_size

    def build(self, chunks: list[tuple[str, list[int]]]) -> tuple[torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        rows: list[list[int]] = []
        for seq, new_ids in chunks:
            start = self.num_computed.setdefault(seq, 0)
            table = self.tables.setdefault(seq, [])
            end = start + len(new_ids)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for p in range(start, end):
                positions.append(p)
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
            ids += new_ids
            starts.append(len(ids))
            seq_lens.append(end)
            rows.append(table)
            self.num_computed[seq] = end
        width = max(len(r) for r in rows)
        meta = AttentionMetadata(
            num_tokens=len(ids),
            num_seqs=len(chunks),
            positions=torch.tensor(positions, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32),
            max_query_len=max(len(c[1]) for c in chunks),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
        )
        return torch.tensor(ids, dtype=torch.int64), meta


@dataclass
class Pair:
    ours: LlamaForCausalLM
    cfg: ModelConfig
    hf: Any

    def step(self, cache: PagedCache, chunks: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Run one step; returns each chunk's logits ``[len(chunk), vocab]``."""
        ids, meta = cache.build(chunks)
        backend = get_attention_backend("torch_ref", "cpu")
        with torch.no_grad():
            logits = self.ours.compute_logits(self.ours(ids, meta.positions, cache.kv_caches, meta, backend))
        return [logits[a:b] for a, b in zip(meta.query_start_loc_cpu[:-1], meta.query_start_loc_cpu[1:], strict=True)]

    def reference(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request: pytest.FixtureRequest, tiny_model_factory: Any) -> Pair:
    arch, kwargs = CASES[request.param]
    model_dir: Path = tiny_model_factory(arch, **kwargs)
    ours, cfg = load_model(model_dir, "cpu", torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return Pair(ours, cfg, hf)


def prompt(length: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    err = (ours - ref).abs().max().item()
    assert err <= ATOL, f"{what}: max abs diff {err:.3g} > {ATOL}"


@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_prefill(pair: Pair, block_size: int) -> None:
    prompts = {f"s{i}": prompt(n, seed=i, vocab=pair.cfg.vocab_size) for i, n in enumerate([1, 5, 13, 30])}
    cache = PagedCache(pair.cfg, block_size)
    outs = pair.step(cache, list(prompts.items()))
    for (name, ids), out in zip(prompts.items(), outs, strict=True):
        assert_close(out, pair.reference(ids), f"prefill {name} len {len(ids)}")


def test_chunked_prefill(pair: Pair) -> None:
    """Two prompts advance 7 tokens per step in the same batch; the shorter one drops out when done."""
    prompts = {"a": prompt(40, seed=10, vocab=pair.cfg.vocab_size), "b": prompt(23, seed=11, vocab=pair.cfg.vocab_size)}
    refs = {name: pair.reference(ids) for name, ids in prompts.items()}
    cache = PagedCache(pair.cfg, block_size=4)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in prompts}
    for start in range(0, 40, 7):
        chunks = [(name, ids[start : start + 7]) for name, ids in prompts.items() if start < len(ids)]
        for (name, _), out in zip(chunks, pair.step(cache, chunks), strict=True):
            got[name].append(out)
    for name, ref in refs.items():
        full = torch.cat(got[name])
        assert_close(full, ref, f"chunked prefill {name} (all positions)")
        assert_close(full[-1], ref[-1], f"chunked prefill {name} (last token)")


def test_decode_steps(pair: Pair) -> None:
    """Prefill three prompts, then feed one token per sequence per step."""
    vocab = pair.cfg.vocab_size
    seqs = {f"d{i}": prompt(9 + 3 * i + 12, seed=20 + i, vocab=vocab) for i in range(3)}
    cache = PagedCache(pair.cfg, block_size=4)
    got = {name: list(pair.step(cache, [(name, ids[:-12])])) for name, ids in seqs.items()}
    for k in range(12, 0, -1):
        chunks = [(name, [ids[-k]]) for name, ids in seqs.items()]
        for (name, _), out in zip(chunks, pair.step(cache, chunks), strict=True):
            got[name].append(out)
    for name, ids in seqs.items():
        ref = pair.reference(ids)
        full = torch.cat(got[name])
        assert_close(full[-12:], ref[-12:], f"decode {name}")
        assert_close(full, ref, f"prefill+decode {name}")


def test_mixed_batches(pair: Pair) -> None:
    """Random per-step token budgets per sequence: decodes, partial prefills and first chunks in one batch."""
    vocab = pair.cfg.vocab_size
    rng = torch.Generator().manual_seed(5)
    seqs = {f"m{i}": prompt(int(n), seed=30 + i, vocab=vocab) for i, n in enumerate([3, 17, 29, 44])}
    done = dict.fromkeys(seqs, 0)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in seqs}
    cache = PagedCache(pair.cfg, block_size=4)
    while any(done[n] < len(ids) for n, ids in seqs.items()):
        chunks = []
        for name, ids in seqs.items():
            left = len(ids) - done[name]
            take = min(left, int(torch.randint(0, 9, (1,), generator=rng)))
            if take:
                chunks.append((name, ids[done[name] : done[name] + take]))
                done[name] += take
        if not chunks:
            continue
        for (name, _), out in zip(chunks, pair.step(cache, chunks), strict=True):
            got[name].append(out)
    for name, ids in seqs.items():
        assert_close(torch.cat(got[name]), pair.reference(ids), f"mixed {name}")


def test_prefix_cache_hit(pair: Pair) -> None:
    """A new sequence reuses another's first three full blocks (never rewritten) and computes only the rest."""
    vocab = pair.cfg.vocab_size
    first = prompt(22, seed=40, vocab=vocab)
    second = first[:12] + prompt(15, seed=41, vocab=vocab)
    cache = PagedCache(pair.cfg, block_size=4)
    pair.step(cache, [("first", first)])
    cache.share_prefix("second", "first", num_blocks=3)
    # the sharing sequence runs alongside a decode step of the original one
    extra = prompt(1, seed=42, vocab=vocab)
    out_second, out_first = pair.step(cache, [("second", second[12:]), ("first", extra)])
    assert_close(out_second, pair.reference(second)[12:], "prefix hit: suffix of the new sequence")
    assert_close(out_first, pair.reference(first + extra)[-1:], "prefix hit: owner's next token")
