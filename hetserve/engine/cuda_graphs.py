"""CUDA graphs for decode-only steps: one graph per bucketed batch size, replayed with padding.

A decode step is ~10 launches per layer whose work at small batches is a few microseconds each, so launching
them one by one from Python costs more than running them. The model's fused path never synchronises with the
host and the Triton attention's launch shape depends only on (num_tokens, num_seqs), so the whole forward is
captured once per bucket against static input buffers and replayed after the runner has copied the step's
metadata into those buffers.

Padding (a batch of ``n`` sequences replayed in bucket ``b >= n``): tokens ``n..b-1`` get input id 0, position
0 and slot -1 (their K/V is never written); sequences ``n..b-1`` get zero query tokens
(``query_start_loc[n+1:] = n``) and ``seq_len`` 0, so attention skips them. Their output rows are garbage and
are dropped.

Static buffer layout, mirrored by the runner's pinned staging buffers so that one copy fills each:
``ids_pos_slots`` int64 ``[3, max_batch]`` (input ids, positions, slots); ``qsl_seq_lens`` int32
``[2 * max_batch + 1]`` (query_start_loc ``[max_batch + 1]`` then seq_lens ``[max_batch]``); ``block_tables``
int32 ``[max_batch, max_blocks_per_seq]``.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from hetserve.core.graph_sizes import graph_batch_sizes
from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

__all__ = ["CudaGraphRunner", "graph_batch_sizes"]


class CudaGraphRunner:
    """Captures ``model(input_ids, positions, kv_caches, meta, backend)`` per batch size; replays it."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        device: torch.device,
        batch_sizes: list[int],
        max_blocks_per_seq: int,
    ) -> None:
        if not batch_sizes:
            raise ValueError("no CUDA graph batch sizes")
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.device = device
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch = self.batch_sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        mb = self.max_batch
        self.ids_pos_slots = torch.zeros((3, mb), dtype=torch.int64, device=device)
        self.qsl_seq_lens = torch.zeros(2 * mb + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((mb, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0

    # ---- views of the static buffers ---------------------------------------------------------------------
    def input_ids(self, batch: int) -> torch.Tensor:
        return self.ids_pos_slots[0, :batch]

    def positions(self, batch: int) -> torch.Tensor:
        return self.ids_pos_slots[1, :batch]

    def metadata(self, batch: int, max_seq_len: int = 1) -> AttentionMetadata:
        mb = self.max_batch
        return AttentionMetadata(
            num_tokens=batch,
            num_seqs=batch,
            positions=self.ids_pos_slots[1, :batch],
            slot_mapping=self.ids_pos_slots[2, :batch],
            query_start_loc=self.qsl_seq_lens[: batch + 1],
            seq_lens=self.qsl_seq_lens[mb + 1 : mb + 1 + batch],
            block_tables=self.block_tables[:batch],
            max_query_len=1,
            # host-side fields are placeholders: a graph must not depend on them
            max_seq_len=max_seq_len,
            query_start_loc_cpu=list(range(batch + 1)),
            seq_lens_cpu=[1] * batch,
        )

    def bucket(self, num_seqs: int) -> int | None:
        """Smallest captured batch size that holds ``num_seqs`` sequences, or None."""
        i = bisect.bisect_left(self.batch_sizes, num_seqs)
        if i == len(self.batch_sizes) or self.batch_sizes[i] not in self.graphs:
            return None
        return self.batch_sizes[i]

    # ---- capture / replay --------------------------------------------------------------------------------
    def _fill_dummy(self) -> None:
        mb = self.max_batch
        self.ids_pos_slots.zero_()
        self.ids_pos_slots[2].fill_(-1)  # no K/V write during capture
        self.qsl_seq_lens[: mb + 1] = torch.arange(mb + 1, dtype=torch.int32, device=self.device)
        self.qsl_seq_lens[mb + 1 :].fill_(1)  # each dummy sequence reads one slot of the null block
        self.block_tables.zero_()

    def _run(self, batch: int) -> torch.Tensor:
        return self.model(self.input_ids(batch), self.positions(batch), self.kv_caches, self.metadata(batch),
                          self.backend)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        self._fill_dummy()
        # Seen on torch 2.11 / H100: after a capture, eager draws from torch's global CUDA generator could fail
        # with "Offset increment outside graph capture". Our own code draws from private generators only; one
        # eager draw before the first capture initialises the global generator outside any capture.
        torch.empty(1, device=self.device).normal_()
        pool = torch.cuda.graph_pool_handle()
        ambient = torch.cuda.current_stream(self.device)
        # capture on the caller's stream when it is not the default one (e.g. a green-context stream, so the
        # captured kernels stay on its SMs); the default stream cannot capture, so a side stream is used then
        on_default = ambient == torch.cuda.default_stream(self.device)
        capture_stream = torch.cuda.Stream(self.device) if on_default else ambient
        # largest first, so the smaller graphs fit in the memory the largest one already reserved
        for batch in reversed(self.batch_sizes):
            capture_stream.wait_stream(ambient)
            with torch.cuda.stream(capture_stream):
                for _ in range(2):  # compiles the Triton kernels of this shape outside the capture
                    self._run(batch)
            ambient.wait_stream(capture_stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=capture_stream):
                out = self._run(batch)
            self.graphs[batch] = graph
            self.outputs[batch] = out
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        logger.info("captured %d CUDA graphs (batch %d..%d) in %.1f s", len(self.graphs), self.batch_sizes[0],
                    self.max_batch, self.capture_s)

    def replay(self, batch: int) -> torch.Tensor:
        """Run the graph of ``batch`` on whatever the static buffers hold; returns its ``[batch, hidden]`` output
        (valid until the next replay)."""
        self.graphs[batch].replay()
        return self.outputs[batch]
