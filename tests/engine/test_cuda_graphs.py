"""The GPU fast path: the fused forward (fused qkv/gate_up GEMMs, Triton norm/rotary/activation/attention) that
CUDA graphs capture, and the graphs themselves.

On CPU the fused path runs with the Triton kernels interpreted and must reproduce HF transformers' logits, so
CI covers the exact code a graph captures. The graph tests need CUDA (``gpu`` marker): replayed decode steps,
padding included, equal the eager forward, and greedy generation through the whole engine equals HF.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from hetserve.engine.attention import get_attention_backend
from hetserve.engine.cuda_graphs import CudaGraphRunner, graph_batch_sizes
from hetserve.engine.model.linears import ROLES
from hetserve.engine.model.loader import load_model
from hetserve.kernels import HAS_TRITON
from hetserve.kernels.skinny_gemm import SkinnyConfig
from tests.engine.test_model_vs_hf import PagedCache, assert_close, prompt

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(256) == [1, 2, 4, 8, *range(16, 257, 8)]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(3) == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("llama", {}), ("qwen3", {"head_dim": 32}), ("mistral", {"sliding_window": 8, "num_kv_heads": 1}),
     ("llama", {"skinny": True}), ("qwen2", {"skinny": True})],
    ids=["llama-gqa", "qwen3-qknorm", "mistral-window-mqa", "llama-skinny-linears", "qwen2-bias-skinny-linears"],
)
def test_fused_path_matches_hf(tiny_model_factory: Any, arch: str, kwargs: dict[str, Any]) -> None:
    """Prefill (one prompt in two chunks, the second over the cached first), then decode steps of a batch.
    ``skinny``: every linear role on the skinny Triton GEMM (interpreted) wherever a step has <= 16 rows."""
    kwargs = dict(kwargs)
    skinny = kwargs.pop("skinny", False)
    model_dir: Path = tiny_model_factory(arch, **kwargs)
    model, cfg = load_model(model_dir, "cpu", torch.float32)
    model.fused_path = True
    if skinny:
        model.linears.configs = dict.fromkeys(ROLES, SkinnyConfig(block_n=16, block_k=32))
        model.linears.on_cpu = True
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    backend = get_attention_backend("triton", "cpu")
    cache = PagedCache(cfg, block_size=4, num_blocks=40)
    seqs = {"a": prompt(14, seed=1, vocab=cfg.vocab_size), "b": prompt(7, seed=2, vocab=cfg.vocab_size)}
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    def step(chunks: list[tuple[str, list[int]]]) -> None:
        ids, meta = cache.build(chunks)
        with torch.no_grad():
            logits = model.compute_logits(model(ids, meta.positions, cache.kv_caches, meta, backend))
        qsl = meta.query_start_loc_cpu
        for i, (name, _) in enumerate(chunks):
            got[name].append(logits[qsl[i] : qsl[i + 1]])

    step([("a", seqs["a"][:7]), ("b", seqs["b"][:5])])
    step([("a", seqs["a"][7:12]), ("b", seqs["b"][5:6])])
    for i in range(2):
        step([("a", [seqs["a"][12 + i]]), ("b", [seqs["b"][6] if i == 0 else 5])])
    seqs["b"] = seqs["b"] + [5]
    for name, ids in seqs.items():
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert_close(torch.cat(got[name]), ref, f"fused path {name}")


class EagerGraphs(CudaGraphRunner):
    """The graph runner's static buffers and padding, with each "replay" run eagerly: on CPU this exercises the
    runner's whole graph path (staging, padding, bucket choice) without CUDA."""

    replays = 0

    def capture(self) -> None:
        self.graphs = dict.fromkeys(self.batch_sizes)  # type: ignore[arg-type]

    def replay(self, batch: int) -> torch.Tensor:
        self.replays += 1
        with torch.inference_mode():
            return self._run(batch)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_runner_graph_path_equals_hf_on_cpu(tiny_model_factory: Any) -> None:
    """Greedy generation through the engine with decode steps taken by the graph path (padded to buckets 1, 2,
    4, 8) and the fused model: the tokens equal HF's."""
    from hetserve import LLM, SamplingParams
    from tests.engine.test_engine_vs_hf import hf_greedy

    path = tiny_model_factory("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    rng = random.Random(4)
    prompts = [[rng.randrange(4, hf.config.vocab_size) for _ in range(n)] for n in (3, 13, 6)]
    num_new = [3, 5, 2]  # finishing at different steps walks the batch down through buckets 4, 2 and 1
    refs = [hf_greedy(hf, p, n)[0] for p, n in zip(prompts, num_new, strict=True)]
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=64, attention_backend="triton")
    runner = llm.engine.executor
    runner.model.fused_path = True
    graphs = EagerGraphs(runner.model, runner.kv_caches, runner.backend, runner.device, [1, 2, 4, 8],
                         runner.max_blocks_per_seq)
    graphs.capture()
    runner.graphs = graphs
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in num_new]
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == refs
    assert graphs.replays == 4  # every decode step: 3 seqs (bucket 4, one padding sequence), 2, 1, 1


