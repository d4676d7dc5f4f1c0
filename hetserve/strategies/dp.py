"""Data parallelism over unequal instances: each request goes where it is predicted to finish first."""

from __future__ import annotations

from hetserve.core.request import KVTransferParams, Request
from hetserve.strategies.base import Deployment, InstanceView


class DPDeployment(Deployment):
    strategy = "dp"

    def predicted_finish_s(self, view: InstanceView, prompt_len: int, output_len: int) -> float:
        """Seconds until a request sent now would finish on ``view``: its share of the prefill backlog, its
        own prefill, and its decode steps in a batch one larger than now. Faster devices predict shorter
        times, so they take proportionally more requests (capacity weighting)."""
        cost = view.plan.cost
        per_tok = cost.prefill_time_s(512) / 512
        backlog = (view.pending_prefill_tokens() + prompt_len) * per_tok
        batch = min(view.num_running() + view.num_waiting() + 1, view.plan.max_num_seqs)
        queue_factor = max(1.0, (view.num_running() + view.num_waiting() + 1) / view.plan.max_num_seqs)
        decode = output_len * cost.decode_time_s(batch, prompt_len + output_len / 2) * queue_factor
        return backlog + decode

    def route(self, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, KVTransferParams | None]:
        out_len = req.sampling_params.max_tokens or 256
        best = min(views.values(), key=lambda v: self.predicted_finish_s(v, req.num_prompt_tokens, out_len))
        return best.name, None
