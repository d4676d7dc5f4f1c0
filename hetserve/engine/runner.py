"""The model runner: owns the model, the KV tensors and per-request device state; executes one step.

Per-step host work is kept to one Python pass over the scheduled requests; everything per token (positions,
slots, block tables) is numpy over persistent arrays, staged in pinned memory and copied with one
non-blocking copy per dtype (``runner_io``). Decode-only steps replay a CUDA graph (see ``cuda_graphs``); logits
are computed only for the rows that sample, and a batch in which every row is plain greedy skips the sampler for
an argmax. ``execute_async`` launches a step and returns at once (async scheduling): the argmax stays on the
device (also kept per row as a run-ahead decode's input) and is copied to pinned memory behind the step.

Pipeline / tensor parallelism (``parallel``, a ``ParallelSpec``): the runner holds its stage's layers' KV (its
TP rank's kv heads only); a stage after the first takes its input from ``stage_io`` (the previous stage's
hidden states for the same step), a stage before the last sends its output there and samples nothing. Only the
last stage's TP rank 0 samples (it owns the sampling state: seeded generators, penalties); other ranks return
empty outputs. CUDA graphs are for the whole model on one device only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetserve.core.config import EngineConfig
from hetserve.core.interfaces import Executor
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.core.sampling_params import SamplingParams, SamplingType
from hetserve.engine.attention import get_attention_backend
from hetserve.engine.cuda_graphs import CudaGraphRunner, graph_batch_sizes
from hetserve.engine.kv_views import LayerViews
from hetserve.engine.memory_profile import profile_step_bytes
from hetserve.engine.model.linears import tune_skinny
from hetserve.engine.model.loader import load_model
from hetserve.engine.model.parallel import ParallelSpec, StageIO
from hetserve.engine.piecewise_graphs import PiecewiseGraphRunner, piecewise_token_sizes, supports_piecewise
from hetserve.engine.runner_io import StepInputs, StepResult, _Batch
from hetserve.engine.sampling.sampler import Sampler, SamplingState

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# device memory kept free beyond the profiled peak: CUDA graph pools, allocator fragmentation
_GRAPH_RESERVE_BYTES = 256 * 2**20
_EAGER_RESERVE_BYTES = 128 * 2**20


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
    row: int  # row of the runner's block-table array
    num_blocks: int
    # greedy, no logprobs, no penalties: the argmax fast path applies once min_tokens is reached
    plain_greedy: bool


def _plain_greedy(sp: SamplingParams) -> bool:
    return (
        sp.sampling_type == SamplingType.GREEDY
        and sp.logprobs is None
        and sp.repetition_penalty == 1.0
        and sp.presence_penalty == 0.0
        and sp.frequency_penalty == 0.0
    )


class ModelRunner(StepInputs, Executor):
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None,
                 model_config: ModelConfig | None = None, parallel: ParallelSpec | None = None,
                 stage_io: StageIO | None = None, cache_kv_heads: int | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device.device)
        self.dtype = resolve_dtype(config.device.dtype, self.device)
        if model is None:
            model, model_config = load_model(Path(config.model), self.device, self.dtype, parallel)
        assert model_config is not None
        self.model = model.eval()
        self.model_config = model_config
        mc = model_config
        self.parallel = parallel or ParallelSpec()
        self._whole = self.parallel.is_whole(mc)
        self.is_first_stage = self.parallel.is_first
        self.is_last_stage = self.parallel.is_last(mc)
        # the only process of an instance that samples and answers
        self.samples = self.is_last_stage and self.parallel.tp_rank == 0
        if not self._whole and not (self.is_first_stage and self.is_last_stage) and stage_io is None:
            raise ValueError("a pipeline stage needs a stage_io to exchange hidden states")
        self.stage_io = stage_io
        self.num_local_layers = self.parallel.num_layers(mc)
        kv0, kv1 = self.parallel.kv_heads(mc)
        self.num_local_kv_heads = kv1 - kv0
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len or mc.max_position_embeddings
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size) + 1
        self.backend = get_attention_backend(config.device.attention_backend, self.device)
        # unseeded rows draw from the runner's own generator, never torch's global one: a CUDA graph capture
        # registers the global generator, and a capture on another stream or context can leave it unusable
        self._unseeded_gen = torch.Generator(device=self.device)
        self._unseeded_gen.manual_seed(config.device.seed)
        self.sampler = Sampler(mc.vocab_size, self.device, generator=self._unseeded_gen)
        self.states: dict[str, _ReqState] = {}
        self._is_cuda = self.device.type == "cuda"
        # persistent per-request block tables; a request keeps its row while the runner knows it
        self._block_table = np.zeros((max(8, config.scheduler.max_num_seqs), self.max_blocks_per_seq), np.int32)
        self._free_rows = list(range(self._block_table.shape[0] - 1, -1, -1))
        self._pinned_i64 = self._host_buffer(torch.int64, 4 * config.scheduler.max_num_batched_tokens + 1024)
        self._pinned_i32 = self._host_buffer(torch.int32, 64 * 1024)
        self._copy_done: torch.cuda.Event | None = None
        # the last token sampled for each row, kept on the device: a run-ahead decode's placeholder input
        self._last_tok = torch.zeros(self._block_table.shape[0], dtype=torch.int64, device=self.device)
        # sampled tokens come back through two alternating pinned buffers (one step may be in flight)
        self._out_host = [self._host_buffer(torch.int64, max(8, config.scheduler.max_num_seqs)) for _ in range(2)]
        self._out_turn = 0
        self._unresolved: list[StepResult] = []
        self.graphs: CudaGraphRunner | None = None

        self._num_blocks = self._decide_num_blocks()
        # one allocation for all layers, one view per layer: a KV hand-off gathers / scatters every layer of a
        # request in one kernel (kv_transfer.extract_blocks / insert_blocks)
        # ``cache_kv_heads``: a Hetis main keeps only some heads here (the rest live on attention workers)
        self.kv_caches = LayerViews(torch.zeros(
            self.num_local_layers, 2, self._num_blocks, self.block_size,
            self.num_local_kv_heads if cache_kv_heads is None else cache_kv_heads, mc.head_dim,
            dtype=self.dtype, device=self.device))
        self.piecewise: PiecewiseGraphRunner | None = None
        # per linear role: cuBLAS or the skinny GEMM at decode-batch sizes, timed here before any capture
        self.skinny_report: dict[str, Any] | None = None
        if config.device.skinny_gemm and self._graphs_possible(whole=False) and hasattr(self.model, "linears"):
            self.skinny_report = tune_skinny(self.model, self.device)
        if self._graphs_possible(whole=True):
            max_batch = min(config.device.cuda_graph_max_batch, config.scheduler.max_num_seqs)
            self.graphs = CudaGraphRunner(self.model, self.kv_caches, self.backend, self.device,
                                          graph_batch_sizes(max_batch), self.max_blocks_per_seq)
            self.graphs.capture()
        max_pw = self._piecewise_max_tokens(cache_kv_heads)
        if max_pw:
            self.piecewise = PiecewiseGraphRunner(self.model, self.kv_caches, self.backend, self.device,
                                                  piecewise_token_sizes(max_pw), self.dtype)
            self.piecewise.capture()

    def _piecewise_max_tokens(self, cache_kv_heads: int | None = None) -> int:
        """Largest token count run as piecewise graphs (0: none). Not for a Hetis main (``cache_kv_heads``: its
        attention also moves K/V to other workers) nor under tensor parallelism."""
        dc = self.config.device
        if cache_kv_heads is not None or not self._graphs_possible(whole=False):
            return 0
        if not supports_piecewise(self.model, self.backend):
            return 0
        return min(dc.piecewise_graph_max_tokens, self.config.scheduler.max_num_batched_tokens)

    def _graphs_possible(self, whole: bool = True) -> bool:
        uses_fused = getattr(self.model, "uses_fused_path", None)
        return (
            self._is_cuda
            and (self._whole or not whole)
            and not self.config.device.enforce_eager
            and getattr(self.backend, "name", "") == "triton"
            and callable(uses_fused)
            and bool(uses_fused(self.device))
        )

    # ---- sizing -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        elt = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_local_layers * self.block_size * self.num_local_kv_heads * mc.head_dim * elt

    def _decide_num_blocks(self) -> int:
        if self.config.cache.num_blocks is not None:
            return self.config.cache.num_blocks
        per_block = self.kv_bytes_per_block()
        if self._is_cuda:
            activation_bytes = profile_step_bytes(self)
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free  # weights, CUDA context, workspaces, other processes
            reserve = _EAGER_RESERVE_BYTES if self.config.device.enforce_eager else _GRAPH_RESERVE_BYTES
            reserve += self._piecewise_pool_bytes()
            budget = total * self.config.cache.gpu_memory_utilization - used - activation_bytes - reserve
            num_blocks = int(budget // per_block)
            logger.info("KV cache: %d blocks (%.2f GiB); step activations profiled at %.2f GiB", num_blocks,
                        num_blocks * per_block / 2**30, activation_bytes / 2**30)
            return max(2, num_blocks)
        return max(2, self.config.cache.cpu_kv_cache_bytes // per_block)

    def _piecewise_pool_bytes(self) -> int:
        """Rough memory of the piecewise graphs' pool and static buffers (the largest bucket's activations)."""
        t = self._piecewise_max_tokens()
        if not t:
            return 0
        mc = self.model_config
        elt = torch.tensor([], dtype=self.dtype).element_size()
        per_token = (mc.num_attention_heads * mc.head_dim * 3 + 2 * mc.num_key_value_heads * mc.head_dim
                     + 3 * mc.intermediate_size + 6 * mc.hidden_size)
        return t * per_token * elt

    @property
    def overlaps_host(self) -> bool:
        """Whether the device computes while the host goes on (a GPU); the default of async scheduling."""
        return self._is_cuda

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    # ---- request state ----------------------------------------------------------------------
    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._block_table.shape[0]
            self._block_table = np.concatenate([self._block_table, np.zeros_like(self._block_table)])
            self._last_tok = torch.cat([self._last_tok, torch.zeros_like(self._last_tok)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _append_blocks(self, st: _ReqState, block_ids: list[int]) -> None:
        if not block_ids:
            return
        end = st.num_blocks + len(block_ids)
        if end > self._block_table.shape[1]:
            extra = max(end - self._block_table.shape[1], self._block_table.shape[1])
            self._block_table = np.pad(self._block_table, ((0, 0), (0, extra)))
        self._block_table[st.row, st.num_blocks : end] = block_ids
        st.num_blocks = end

    def _forget(self, req_id: str) -> None:
        st = self.states.pop(req_id, None)
        if st is not None:
            self._block_table[st.row, : st.num_blocks] = 0
            self._free_rows.append(st.row)

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self._forget(rid)
        for rid in so.preempted_req_ids:
            self._forget(rid)
        for s in so.scheduled:
            if s.new is not None:
                self._forget(s.req_id)
                sp = s.new.sampling_params
                gen = None
                if sp.seed is not None:
                    gen = torch.Generator(device=self.device)
                st = _ReqState(
                    sampling=SamplingState(
                        params=sp,
                        prompt_token_ids=list(s.new.prompt_token_ids),
                        output_token_ids=list(s.new.output_token_ids),
                        eos_token_ids=frozenset(s.new.eos_token_ids),
                        generator=gen,
                    ),
                    row=self._take_row(),
                    num_blocks=0,
                    plain_greedy=_plain_greedy(sp),
                )
                self.states[s.req_id] = st
                self._append_blocks(st, s.new_block_ids)
            elif s.new_block_ids:
                self._append_blocks(self.states[s.req_id], s.new_block_ids)

    # ---- the step ---------------------------------------------------------------------------
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(so).result()

    @torch.inference_mode()
    def execute_async(self, so: SchedulerOutput) -> StepResult:
        """Launch the step; the answer waits in the returned ``StepResult``. Steps must be resolved in order, and
        at most one may stay unresolved when the next is launched (its pinned output buffer is reused)."""
        while len(self._unresolved) > 1:
            self._unresolved.pop(0).result()
        self._update_states(so)
        req_ids = [s.req_id for s in so.scheduled]
        sampled: list[list[int]] = [[] for _ in so.scheduled]
        if not so.scheduled:
            return StepResult(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
        batch = self._prepare(so)
        if batch.graph_batch is not None:
            assert self.graphs is not None
            hidden = self.graphs.replay(batch.graph_batch)
        elif self._whole:
            assert batch.input_ids is not None and batch.meta is not None
            if batch.piecewise is not None:
                assert self.piecewise is not None
                hidden = self.piecewise.run(batch.piecewise, batch.num_tokens, batch.meta)[0]
            else:
                hidden = self.model(batch.input_ids, batch.meta.positions, self.kv_caches, batch.meta, self.backend)
        else:
            hidden = self._forward_stage(so, batch)
            if hidden is None or not self.samples:
                return StepResult(ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled))
        result = self._sample(so, batch, hidden, req_ids, sampled)
        self._unresolved = [r for r in self._unresolved if not r.done]
        self._unresolved.append(result)
        return result

    def _forward_stage(self, so: SchedulerOutput, batch: _Batch) -> torch.Tensor | None:
        """One pipeline stage / TP rank's forward: the final hidden states on the last stage, else None
        (the stage's output went to the next stage)."""
        assert batch.input_ids is not None and batch.meta is not None
        inter = None
        if not self.is_first_stage:
            assert self.stage_io is not None
            inter = self.stage_io.recv(so.step_id, self.device)
        if batch.piecewise is not None:
            assert self.piecewise is not None
            res = self.piecewise.run(batch.piecewise, batch.num_tokens, batch.meta, inter)
            out: Any = res[0] if self.is_last_stage else [t[: batch.num_tokens] for t in res]
        else:
            out = self.model(batch.input_ids, batch.meta.positions, self.kv_caches, batch.meta, self.backend, inter)
        if self.is_last_stage:
            return out
        assert self.stage_io is not None
        self.stage_io.send(so.step_id, out)
        return None

    def _sample(self, so: SchedulerOutput, batch: _Batch, hidden: torch.Tensor, req_ids: list[str],
                sampled: list[list[int]]) -> StepResult:
        sample_idx = batch.sample_idx
        if not sample_idx:
            return StepResult(ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled))
        rows = hidden[: batch.num_seqs] if batch.sample_rows is None else hidden.index_select(0, batch.sample_rows)
        req_states = [self.states[so.scheduled[i].req_id] for i in sample_idx]
        fast = all(
            r.plain_greedy and len(r.sampling.output_token_ids) >= r.sampling.params.min_tokens for r in req_states
        )
        state_rows = batch.sample_state_rows
        if fast:
            tokens_dev = self.model.compute_logits(rows, float32=False).argmax(dim=-1)
            if state_rows is not None:
                self._last_tok.index_copy_(0, state_rows, tokens_dev)
            k = len(sample_idx)
            host = self._out_host[self._out_turn]
            if host.numel() < k:
                host = self._out_host[self._out_turn] = self._host_buffer(torch.int64, 2 * k)
            self._out_turn ^= 1
            host = host[:k]
            host.copy_(tokens_dev, non_blocking=self._is_cuda)
            event = None
            if self._is_cuda:
                event = torch.cuda.Event()
                event.record()
            out = ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
            return StepResult(out, host, event, sample_idx, [r.sampling for r in req_states])
        logits = self.model.compute_logits(rows)
        states = []
        for r in req_states:
            st = r.sampling
            if st.generator is not None and st.params.seed is not None:
                st.generator.manual_seed(seeded_noise_seed(st.params.seed, len(st.output_token_ids)))
            states.append(st)
        out = self.sampler(logits, states)
        if state_rows is not None:
            self._last_tok.index_copy_(0, state_rows, torch.tensor(out.token_ids, dtype=torch.int64).to(self.device))
        want_lp = any(st.params.logprobs is not None for st in states)
        logprobs_out = [None] * len(so.scheduled) if want_lp else None
        for j, i in enumerate(sample_idx):
            tok = out.token_ids[j]
            sampled[i] = [tok]
            states[j].output_token_ids.append(tok)
            if logprobs_out is not None:
                logprobs_out[i] = out.logprobs[j]
        return StepResult(ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, logprobs=logprobs_out))
