"""The planner's analytic estimate of a serving unit (one instance's devices), from the cost model.

For the workload's mean prompt ``P`` and output ``O``: prefill seconds of one prompt, and the largest decode
batch ``B`` whose step stays within 80% of the TPOT SLO (and whose KV fits), giving ``O * step(B) / B`` decode
seconds per request; for built plans (pipelines, Hetis mains) the same from their stages. The candidates
(:mod:`hetserve.planner.candidates`) are ranked by these figures; the simulator decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from hetserve.bench.metrics import Slo
from hetserve.core.cluster import ClusterConfig
from hetserve.core.devices import DeviceSpec
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import BatchShape, CostModel

MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class Unit:
    ids: tuple[str, ...]
    spec: DeviceSpec
    node: str
    memory_bytes: int

    @property
    def tp(self) -> int:
        return len(self.ids)

    @property
    def label(self) -> str:
        return self.spec.name + (f"(tp{self.tp})" if self.tp > 1 else "")


@dataclass(frozen=True)
class UnitFigures:
    prefill_s: float  # one mean prompt, alone
    p90_prefill_s: float
    decode_s: float  # decode seconds per request at the chosen batch (O * step / B)
    decode_rps: float  # requests/s of decode alone
    mixed_rps: float  # requests/s doing both
    kv_tokens: int


class Estimator:
    def __init__(
        self,
        cluster: ClusterConfig,
        model: ModelConfig,
        stats: dict[str, float],
        slo: Slo,
        max_model_len: int,
        dtype: str,
    ) -> None:
        self.cluster, self.model, self.slo, self.dtype = cluster, model, slo, dtype
        self.profiles: dict[str, Any] = {}  # device type name -> DeviceProfile (measured beats the roofline)
        self.max_model_len = max_model_len
        self.P = max(1, int(stats["mean_prompt_tokens"]))
        self.P90 = max(1, int(stats["p90_prompt_tokens"]))
        self.O = max(1.0, stats["mean_output_tokens"])
        self.tpot_s = (slo.tpot_ms or 200.0) / 1000
        self.ttft_s = (slo.ttft_ms or 10_000.0) / 1000
        self.figures = cache(self._figures)
        self.cost = cache(self._cost)

    def _cost(self, unit: Unit) -> CostModel:
        link = None
        if unit.tp > 1:
            from hetserve.strategies.build_instance import slowest_link

            link = slowest_link(self.cluster, list(unit.ids), list(unit.ids))
        prof = self.profiles.get(unit.spec.name)
        return CostModel(self.model, unit.spec, self.dtype, prof, tp=unit.tp, tp_link=link)

    def fits(self, unit: Unit) -> tuple[bool, str]:
        from hetserve.strategies.build_instance import weights_reason

        try:
            c = self.cost(unit)
        except ValidationError as e:
            return False, f"tp {unit.tp} on {unit.spec.name}: {e.message}"
        fp = c.memory_footprint(MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, unit.memory_bytes)
        if fp["max_kv_tokens"] >= self.max_model_len:
            return True, ""
        where = f"{unit.spec.name} ({', '.join(unit.ids)})" + (f" at tp {unit.tp}" if unit.tp > 1 else "")
        return False, weights_reason(
            c, unit.memory_bytes, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, self.max_model_len, where
        )

    def prefill_s(self, cost: CostModel, n: int) -> float:
        t, done = 0.0, 0
        while done < n:
            c = min(MAX_NUM_BATCHED_TOKENS, n - done)
            t += cost.prefill_time_s(c, done)
            done += c
        return t

    def decode_batch(self, step: Any, kv_tokens: int) -> tuple[int, float]:
        """Largest batch whose decode step (``step(B, ctx)``) stays within 80% of the TPOT SLO."""
        ctx = self.P + self.O / 2
        bmax = max(1, min(MAX_NUM_SEQS, int(kv_tokens // (self.P + self.O))))
        lo, hi = 1, bmax
        if step(hi, ctx) <= 0.8 * self.tpot_s:
            return hi, step(hi, ctx)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if step(mid, ctx) <= 0.8 * self.tpot_s:
                lo = mid
            else:
                hi = mid
        return lo, step(lo, ctx)

    def _figures(self, unit: Unit) -> UnitFigures:
        c = self.cost(unit)
        kv = c.memory_footprint(MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, unit.memory_bytes)["max_kv_tokens"]
        b, t = self.decode_batch(lambda n, ctx: c.decode_time_s(n, ctx), kv)
        return self._combine(self.prefill_s(c, self.P), self.prefill_s(c, self.P90), b, t, kv)

    def _combine(self, pf: float, pf90: float, b: int, t: float, kv: int) -> UnitFigures:
        dec = self.O * t / b
        return UnitFigures(pf, pf90, dec, 1 / dec, 1 / (pf + dec), kv)

    def plan_rps(self, plans: list[Any], dispatchers: dict[str, Any]) -> float:
        """Mixed-instance estimate for built plans (pipelines, Hetis mains): throughput from the slowest
        stage, TPOT from the sum of the stages."""
        total = 0.0
        for p in plans:
            d = dispatchers.get(p.name)

            def stages(shape: BatchShape, p: Any = p, d: Any = d) -> list[float]:
                if d is not None:
                    return [d.step_time_s(shape)]
                return [c.step_time_s(shape, p.attention_kv_heads) for c in p.stage_costs]

            kv = (p.num_kv_blocks - 1) * p.block_size
            b, _ = self.decode_batch(lambda n, ctx: sum(stages(BatchShape((), n, int(n * ctx)))), kv)
            ctx = self.P + self.O / 2
            per_mb = max(1, b // p.num_stages)  # micro-batches in flight share the batch
            t = max(stages(BatchShape((), per_mb, int(per_mb * ctx)))) * (b / per_mb)
            pf = self.prefill_s_stages(stages)
            total += self._combine(pf, pf, b, t, kv).mixed_rps
        return total

    def prefill_s_stages(self, stages: Any) -> float:
        t, done = 0.0, 0
        while done < self.P:
            c = min(MAX_NUM_BATCHED_TOKENS, self.P - done)
            t += max(stages(BatchShape(((c, done),))))
            done += c
        return t
