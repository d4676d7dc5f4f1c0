"""The model runner: owns the model, the KV tensors and per-request device state; executes one step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetserve.core.config import EngineConfig
from hetserve.core.interfaces import Executor
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.engine.attention import AttentionMetadata, get_attention_backend
from hetserve.engine.model.loader import load_model
from hetserve.engine.sampling.sampler import Sampler, SamplingState

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return _DTYPES[name]


def seeded_noise_seed(seed: int, position: int) -> int:
    """Seed of a seeded request's draw at one output position: the draw depends on (seed, position) only,
    so it is the same whatever the batch, the chunking or a preemption in between."""
    return (seed * 1_000_003 + position * 7_919 + 0x9E3779B9) % (2**63 - 1)


@dataclass
class _ReqState:
    sampling: SamplingState
    block_ids: list[int] = field(default_factory=list)


class ModelRunner(Executor):
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None,
                 model_config: ModelConfig | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device.device)
        self.dtype = resolve_dtype(config.device.dtype, self.device)
        if model is None:
            model, model_config = load_model(Path(config.model), self.device, self.dtype)
        assert model_config is not None
        self.model = model.eval()
        self.model_config = model_config
        self.block_size = config.cache.block_size
        self.backend = get_attention_backend(config.device.attention_backend, self.device)
        self._num_blocks = self._decide_num_blocks()
        mc = model_config
        self.kv_caches = [
            torch.zeros(2, self._num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim,
                        dtype=self.dtype, device=self.device)
            for _ in range(mc.num_hidden_layers)
        ]
        self.sampler = Sampler(mc.vocab_size, self.device)
        self.states: dict[str, _ReqState] = {}
        self._unseeded_gen = torch.Generator(device=self.device)
        self._unseeded_gen.manual_seed(config.device.seed)

    # ---- sizing -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        elt = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads * mc.head_dim * elt

    def _decide_num_blocks(self) -> int:
        if self.config.cache.num_blocks is not None:
            return self.config.cache.num_blocks
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.cache.gpu_memory_utilization - used
            # activations of the largest step, measured on a dummy batch would be better; a margin here
            budget -= 2 * 2**30
            return max(2, int(budget // per_block))
        return max(2, self.config.cache.cpu_kv_cache_bytes // per_block)

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    # ---- the step ---------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.states.pop(rid, None)
        for s in so.scheduled:
            if s.new is not None:
                sp = s.new.sampling_params
                gen = None
                if sp.seed is not None:
                    gen = torch.Generator(device=self.device)
                self.states[s.req_id] = _ReqState(
                    sampling=SamplingState(
                        params=sp,
                        prompt_token_ids=list(s.new.prompt_token_ids),
                        output_token_ids=list(s.new.output_token_ids),
                        eos_token_ids=frozenset(s.new.eos_token_ids),
                        generator=gen,
                    ),
                    block_ids=list(s.new_block_ids),
                )
            else:
                self.states[s.req_id].block_ids.extend(s.new_block_ids)

    def _prepare(self, so: SchedulerOutput) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for s in so.scheduled:
            table = self.states[s.req_id].block_ids
            start, n = s.num_computed_tokens, s.num_tokens
            input_ids.extend(s.token_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if s.sample:
                sample_rows.append(qsl[-1] - 1)
        width = max(len(t) for t in tables)
        dev = self.device
        block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        meta = AttentionMetadata(
            num_tokens=len(input_ids),
            num_seqs=len(tables),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=block_tables.to(dev),
            max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(tables))),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return torch.tensor(input_ids, dtype=torch.int64, device=dev), meta, sample_rows

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        req_ids = [s.req_id for s in so.scheduled]
        sampled: list[list[int]] = [[] for _ in so.scheduled]
        if not so.scheduled:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        input_ids, meta, sample_rows = self._prepare(so)
        hidden = self.model(input_ids, meta.positions, self.kv_caches, meta, self.backend)
        sample_reqs = [i for i, s in enumerate(so.scheduled) if s.sample]
        logprobs_out = None
        if sample_reqs:
            logits = self.model.compute_logits(hidden[sample_rows])
            states = []
            for i in sample_reqs:
                st = self.states[so.scheduled[i].req_id].sampling
                if st.generator is not None and st.params.seed is not None:
                    st.generator.manual_seed(seeded_noise_seed(st.params.seed, len(st.output_token_ids)))
                states.append(st)
            out = self.sampler(logits, states)
            want_lp = any(st.params.logprobs is not None for st in states)
            if want_lp:
                logprobs_out = [None] * len(so.scheduled)
            for j, i in enumerate(sample_reqs):
                tok = out.token_ids[j]
                sampled[i] = [tok]
                states[j].output_token_ids.append(tok)
                if want_lp:
                    logprobs_out[i] = out.logprobs[j]
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, logprobs=logprobs_out)