# ---- CUDA ---------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.gpu
def test_replay_with_padding_equals_eager(tiny_model_factory: Any) -> None:
    model_dir = tiny_model_factory("llama")
    model, cfg = load_model(model_dir, "cuda", torch.float32)
    backend = get_attention_backend("auto", "cuda")
    assert backend.name == "triton"
    block = 4
    caches = [torch.zeros(2, 64, block, cfg.num_key_value_heads, cfg.head_dim, device="cuda")
              for _ in range(cfg.num_hidden_layers)]
    graphs = CudaGraphRunner(model, caches, backend, torch.device("cuda"), [1, 2, 4, 8], max_blocks_per_seq=16)
    graphs.capture()
    # three sequences with 9, 14 and 3 cached tokens decode one token each: bucket 4, one padding sequence
    rng = random.Random(0)
    lens = [9, 14, 3]
    tables = [[1 + 10 * s + b for b in range(6)] for s in range(3)]
    for layer_cache in caches:
        layer_cache.normal_()
    ids = [rng.randrange(cfg.vocab_size) for _ in lens]
    slots = [tables[s][lens[s] // block] * block + lens[s] % block for s in range(3)]
    graphs.ids_pos_slots[0, :4] = torch.tensor(ids + [0])
    graphs.ids_pos_slots[1, :4] = torch.tensor(lens + [0])
    graphs.ids_pos_slots[2, :4] = torch.tensor(slots + [-1])
    mb = graphs.max_batch
    graphs.qsl_seq_lens[:5] = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)
    graphs.qsl_seq_lens[mb + 1 : mb + 5] = torch.tensor([n + 1 for n in lens] + [0], dtype=torch.int32)
    graphs.block_tables[:3, :6] = torch.tensor(tables, dtype=torch.int32)
    before = [c.clone() for c in caches]
    replayed = graphs.replay(4)[:3].clone()
    after_replay = [c.clone() for c in caches]
    for c, b in zip(caches, before, strict=True):
        c.copy_(b)
    meta = graphs.metadata(3)
    meta.query_start_loc = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device="cuda")
    meta.seq_lens = torch.tensor([n + 1 for n in lens], dtype=torch.int32, device="cuda")
    with torch.inference_mode():
        eager = model(graphs.input_ids(3).clone(), graphs.positions(3).clone(), caches, meta, backend)
    assert torch.allclose(replayed, eager, atol=1e-4, rtol=1e-4)
    for c, r in zip(caches, after_replay, strict=True):
        # equal up to the rounding of split-KV counts (bucket 4 vs 3 sequences); a stray padding write is O(1)
        assert torch.allclose(c, r, atol=1e-4), "the padding token wrote K/V, or the graph wrote elsewhere"


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_engine_greedy_on_gpu_equals_hf(tiny_model_factory: Any, enforce_eager: bool) -> None:
    from hetserve import LLM, SamplingParams
    from tests.engine.test_engine_vs_hf import _prompts, hf_greedy

    path = tiny_model_factory("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    prompts = _prompts(hf.config.vocab_size, seed=9)
    refs = [hf_greedy(hf, p, 24)[0] for p in prompts]
    llm = LLM(str(path), device="cuda", dtype="float32", max_model_len=128, num_blocks=256,
              enforce_eager=enforce_eager, cuda_graph_max_batch=8)
    runner = llm.engine.executor
    assert (runner.graphs is None) == enforce_eager
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
