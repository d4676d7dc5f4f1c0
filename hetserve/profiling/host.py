"""Host-side costs of the engine around one device's runner: what the per-layer tables do not see.

Measured through the engine itself (an ``LLMEngine`` with the profiled runner as its executor; the embedded
tiny model's tokenizer serves the text layer, which token-id prompts barely touch), so scheduling, the
runner's input preparation, the sampled tokens' read-back and output assembly are all inside the clock:

* ``step_overhead_s``: an engine decode step of one request, minus the tables' prediction of its parts.
* ``step_overhead_per_seq_s``: the slope of that residual over the grid's two largest decode batches <= 64.
* ``new_seq_overhead_s`` / ``new_seq_overhead_per_token_s``: ``add_request`` plus the request's first step
  (its whole prompt in one step, nothing else running), minus the tables and the two terms above; a line
  through three prompt lengths (slope clamped at 0).
* ``idle_wake_s``: the engine sleeps ``idle_s``, takes a new request in and runs its first step; minus the
  same done right after (warm); paired, median of the differences, per idle gap. The clock starts when the
  sleep should end, so a late wake-up counts, as it does for a request that reaches an idle server.

Steps are reduced with the profile's statistic (minimum on CPU, median on GPU); only the wake-up, a
difference of two noisy times, always takes the median of its pairs.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetserve.planner.profile import DeviceProfile, Table1D

Reduce = Callable[[Sequence[float]], float]


@dataclass
class HostCosts:
    step_overhead_s: float
    step_overhead_per_seq_s: float
    new_seq_overhead_s: float
    new_seq_overhead_per_token_s: float
    idle_wake: Table1D | None
    validation: list[dict[str, Any]] = field(default_factory=list)


def table_parts_s(profile: DeviceProfile, num_layers: int, chunks: Sequence[tuple[int, int]],
                  decode_ctxs: Sequence[float]) -> float:
    """The tables' time for one step: ``chunks`` = (new tokens, cached tokens) of prefill rows, ``decode_ctxs``
    = cached tokens of each decode row; one sampled row per request."""
    T = sum(n for n, _ in chunks) + len(decode_ctxs)
    attn = 0.0
    if decode_ctxs and profile.decode_attn is not None:
        attn += profile.decode_attn(len(decode_ctxs), sum(decode_ctxs) / len(decode_ctxs))
    if profile.prefill_attn is not None:
        attn += sum(profile.prefill_attn(n, c) for n, c in chunks)
    rows = len(chunks) + len(decode_ctxs)
    lm = profile.lm_head(rows) if profile.lm_head is not None else 0.0
    return num_layers * (profile.dense(T) + attn) + lm


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` with ``b >= 0`` and ``a >= 0`` (a cost never shrinks with more work)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    if b < 0:
        b = 0.0
    a = my - b * mx
    if a < 0:
        a = 0.0
        sx2 = sum(x * x for x in xs)
        b = max(0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sx2) if sx2 > 0 else 0.0
    return a, b


def monotone(ys: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest ``ys`` in least squares (pool adjacent violators): a longer idle
    gap never leaves the engine warmer, so a dip between gaps is noise, averaged with its neighbours."""
    blocks: list[list[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]


class HostProbe:
    """Drives an ``LLMEngine`` around ``runner`` with token-id prompts; ``sync`` waits for the device. The engine
    runs without async scheduling: each step's time is then its host and device parts in series, the sum the cost
    model's terms describe (it overlaps them itself for an async instance)."""

    def __init__(self, runner: Any, *, max_prompt_tokens: int, seed: int = 0, vocab_size: int = 512) -> None:
        from hetserve.core.config import EngineConfig
        from hetserve.engine.llm_engine import LLMEngine
        from hetserve.tiny.make_tiny import default_model_dir

        bs = runner.block_size
        max_len = min(2048, (runner.num_kv_blocks - 1) * bs)
        budget = max(2048, max_prompt_tokens)
        cfg = EngineConfig.from_kwargs(str(default_model_dir()), block_size=bs, num_blocks=runner.num_kv_blocks,
                                       max_num_seqs=64, max_num_batched_tokens=budget, max_model_len=max_len,
                                       enable_prefix_caching=False, async_scheduling=False)
        self.engine = LLMEngine(cfg, executor=runner)
        self.max_len = max_len
        self._rng = random.Random(seed)
        self._hi = min(vocab_size, self.engine.model_config.vocab_size)
        self._ids = 0

    def _prompt(self, n: int) -> list[int]:
        return [self._rng.randrange(10, self._hi) for _ in range(n)]

    def _add(self, n: int, max_tokens: int) -> str:
        from hetserve.core.sampling_params import SamplingParams

        self._ids += 1
        rid = f"host{self._ids}"
        self.engine.add_request(rid, self._prompt(n), SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False))
        return rid

    def fits(self, prompt_tokens: int, extra: int = 0) -> bool:
        return prompt_tokens + extra + 1 < self.max_len

    def decode_steps_s(self, num_seqs: int, ctx: int, warmup: int, repeat: int) -> tuple[list[float], float]:
        """Engine decode steps of ``num_seqs`` requests from ``ctx`` cached tokens on: (their times, the mean
        context over the timed steps)."""
        steps = warmup + repeat
        rids = [self._add(ctx, steps + 2) for _ in range(num_seqs)]
        self.engine.step()  # the prompts, all in one step
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            self.engine.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        self.engine.abort_request(rids)
        self.engine.step()  # the runner forgets them
        return times, ctx + 1 + warmup + (repeat - 1) / 2

    def new_request_s(self, prompt_tokens: int, sleep_s: float = 0.0) -> float:
        """Seconds from the request's arrival (the end of an idle ``sleep_s``) to its first token: add_request
        and its first step; a second step then finishes it (not timed)."""
        t0 = time.perf_counter()
        if sleep_s > 0:
            t0 += sleep_s
            time.sleep(sleep_s)
        self._add(prompt_tokens, 2)
        self.engine.step()
        dt = time.perf_counter() - t0
        self.engine.step()
        return dt


