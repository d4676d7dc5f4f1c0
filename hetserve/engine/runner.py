"""The model runner: owns the model, the KV tensors and per-request device state; executes one step.

Per-step host work is kept to one Python pass over the scheduled requests; everything per token (positions,
slots, block tables) is numpy over persistent arrays, staged in pinned memory and copied with one
non-blocking copy per dtype. Decode-only steps replay a CUDA graph (see ``cuda_graphs``); logits are computed
only for the rows that sample, and a batch in which every row is plain greedy skips the sampler for an argmax.

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

import numpy as np
import torch

from hetserve.core.config import EngineConfig
from hetserve.core.interfaces import Executor
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.core.sampling_params import SamplingParams, SamplingType
from hetserve.engine.attention import AttentionMetadata, get_attention_backend
from hetserve.engine.cuda_graphs import CudaGraphRunner, graph_batch_sizes
from hetserve.engine.model.loader import load_model
from hetserve.engine.model.parallel import ParallelSpec, StageIO
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


@dataclass
class _Batch:
    num_tokens: int
    num_seqs: int
    sample_idx: list[int]  # indices into the step's scheduled list
    input_ids: torch.Tensor | None  # None when a CUDA graph replays from its static buffers
    meta: AttentionMetadata | None
    sample_rows: torch.Tensor | None  # hidden rows to compute logits for; None = the first num_seqs rows
    graph_batch: int | None


def _plain_greedy(sp: SamplingParams) -> bool:
    return (
        sp.sampling_type == SamplingType.GREEDY
        and sp.logprobs is None
        and sp.repetition_penalty == 1.0
        and sp.presence_penalty == 0.0
        and sp.frequency_penalty == 0.0
    )


class ModelRunner(Executor):
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
        self.graphs: CudaGraphRunner | None = None

        self._num_blocks = self._decide_num_blocks()
        # one allocation for all layers, one view per layer: a KV hand-off gathers / scatters every layer of a
        # request in one kernel (kv_transfer.extract_blocks / insert_blocks)
        # ``cache_kv_heads``: a Hetis main keeps only some heads here (the rest live on attention workers)
        self.kv_caches = list(torch.zeros(
            self.num_local_layers, 2, self._num_blocks, self.block_size,
            self.num_local_kv_heads if cache_kv_heads is None else cache_kv_heads, mc.head_dim,
            dtype=self.dtype, device=self.device).unbind(0))
        if self._graphs_possible():
            max_batch = min(config.device.cuda_graph_max_batch, config.scheduler.max_num_seqs)
            self.graphs = CudaGraphRunner(self.model, self.kv_caches, self.backend, self.device,
                                          graph_batch_sizes(max_batch), self.max_blocks_per_seq)
            self.graphs.capture()

    def _graphs_possible(self) -> bool:
        uses_fused = getattr(self.model, "uses_fused_path", None)
        return (
            self._is_cuda
            and self._whole
            and not self.config.device.enforce_eager
            and getattr(self.backend, "name", "") == "triton"
            and callable(uses_fused)
            and bool(uses_fused(self.device))
        )

    def _host_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self._is_cuda)

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
            activation_bytes = self.profile_step_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free  # weights, CUDA context, workspaces, other processes
            reserve = _EAGER_RESERVE_BYTES if self.config.device.enforce_eager else _GRAPH_RESERVE_BYTES
            budget = total * self.config.cache.gpu_memory_utilization - used - activation_bytes - reserve
            num_blocks = int(budget // per_block)
            logger.info("KV cache: %d blocks (%.2f GiB); step activations profiled at %.2f GiB", num_blocks,
                        num_blocks * per_block / 2**30, activation_bytes / 2**30)
            return max(2, num_blocks)
        return max(2, self.config.cache.cpu_kv_cache_bytes // per_block)

    @torch.inference_mode()
    def profile_step_bytes(self) -> int:
        """Peak device memory of the largest step (``max_num_batched_tokens`` tokens in one forward, as
        sequences of at most ``max_model_len``; then logits and top-k/top-p sampling for ``max_num_seqs`` rows),
        beyond what is allocated before it."""
        mc = self.model_config
        sc = self.config.scheduler
        bs = self.block_size
        num_tokens = sc.max_num_batched_tokens
        lens = [min(self.max_model_len, num_tokens - start) for start in range(0, num_tokens, self.max_model_len)]
        blocks_per_seq = -(-max(lens) // bs)
        num_rows = max(1, min(sc.max_num_seqs, num_tokens))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        caches = [torch.zeros(2, len(lens) * blocks_per_seq + 1, bs, self.num_local_kv_heads, mc.head_dim,
                              dtype=self.dtype, device=self.device) for _ in range(self.num_local_layers)]
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        # sequence i owns blocks 1 + i * blocks_per_seq, ...; block 0 stays the null block
        pos_np = np.concatenate([np.arange(n) for n in lens])
        seq_np = np.repeat(np.arange(len(lens)), lens)
        slots_np = (1 + seq_np * blocks_per_seq) * bs + pos_np
        qsl = [0, *np.cumsum(lens).tolist()]
        tables = 1 + np.arange(len(lens))[:, None] * blocks_per_seq + np.arange(blocks_per_seq)[None, :]
        dev = self.device
        positions = torch.from_numpy(pos_np).to(dev)
        meta = AttentionMetadata(
            num_tokens=num_tokens, num_seqs=len(lens), positions=positions,
            slot_mapping=torch.from_numpy(slots_np).to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev),
            max_query_len=max(lens), max_seq_len=max(lens), query_start_loc_cpu=qsl, seq_lens_cpu=lens,
        )
        # no global RNG here (see the sampler's generator above): any valid ids do
        ids = torch.arange(num_tokens, device=dev) % mc.vocab_size
        if self.is_first_stage:
            hidden = self.model(ids, positions, caches, meta, self.backend)
        else:
            inter = [torch.zeros(num_tokens, mc.hidden_size, dtype=self.dtype, device=dev) for _ in range(2)]
            hidden = self.model(ids, positions, caches, meta, self.backend, inter)
        if not self.is_last_stage:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base - cache_bytes
            del caches, hidden, meta, ids, positions
            torch.cuda.empty_cache()
            return max(0, peak)
        logits = self.model.compute_logits(hidden[-num_rows:])
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
        states = [SamplingState(params=params, prompt_token_ids=[]) for _ in range(num_rows)]
        self.sampler(logits, states)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - cache_bytes
        del caches, hidden, logits, meta, ids, positions
        torch.cuda.empty_cache()
        return max(0, peak)

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    # ---- request state ----------------------------------------------------------------------
    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._block_table.shape[0]
            self._block_table = np.concatenate([self._block_table, np.zeros_like(self._block_table)])
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

    # ---- metadata ---------------------------------------------------------------------------
    def _stage(self, which: str, numel: int) -> np.ndarray:
        """A numpy view of the pinned staging buffer, grown when needed; waits for the previous step's copies
        out of it first (a step that samples nothing ends without a sync)."""
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None
        buf = self._pinned_i64 if which == "i64" else self._pinned_i32
        if buf.numel() < numel:
            buf = self._host_buffer(buf.dtype, max(numel, 2 * buf.numel()))
            if which == "i64":
                self._pinned_i64 = buf
            else:
                self._pinned_i32 = buf
        return buf.numpy()

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if not self._is_cuda:
            return host.clone()
        return host.to(self.device, non_blocking=True)

    def _mark_copies(self) -> None:
        if self._is_cuda:
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()

    def _prepare(self, so: SchedulerOutput) -> _Batch:
        scheduled = so.scheduled
        n = len(scheduled)
        bs = self.block_size
        rows: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        token_ids: list[int] = []
        sample_idx: list[int] = []
        states = self.states
        for i, s in enumerate(scheduled):
            rows.append(states[s.req_id].row)
            starts.append(s.num_computed_tokens)
            counts.append(s.num_tokens)
            token_ids.extend(s.token_ids)
            if s.sample:
                sample_idx.append(i)
        total = len(token_ids)
        rows_np = np.array(rows, dtype=np.int64)
        starts_np = np.array(starts, dtype=np.int64)
        counts_np = np.array(counts, dtype=np.int64)
        seq_lens = starts_np + counts_np
        decode = total == n
        if decode:
            positions = starts_np
            tok_rows = rows_np
        else:
            ends = np.cumsum(counts_np)
            positions = np.arange(total, dtype=np.int64) - np.repeat(ends - counts_np - starts_np, counts_np)
            tok_rows = np.repeat(rows_np, counts_np)
        table = self._block_table
        slots = table[tok_rows, positions // bs].astype(np.int64) * bs + positions % bs
        width = max(1, int(((seq_lens + bs - 1) // bs).max()))
        graphs = self.graphs
        graph_batch = graphs.bucket(n) if graphs is not None and decode else None
        if graph_batch is not None:
            assert graphs is not None
            return self._prepare_graph(graphs, graph_batch, n, token_ids, positions, slots, seq_lens, rows_np,
                                       width, sample_idx)

        # eager: one int64 pack [ids | positions | slots | sample rows], one int32 pack [qsl | seq_lens | tables]
        all_sample = len(sample_idx) == n and decode
        num_sample = 0 if all_sample else len(sample_idx)
        i64 = self._stage("i64", 3 * total + num_sample)
        i64[:total] = token_ids
        i64[total : 2 * total] = positions
        i64[2 * total : 3 * total] = slots
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts_np, out=qsl[1:])
        if num_sample:
            i64[3 * total : 3 * total + num_sample] = qsl[np.array(sample_idx) + 1] - 1
        i32 = self._stage("i32", 2 * n + 1 + n * width)
        i32[: n + 1] = qsl
        i32[n + 1 : 2 * n + 1] = seq_lens
        i32[2 * n + 1 : 2 * n + 1 + n * width].reshape(n, width)[:] = table[rows_np, :width]
        dev64 = self._to_device(self._pinned_i64[: 3 * total + num_sample])
        dev32 = self._to_device(self._pinned_i32[: 2 * n + 1 + n * width])
        self._mark_copies()
        seq_lens_list = seq_lens.tolist()
        meta = AttentionMetadata(
            num_tokens=total,
            num_seqs=n,
            positions=dev64[total : 2 * total],
            slot_mapping=dev64[2 * total : 3 * total],
            query_start_loc=dev32[: n + 1],
            seq_lens=dev32[n + 1 : 2 * n + 1],
            block_tables=dev32[2 * n + 1 :].view(n, width),
            max_query_len=int(counts_np.max()),
            max_seq_len=max(seq_lens_list),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens_list,
        )
        sample_rows = dev64[3 * total :] if num_sample else None
        return _Batch(total, n, sample_idx, dev64[:total], meta, sample_rows, None)

    def _prepare_graph(
        self, graphs: CudaGraphRunner, batch: int, n: int, token_ids: list[int], positions: np.ndarray,
        slots: np.ndarray, seq_lens: np.ndarray, rows_np: np.ndarray, width: int, sample_idx: list[int],
    ) -> _Batch:
        mb = graphs.max_batch
        i64 = self._stage("i64", 3 * mb).reshape(-1)[: 3 * mb].reshape(3, mb)
        i64[0, :n] = token_ids
        i64[0, n:batch] = 0
        i64[1, :n] = positions
        i64[1, n:batch] = 0
        i64[2, :n] = slots
        i64[2, n:batch] = -1
        i32 = self._stage("i32", 2 * mb + 1 + batch * width)
        i32[: n + 1] = np.arange(n + 1)
        i32[n + 1 : batch + 1] = n  # padding sequences own no query tokens
        i32[mb + 1 : mb + 1 + n] = seq_lens
        i32[mb + 1 + n : mb + 1 + batch] = 0
        tables = i32[2 * mb + 1 : 2 * mb + 1 + batch * width].reshape(batch, width)
        tables[:n] = self._block_table[rows_np, :width]
        tables[n:] = 0
        graphs.ids_pos_slots.copy_(self._pinned_i64[: 3 * mb].view(3, mb), non_blocking=True)
        graphs.qsl_seq_lens.copy_(self._pinned_i32[: 2 * mb + 1], non_blocking=True)
        graphs.block_tables[:batch, :width].copy_(
            self._pinned_i32[2 * mb + 1 : 2 * mb + 1 + batch * width].view(batch, width), non_blocking=True
        )
        self._mark_copies()
        sample_rows = None
        if len(sample_idx) != n:
            sample_rows = torch.tensor(sample_idx, dtype=torch.int64).to(self.device, non_blocking=False)
        return _Batch(n, n, sample_idx, None, None, sample_rows, batch)

    # ---- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        req_ids = [s.req_id for s in so.scheduled]
        sampled: list[list[int]] = [[] for _ in so.scheduled]
        if not so.scheduled:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        batch = self._prepare(so)
        if batch.graph_batch is not None:
            assert self.graphs is not None
            hidden = self.graphs.replay(batch.graph_batch)
        elif self._whole:
            assert batch.input_ids is not None and batch.meta is not None
            hidden = self.model(batch.input_ids, batch.meta.positions, self.kv_caches, batch.meta, self.backend)
        else:
            hidden = self._forward_stage(so, batch)
            if hidden is None or not self.samples:
                return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
        return self._sample(so, batch, hidden, req_ids, sampled)

    def _forward_stage(self, so: SchedulerOutput, batch: _Batch) -> torch.Tensor | None:
        """One pipeline stage / TP rank's forward: the final hidden states on the last stage, else None
        (the stage's output went to the next stage)."""
        assert batch.input_ids is not None and batch.meta is not None
        inter = None
        if not self.is_first_stage:
            assert self.stage_io is not None
            inter = self.stage_io.recv(so.step_id, self.device)
        out = self.model(batch.input_ids, batch.meta.positions, self.kv_caches, batch.meta, self.backend, inter)
        if self.is_last_stage:
            return out
        assert self.stage_io is not None
        self.stage_io.send(so.step_id, out)
        return None

    def _sample(self, so: SchedulerOutput, batch: _Batch, hidden: torch.Tensor, req_ids: list[str],
                sampled: list[list[int]]) -> ModelRunnerOutput:
        sample_idx = batch.sample_idx
        if not sample_idx:
            return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
        rows = hidden[: batch.num_seqs] if batch.sample_rows is None else hidden.index_select(0, batch.sample_rows)
        req_states = [self.states[so.scheduled[i].req_id] for i in sample_idx]
        fast = all(
            r.plain_greedy and len(r.sampling.output_token_ids) >= r.sampling.params.min_tokens for r in req_states
        )
        logprobs_out = None
        if fast:
            tokens: list[int] = self.model.compute_logits(rows, float32=False).argmax(dim=-1).tolist()
            for j, i in enumerate(sample_idx):
                tok = tokens[j]
                sampled[i] = [tok]
                req_states[j].sampling.output_token_ids.append(tok)
            return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
        logits = self.model.compute_logits(rows)
        states = []
        for r in req_states:
            st = r.sampling
            if st.generator is not None and st.params.seed is not None:
                st.generator.manual_seed(seeded_noise_seed(st.params.seed, len(st.output_token_ids)))
            states.append(st)
        out = self.sampler(logits, states)
        want_lp = any(st.params.logprobs is not None for st in states)
        if want_lp:
            logprobs_out = [None] * len(so.scheduled)
        for j, i in enumerate(sample_idx):
            tok = out.token_ids[j]
            sampled[i] = [tok]
            states[j].output_token_ids.append(tok)
            if want_lp:
                logprobs_out[i] = out.logprobs[j]
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, logprobs=logprobs_out)
