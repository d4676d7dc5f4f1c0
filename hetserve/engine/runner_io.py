"""A step's device inputs and its answer, for the model runner.

``StepInputs`` (mixed into ``ModelRunner``) turns a ``SchedulerOutput`` into device tensors with one Python pass
and numpy over persistent arrays: token ids, positions, slots and block tables are staged in pinned memory and
copied with one non-blocking copy per dtype (or into a CUDA graph's static buffers). A run-ahead decode's
placeholder token (async scheduling) is filled on the device from the runner's last sampled tokens.
``StepResult`` is a launched step's answer, read back when the engine asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.engine.attention import AttentionMetadata
from hetserve.engine.sampling.sampler import SamplingState

if TYPE_CHECKING:
    from hetserve.engine.cuda_graphs import CudaGraphRunner
    from hetserve.engine.piecewise_graphs import PiecewiseGraphRunner


@dataclass
class _Batch:
    num_tokens: int
    num_seqs: int
    sample_idx: list[int]  # indices into the step's scheduled list
    input_ids: torch.Tensor | None  # None when a CUDA graph replays from its static buffers
    meta: AttentionMetadata | None
    sample_rows: torch.Tensor | None  # hidden rows to compute logits for; None = the first num_seqs rows
    graph_batch: int | None
    # the sampled requests' rows of the runner's tables (device): where their tokens are kept for a placeholder
    sample_state_rows: torch.Tensor | None = None
    # the piecewise graphs' token bucket when the step replays them (ids / positions / slots in their buffers)
    piecewise: int | None = None


class StepResult:
    """A launched step's answer. The sampled tokens are copied to pinned host memory behind the step's work;
    ``result()`` waits for that copy only, so the host can schedule and launch the next step meanwhile."""

    __slots__ = ("_done", "_event", "_host", "_out", "_sample_idx", "_states")

    def __init__(self, out: ModelRunnerOutput, host: torch.Tensor | None = None, event: torch.cuda.Event | None = None,
                 sample_idx: list[int] | None = None, states: list[SamplingState] | None = None) -> None:
        self._out = out
        self._host = host
        self._event = event
        self._sample_idx = sample_idx
        self._states = states
        self._done = host is None

    @property
    def done(self) -> bool:
        """Whether the answer was read back already."""
        return self._done

    def result(self) -> ModelRunnerOutput:
        if not self._done:
            assert self._host is not None and self._sample_idx is not None and self._states is not None
            if self._event is not None:
                self._event.synchronize()
            tokens: list[int] = self._host.tolist()
            sampled = self._out.sampled_token_ids
            for j, i in enumerate(self._sample_idx):
                tok = tokens[j]
                sampled[i] = [tok]
                self._states[j].output_token_ids.append(tok)
            self._done = True
        return self._out


class StepInputs:
    """Input staging for ``ModelRunner`` (uses its block table, rows, pinned buffers and graphs)."""

    _pinned_i64: torch.Tensor
    _pinned_i32: torch.Tensor
    _copy_done: torch.cuda.Event | None
    _block_table: np.ndarray
    _last_tok: torch.Tensor
    _is_cuda: bool
    device: torch.device
    block_size: int
    graphs: CudaGraphRunner | None
    piecewise: PiecewiseGraphRunner | None
    states: dict

    def _host_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=self._is_cuda)

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
        ph_tok: list[int] = []  # placeholder tokens: index in the step, row whose last sampled token it is
        ph_rows: list[int] = []
        for i, s in enumerate(scheduled):
            row = states[s.req_id].row
            rows.append(row)
            starts.append(s.num_computed_tokens)
            counts.append(s.num_tokens)
            token_ids.extend(s.token_ids)
            if s.placeholder:
                ph_tok.append(len(token_ids))
                ph_rows.append(row)
                token_ids.append(0)
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
                                       width, sample_idx, ph_tok, ph_rows)

        # eager: one int64 pack [ids | positions | slots | sample rows], one int32 pack [qsl | seq_lens | tables]
        # then [placeholder token indices | their rows | sampled requests' rows]
        all_sample = len(sample_idx) == n and decode
        num_sample = 0 if all_sample else len(sample_idx)
        nph, ns = len(ph_tok), len(sample_idx)
        base = 3 * total + num_sample
        i64 = self._stage("i64", base + 2 * nph + ns)
        i64[:total] = token_ids
        i64[total : 2 * total] = positions
        i64[2 * total : 3 * total] = slots
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts_np, out=qsl[1:])
        if num_sample:
            i64[3 * total : 3 * total + num_sample] = qsl[np.array(sample_idx) + 1] - 1
        i64[base : base + nph] = ph_tok
        i64[base + nph : base + 2 * nph] = ph_rows
        i64[base + 2 * nph : base + 2 * nph + ns] = rows_np[sample_idx]
        i32 = self._stage("i32", 2 * n + 1 + n * width)
        i32[: n + 1] = qsl
        i32[n + 1 : 2 * n + 1] = seq_lens
        i32[2 * n + 1 : 2 * n + 1 + n * width].reshape(n, width)[:] = table[rows_np, :width]
        dev64 = self._to_device(self._pinned_i64[: base + 2 * nph + ns])
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
        sample_rows = dev64[3 * total : base] if num_sample else None
        ids = dev64[:total]
        if nph:
            ids.index_copy_(0, dev64[base : base + nph], self._last_tok.index_select(0, dev64[base + nph : base + 2 * nph]))
        pw = self.piecewise
        pw_t = pw.bucket(total) if pw is not None else None
        if pw_t is not None:
            assert pw is not None
            pw.ids_pos_slots[:, :total].copy_(dev64[: 3 * total].view(3, total))
            if pw_t > total:
                pw.ids_pos_slots[2, total:pw_t].fill_(-1)  # padding writes no K/V
        return _Batch(total, n, sample_idx, ids, meta, sample_rows, None, dev64[base + 2 * nph :], pw_t)

    def _prepare_graph(
        self, graphs: CudaGraphRunner, batch: int, n: int, token_ids: list[int], positions: np.ndarray,
        slots: np.ndarray, seq_lens: np.ndarray, rows_np: np.ndarray, width: int, sample_idx: list[int],
        ph_tok: list[int], ph_rows: list[int],
    ) -> _Batch:
        mb = graphs.max_batch
        nph, ns = len(ph_tok), len(sample_idx)
        staged = self._stage("i64", 3 * mb + 2 * nph + ns)
        i64 = staged[: 3 * mb].reshape(3, mb)
        extra = staged[3 * mb : 3 * mb + 2 * nph + ns]
        extra[:nph] = ph_tok
        extra[nph : 2 * nph] = ph_rows
        extra[2 * nph :] = rows_np[sample_idx]
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
        extra_dev = self._to_device(self._pinned_i64[3 * mb : 3 * mb + 2 * nph + ns])
        self._mark_copies()
        if nph:
            graphs.ids_pos_slots[0].index_copy_(0, extra_dev[:nph], self._last_tok.index_select(0, extra_dev[nph : 2 * nph]))
        sample_rows = None
        if len(sample_idx) != n:
            sample_rows = torch.tensor(sample_idx, dtype=torch.int64).to(self.device, non_blocking=False)
        return _Batch(n, n, sample_idx, None, None, sample_rows, batch, extra_dev[2 * nph :])
