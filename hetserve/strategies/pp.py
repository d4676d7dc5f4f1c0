"""Pipeline parallelism over unequal devices: one engine whose layers are split in proportion to speed.

The split minimises the slowest stage's time for a representative batch (the pipeline's throughput is
set by it), subject to every stage holding its weights plus the KV of ``min_kv_tokens`` tokens for its
layers. Among splits within ``time_tolerance`` of the best, the one with the largest KV pool wins. Several
pipelines are routed among like DP replicas; micro-batches in flight are the simulator's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetserve.core.devices import DeviceSpec
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import BatchShape, CostModel
from hetserve.planner.profile import DeviceProfile
from hetserve.strategies.dp import DPDeployment

# a step with one 256-token prefill chunk beside 32 decodes at 1k context: what a busy pipeline runs
REPRESENTATIVE_BATCH = BatchShape(((256, 0),), 32, 32 * 1024)


@dataclass(frozen=True)
class StageDevice:
    """One pipeline stage's device and the memory the engine may plan with on it."""

    spec: DeviceSpec
    memory_bytes: int
    profile: DeviceProfile | None = None


class _PerLayer:
    """Time and memory of ``n`` layers of ``model`` on one device, as affine functions of ``n`` (plus the
    embedding on the first stage and the LM head on the last), from three one-layer cost models."""

    def __init__(
        self,
        model: ModelConfig,
        dev: StageDevice,
        dtype: str,
        shape: BatchShape,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        L = model.num_hidden_layers

        def cm(first: bool, last: bool) -> CostModel:
            return CostModel(
                model, dev.spec, dtype, dev.profile, layers=(0, 1), include_embedding=first, include_lm_head=last
            )

        mid, first, last = cm(False, False), cm(True, False), cm(False, True)
        self.overhead_s = mid.step_overhead_s
        self.layer_s = mid.step_time_s(shape) - self.overhead_s
        self.first_extra_s = first.step_time_s(shape) - self.overhead_s - self.layer_s
        self.last_extra_s = last.step_time_s(shape) - self.overhead_s - self.layer_s
        self.layer_bytes = mid.weight_bytes()
        self.first_extra_bytes = first.weight_bytes() - self.layer_bytes
        self.last_extra_bytes = last.weight_bytes() - self.layer_bytes
        fp_mid = mid.memory_footprint(max_num_seqs, max_num_batched_tokens, dev.memory_bytes)
        fp_last = last.memory_footprint(max_num_seqs, max_num_batched_tokens, dev.memory_bytes)
        self.free_bytes = fp_mid["budget_bytes"] - fp_mid["reserved_bytes"] - fp_mid["activation_bytes"]
        self.last_activation_extra = fp_last["activation_bytes"] - fp_mid["activation_bytes"]
        self.kv_bytes_per_token_layer = mid.kv_bytes_per_token()
        self.num_layers_total = L

    def time_s(self, start: int, end: int) -> float:
        t = self.overhead_s + (end - start) * self.layer_s
        if start == 0:
            t += self.first_extra_s
        if end == self.num_layers_total:
            t += self.last_extra_s
        return t

    def kv_tokens(self, start: int, end: int) -> int:
        free = self.free_bytes - (end - start) * self.layer_bytes
        if start == 0:
            free -= self.first_extra_bytes
        if end == self.num_layers_total:
            free -= self.last_extra_bytes + self.last_activation_extra
        if free <= 0:
            return 0
        return int(free // ((end - start) * self.kv_bytes_per_token_layer))


def choose_layer_split(
    model: ModelConfig,
    stages: Sequence[StageDevice],
    *,
    dtype: str = "bfloat16",
    shape: BatchShape = REPRESENTATIVE_BATCH,
    min_kv_tokens: int = 8192,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    time_tolerance: float = 0.02,
) -> tuple[tuple[int, int], ...]:
    """Layer ranges ``(start, end)`` per stage, in order, covering every layer; each stage gets >= 1.

    Exact over all contiguous splits (dynamic programming, O(stages x layers^2)). Raises ValidationError
    (field ``layers``) when no split fits every stage's weights plus ``min_kv_tokens`` of KV.
    """
    L = model.num_hidden_layers
    S = len(stages)
    if S == 0:
        raise ValidationError("devices", "a pipeline needs at least one device")
    if S > L:
        raise ValidationError("devices", f"{S} stages for {L} layers: each stage needs at least one layer")
    per = [_PerLayer(model, d, dtype, shape, max_num_seqs, max_num_batched_tokens) for d in stages]

    def ok(i: int, a: int, b: int) -> bool:
        return per[i].kv_tokens(a, b) >= min_kv_tokens

    inf = float("inf")
    # best[i][l]: lowest bottleneck time of stages 0..i-1 covering layers [0, l)
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for i in range(S):
        for a in range(i, L):
            if best[i][a] == inf:
                continue
            hi = L - (S - i - 1)
            for b in range(a + 1, hi + 1):
                if (i == S - 1 and b != L) or not ok(i, a, b):
                    continue
                t = max(best[i][a], per[i].time_s(a, b))
                best[i + 1][b] = min(best[i + 1][b], t)
    t_best = best[S][L]
    if t_best == inf:
        names = ", ".join(d.spec.name for d in stages)
        raise ValidationError(
            "layers", f"no split of {L} layers over [{names}] fits weights + {min_kv_tokens} KV tokens on every stage"
        )
    limit = t_best * (1 + time_tolerance)
    # second pass: the largest KV pool (the smallest stage's) among splits with every stage within the limit
    cap: list[list[float]] = [[-1.0] * (L + 1) for _ in range(S + 1)]
    back: list[list[int]] = [[-1] * (L + 1) for _ in range(S + 1)]
    cap[0][0] = inf
    for i in range(S):
        for a in range(i, L):
            if cap[i][a] < 0:
                continue
            hi = L - (S - i - 1)
            for b in range(a + 1, hi + 1):
                if (i == S - 1 and b != L) or per[i].time_s(a, b) > limit:
                    continue
                c = min(cap[i][a], per[i].kv_tokens(a, b))
                if c >= min_kv_tokens and c > cap[i + 1][b]:
                    cap[i + 1][b] = c
                    back[i + 1][b] = a
    out: list[tuple[int, int]] = []
    b = L
    for i in range(S, 0, -1):
        a = back[i][b]
        out.append((a, b))
        b = a
    return tuple(reversed(out))


class PPDeployment(DPDeployment):
    """One or more pipelines (instances with several stages); requests are routed among them as in DP."""

    strategy = "pp"