def measure_host_costs(runner: Any, profile: DeviceProfile, num_layers: int, *, decode_num_seqs: Sequence[int],
                       decode_ctx: int, prompt_lengths: Sequence[int], idle_s: Sequence[float], warmup: int,
                       repeat: int, reduce: Reduce, seed: int = 0, log: Callable[[str], None] | None = None,
                       ) -> HostCosts:
    """All host terms (see the module docstring); the caller puts the runner's device stream current."""
    say = log or (lambda _m: None)
    lengths = sorted(set(prompt_lengths))
    # decode: batch 1 fixes the step overhead, the two largest grid batches up to 64 its per-request slope (the
    # regime a loaded server runs in: per-request host work measured at a few requests under-states it there);
    # three rounds over the batch sizes, so that a change in machine load hits them alike
    batches = [1, *[b for b in decode_num_seqs if 1 < b <= 64][-2:]]
    probe = HostProbe(runner, max_prompt_tokens=max([decode_ctx * batches[-1], *lengths]), seed=seed)
    lengths = [n for n in lengths if probe.fits(n)] or [min(16, probe.max_len // 4)]
    out: list[dict[str, Any]] = []
    reps = max(5, repeat)
    rounds = 3
    times: dict[int, list[float]] = {b: [] for b in batches}
    ctxs: dict[int, float] = {}
    for _ in range(rounds):
        for b in batches:
            ts, ctxs[b] = probe.decode_steps_s(b, decode_ctx, warmup, -(-reps // rounds))
            times[b].extend(ts)
    measured = {b: reduce(times[b]) for b in batches}
    parts = {b: table_parts_s(profile, num_layers, [], [ctxs[b]] * b) for b in batches}
    overhead = max(0.0, measured[1] - parts[1])
    slopes = [(measured[b] - parts[b] - overhead) / (b - 1) for b in batches[1:]]
    per_seq = max(0.0, statistics.median(slopes)) if slopes else 0.0
    for b in batches:
        out.append({"kind": "engine decode", "num_seqs": b, "context_len": round(ctxs[b]), "measured_s": measured[b],
                    "parts_s": parts[b], "predicted_s": parts[b] + overhead + b * per_seq})
    say(f"  engine step overhead {overhead * 1e6:.0f} us + {per_seq * 1e6:.1f} us per request")
    if measured[1] < parts[1]:  # the whole step took less than its parts: the machine's speed changed
        out.append({"kind": "warning", "message": (
            f"an engine decode step ({measured[1] * 1e6:.0f} us) measured faster than its table parts "
            f"({parts[1] * 1e6:.0f} us): the tables and the engine steps saw different machine speeds; "
            "measure again on a quieter machine")})
        say(f"  WARNING: {out[-1]['message']}")

    # a new request alone: add_request + its first step, lengths interleaved
    new_times: dict[int, list[float]] = {n: [] for n in lengths}
    for i in range(warmup + reps):
        for n in lengths:
            t = probe.new_request_s(n)
            if i >= warmup:
                new_times[n].append(t)
    residuals = []
    for n in lengths:
        m = reduce(new_times[n])
        known = table_parts_s(profile, num_layers, [(n, 0)], []) + overhead + per_seq
        residuals.append(m - known)
        out.append({"kind": "engine new request", "prompt_tokens": n, "measured_s": m, "parts_s": known})
    new_a, new_b = fit_line([float(n) for n in lengths], residuals)
    say(f"  new request {new_a * 1e6:.0f} us + {new_b * 1e9:.0f} ns per prompt token")

    # idle wake-up: each cold request paired with a warm one right after it
    wake = None
    gaps = sorted(set(idle_s))
    if gaps:
        n = lengths[len(lengths) // 2]
        diffs: dict[float, list[float]] = {g: [] for g in gaps}
        for _ in range(max(1, warmup)):
            probe.new_request_s(n)
        for _ in range(reps):
            for g in gaps:
                cold = probe.new_request_s(n, sleep_s=g)
                warm = probe.new_request_s(n)
                diffs[g].append(cold - warm)
        ys = monotone([max(0.0, statistics.median(diffs[g])) for g in gaps])
        wake = Table1D(tuple(float(g) for g in gaps), tuple(ys))
        out.append({"kind": "engine idle wake", "prompt_tokens": n, "idle_s": list(gaps),
                    "extra_s": list(ys), "pairs": reps})
        say("  idle wake " + ", ".join(f"{g * 1e3:g} ms: +{y * 1e6:.0f} us" for g, y in zip(gaps, ys, strict=True)))
    return HostCosts(overhead, per_seq, new_a, new_b, wake, out)
