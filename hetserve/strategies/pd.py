"""Prefill/decode disaggregation: prefill instances compute whole prompts and sample the first token, then
hand the prompt's KV to a decode instance, which runs every later token.

Each role has its own instances, devices and TP degree; either role may sit on the high-end or the low-end
devices. A new request goes to the prefill instance predicted to finish its prompt first; at hand-off the
decode instance with the cheapest next step (and room for the request's KV) takes it.
"""

from __future__ import annotations

from typing import Any

from hetserve.core.devices import LinkSpec
from hetserve.core.request import KVTransferParams, Request
from hetserve.strategies.base import Deployment, InstancePlan, InstanceView


def prefill_s_per_token(plan: InstancePlan) -> float:
    n = min(512, plan.max_num_batched_tokens)
    return sum(c.prefill_time_s(n) for c in plan.stage_costs) / n


class PDDeployment(Deployment):
    strategy = "pd"

    def __init__(self, plans: list[InstancePlan], link_between: Any, params: dict[str, Any] | None = None) -> None:
        super().__init__(plans, link_between, params)
        self.prefill = [p.name for p in plans if p.role == "prefill"]
        self.decode = [p.name for p in plans if p.role == "decode"]
        if not self.prefill or not self.decode:
            raise ValueError("PD needs at least one prefill and one decode instance")
        odd = [p.name for p in plans if p.role not in ("prefill", "decode")]
        if odd:
            raise ValueError(f"PD instances must have role prefill or decode: {odd}")
        self._prefill_rate = {n: prefill_s_per_token(self.plans[n]) for n in self.prefill}

    def route(self, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, KVTransferParams | None]:
        L = req.num_prompt_tokens

        def finish_s(name: str) -> float:
            return (views[name].pending_prefill_tokens() + L) * self._prefill_rate[name]

        return min(self.prefill, key=finish_s), KVTransferParams(send=True)

    def decode_score(self, view: InstanceView, need_tokens: int, mean_context: float) -> float:
        """Seconds of the instance's next decode step with this request added, stretched when the batch
        would exceed ``max_num_seqs`` (requests wait) and pushed last when its KV pool cannot take it."""
        plan = view.plan
        load = view.num_running() + view.num_waiting() + 1
        batch = min(load, plan.max_num_seqs)
        t = plan.cost.decode_time_s(batch, mean_context) * max(1.0, load / plan.max_num_seqs)
        if plan.num_stages > 1:
            t *= plan.num_stages  # every stage sees every token
        if view.free_kv_tokens() < need_tokens:
            t += 1e6
        return t

    def handoff(self, src: str, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, int]:
        out_len = req.sampling_params.max_tokens or 256
        need = req.num_prompt_tokens + out_len
        ctx = req.num_prompt_tokens + out_len / 2
        dst = min(self.decode, key=lambda n: self.decode_score(views[n], need, ctx))
        return dst, req.num_prompt_tokens

    def transfer_time_s(self, src: str, dst: str, num_tokens: int) -> float:
        return kv_move_time_s(self.plans[src], self.plans[dst], self.link_between(src, dst), num_tokens)


def kv_move_time_s(sp: InstancePlan, dp: InstancePlan, link: LinkSpec, num_tokens: int) -> float:
    """KV of ``num_tokens`` tokens from instance ``sp`` to ``dp``; converted (one memory pass) when block
    size, dtype, KV layout or TP degree differ."""
    sc, dc = sp.cost, dp.cost
    conversion = (
        sp.block_size != dp.block_size
        or sc.kv_cache_dtype != dc.kv_cache_dtype
        or sc.tp != dc.tp
        or sc.device.kv_layout != dc.device.kv_layout
    )
    return sc.kv_transfer_time_s(
        num_tokens, link, src_dtype=sc.kv_cache_dtype, dst_dtype=dc.kv_cache_dtype, conversion=conversion
    )
