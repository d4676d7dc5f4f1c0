"""The planner: enumerate deployments of a model on a cluster, prune what cannot fit, score the rest in the
simulator and rank them.

Score = goodput: the highest Poisson request rate at which >= 90% of the judged requests meet the SLO (TTFT
and TPOT), each rate one simulation of the engine's own schedulers over ``window_s`` seconds of arrivals
(the first ``warmup_fraction`` of them warm the system up and are not judged), found by bracketing and
geometric bisection. With ``objective="cost"`` the score is goodput per $/hour of the devices used.

Candidates come from :mod:`hetserve.planner.candidates`; an analytic estimate orders them and keeps the
best few per strategy. Each one is first *challenged*: simulated once at the rate it needs to beat the best
score so far by more than the search tolerance; only a candidate that passes is searched in full (branch
and bound), so losers cost one simulation, cut short once 10% of its requests have missed the SLO.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from hetserve.bench.metrics import Slo, percentile, tpot_s
from hetserve.core.cluster import ClusterConfig
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.candidates import Candidate, enumerate_candidates
from hetserve.sim.workload import SimRequest

Objective = Literal["goodput", "cost"]
GOOD_FRACTION = 0.9


@dataclass
class CandidateResult:
    candidate: Candidate
    status: Literal["simulated", "pruned", "not_simulated", "error"]
    goodput_rps: float = 0.0
    goodput_below: float | None = None  # lost a challenge: its goodput is below this rate
    score: float = 0.0
    reason: str = ""
    # figures at the lowest rate that missed the SLO, and at the goodput rate
    at_fail: dict[str, float] = field(default_factory=dict)
    at_goodput: dict[str, float] = field(default_factory=dict)
    num_simulations: int = 0
    sim_cpu_s: float = 0.0


@dataclass
class PlanResult:
    ranked: list[CandidateResult]  # simulated ones by score, then the rest
    objective: Objective
    slo: Slo
    settings: SearchSettings
    elapsed_s: float
    num_workers: int
    workload_summary: dict[str, float]

    @property
    def winner(self) -> CandidateResult:
        best = self.ranked[0]
        if best.status != "simulated" or best.goodput_rps <= 0:
            raise ValidationError("--slo", "no candidate meets the SLO at any request rate; relax it or add devices")
        return best

    @property
    def num_simulations(self) -> int:
        return sum(r.num_simulations for r in self.ranked)


# ---- scoring one candidate ----------------------------------------------------------------------


def _sample_stats(sample: list[SimRequest]) -> dict[str, float]:
    ps = [r.prompt_len for r in sample]
    os_ = [r.output_len for r in sample]
    return {
        "num_requests": len(sample),
        "mean_prompt_tokens": sum(ps) / len(ps),
        "mean_output_tokens": sum(os_) / len(os_),
        "p90_prompt_tokens": percentile(ps, 90),
        "max_prompt_tokens": max(ps),
    }


@dataclass(frozen=True)
class SearchSettings:
    """How each rate is simulated: ``window_s`` seconds of Poisson arrivals, but at least ``min_requests``
    and at most ``max_requests`` requests. A fixed request count would measure how big a burst the cluster
    absorbs (a large cluster swallows 200 requests at any rate); a fixed window measures a sustained rate."""

    window_s: float = 12.0
    min_requests: int = 100
    max_requests: int = 1800
    rel_tol: float = 0.12
    bracket_factor: float = 1.5
    # requests arriving in this leading fraction of the window warm the system up and are not judged
    warmup_fraction: float = 0.4
    max_sims: int = 10
    seed: int = 0
    exhaustive: bool = False  # search every simulated candidate in full (exact goodput for losers too)

    def num_requests(self, rate: float) -> int:
        return max(self.min_requests, min(self.max_requests, math.ceil(rate * self.window_s)))


def _run_once(
    cfg: dict[str, Any],
    cluster: ClusterConfig,
    model: ModelConfig,
    lengths: list[tuple[int, int]],
    unit_arrivals: list[float],
    rate: float,
    slo: Slo,
    n: int,
    warmup_s: float = 0.0,
    profiles: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One simulation at ``rate``; SLO figures over the requests that arrive after ``warmup_s``."""
    from hetserve.sim.contention import shared_gpu_contention
    from hetserve.sim.simulator import Simulator, ttft_lower_bounds_s
    from hetserve.strategies.build import build_deployment

    dep = build_deployment(cluster, model, cfg, profiles)
    wl = [SimRequest(a / rate, p, o) for a, (p, o) in zip(unit_arrivals[:n], lengths[:n])]
    measured = [i for i, r in enumerate(wl) if r.arrival_s >= warmup_s]
    if len(measured) < n // 4:  # a window too short for the warm-up: measure everything
        measured, warmup_s = list(range(n)), 0.0
    m = len(measured)
    max_bad = int((1 - GOOD_FRACTION) * m) + 1
    ttft = slo.ttft_ms / 1000 if slo.ttft_ms is not None else None
    tpot = slo.tpot_ms / 1000 if slo.tpot_ms is not None else None
    sim = Simulator(dep, contention=shared_gpu_contention(cluster, dep))
    res = sim.run(wl, stop_after_bad=(ttft, tpot, max_bad), count_bad_from_s=warmup_s)
    recs = [res.records[i] for i in measured]
    ok = [r for r in recs if r.success]
    ttfts = ttft_lower_bounds_s(sim, warmup_s)
    tpots = [tpot_s(r) for r in ok if r.output_len > 1]
    good = sum(1 for r in ok if slo.is_met(r.ttft_s, tpot_s(r), r.e2el_s))
    bad_ttft = sum(1 for t in ttfts if slo.ttft_ms is not None and t * 1000 > slo.ttft_ms)
    bad_tpot = sum(1 for t in tpots if slo.tpot_ms is not None and t * 1000 > slo.tpot_ms)
    return {
        "rate": rate,
        "num_requests": n,
        "num_measured": m,
        "good_fraction": good / m,
        "bad_ttft": bad_ttft,
        "bad_tpot": bad_tpot,
        "failed": sum(1 for r in recs if r.error and not r.error.startswith("not finished")),
        "stopped_early": float(sim.stopped_early),
        "stopped_at_s": sim.now_s,
        "p90_ttft_s": percentile(ttfts, 90),
        "p90_tpot_s": percentile(tpots, 90),
    }


def score_candidate(
    cand: Candidate,
    cluster: ClusterConfig,
    model: ModelConfig,
    sample: list[SimRequest],
    slo: Slo,
    settings: SearchSettings = SearchSettings(),
    challenge_rps: float | None = None,
    profiles: dict[str, Any] | None = None,
) -> CandidateResult:
    """Goodput of one candidate: bracket the rate (steps of ``bracket_factor`` from the analytic estimate),
    then bisect geometrically until the bracket is within ``rel_tol``. Every rate replays a prefix of one
    sample of lengths with one unit-rate Poisson draw scaled to the rate (common random numbers), so
    candidates and rates differ only in what they should.

    With ``challenge_rps`` (the rate it needs to beat the best so far) one simulation there comes first: if
    it misses the SLO the candidate has lost and ``goodput_below`` records the bound; else the search
    continues upward from it."""
    t0 = time.process_time()
    rng = random.Random(settings.seed)
    unit, t = [], 0.0
    for _ in sample:
        unit.append(t)
        t += rng.expovariate(1.0)
    lengths = [(r.prompt_len, r.output_len) for r in sample]
    res = CandidateResult(cand, "simulated")
    seen: dict[float, dict[str, float]] = {}
    rel_tol, max_sims, f = settings.rel_tol, settings.max_sims, settings.bracket_factor

    def run(rate: float) -> dict[str, float]:
        if rate not in seen:
            n = min(len(sample), settings.num_requests(rate))
            warmup = settings.warmup_fraction * n / rate
            seen[rate] = _run_once(cand.config, cluster, model, lengths, unit, rate, slo, n, warmup, profiles)
            res.num_simulations += 1
        return seen[rate]

    def ok(m: dict[str, float]) -> bool:
        return m["good_fraction"] >= GOOD_FRACTION

    try:
        lo, hi = 0.0, math.inf
        lo_m: dict[str, float] = {}
        hi_m: dict[str, float] = {}
        r = max(cand.estimate_rps, 0.05)
        if challenge_rps is not None:
            m = run(challenge_rps)
            if not ok(m):
                res.goodput_below, res.at_fail = challenge_rps, m
                res.sim_cpu_s = time.process_time() - t0
                return res
            lo, lo_m, r = challenge_rps, m, challenge_rps * f
        while res.num_simulations < max_sims:
            m = run(r)
            if ok(m):
                lo, lo_m = r, m
                if hi < math.inf:
                    break
                r *= f
            else:
                hi, hi_m = r, m
                if lo > 0:
                    break
                r /= f
                if r < 1e-3:
                    break
        while lo > 0 and hi < math.inf and hi / lo > 1 + rel_tol and res.num_simulations < max_sims:
            mid = math.sqrt(lo * hi)
            m = run(mid)
            if ok(m):
                lo, lo_m = mid, m
            else:
                hi, hi_m = mid, m
        res.goodput_rps = lo
        res.at_goodput, res.at_fail = lo_m, hi_m
    except ValidationError as e:
        res.status, res.reason = "error", f"{e.field}: {e.message}"
    res.sim_cpu_s = time.process_time() - t0
    return res


# ---- the search ---------------------------------------------------------------------------------

_G: dict[str, Any] = {}


class _Best:
    """The best score so far, shared by the scoring processes (a lock-free read, a locked update)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> float:
        return float(self.value.value)

    def offer(self, score: float) -> None:
        with self.value.get_lock():
            self.value.value = max(self.value.value, score)


def _challenge(cand: Candidate, best: float, objective: Objective, settings: SearchSettings) -> float | None:
    """The rate ``cand`` must sustain to beat ``best`` by more than the search tolerance (None: no best yet)."""
    if settings.exhaustive or best <= 0:
        return None
    return best * (cand.price_per_hour if objective == "cost" else 1.0) * (1 + settings.rel_tol)


def _score_job(cand: Candidate) -> CandidateResult:
    best: _Best = _G["best"]
    objective: Objective = _G["objective"]
    settings: SearchSettings = _G["settings"]
    res = score_candidate(
        cand,
        _G["cluster"],
        _G["model"],
        _G["sample"],
        _G["slo"],
        settings,
        _challenge(cand, best.get(), objective, settings),
        _G.get("profiles"),
    )
    best.offer(_objective_value(res.goodput_rps, cand, objective))
    return res


def _init_worker(g: dict[str, Any]) -> None:
    _G.update(g)


def _interleave(cands: list[Candidate]) -> list[Candidate]:
    """Best estimate of each strategy first (so strong layouts set the bar early), then the rest."""
    seen: set[str] = set()
    first: list[Candidate] = []
    rest: list[Candidate] = []
    for c in cands:
        (rest if c.strategy in seen else first).append(c)
        seen.add(c.strategy)
    return first + rest


def workload_sample(
    workload: list[SimRequest], num_requests: int, max_model_len: int, seed: int = 0
) -> list[SimRequest]:
    """``num_requests`` requests drawn from the workload's lengths (without replacement while it lasts, then
    with; arrivals are redrawn per rate); prompts are clipped so prompt + output fits ``max_model_len``."""
    if not workload:
        raise ValidationError("--workload", "the workload has no requests")
    rng = random.Random(seed)
    pool = list(workload)
    if len(pool) >= num_requests:
        picks = rng.sample(pool, num_requests)
    else:
        picks = rng.sample(pool, len(pool)) + [rng.choice(pool) for _ in range(num_requests - len(pool))]
    out = []
    for r in picks:
        o = min(r.output_len, max_model_len // 2)
        p = max(1, min(r.prompt_len, max_model_len - o))
        out.append(SimRequest(0.0, p, o))
    return out


def plan(
    cluster: ClusterConfig,
    model: ModelConfig,
    workload: list[SimRequest],
    slo: Slo,
    objective: Objective = "goodput",
    *,
    settings: SearchSettings = SearchSettings(),
    num_workers: int | None = None,
    strategies: tuple[str, ...] | None = None,
    max_simulated_per_strategy: int = 2,
    max_model_len: int = 8192,
    dtype: str = "bfloat16",
    profiles: dict[str, Any] | None = None,
) -> PlanResult:
    """Rank deployments of ``model`` on ``cluster`` for ``workload`` under ``slo`` (see the module doc)."""
    if objective not in ("goodput", "cost"):
        raise ValidationError("--objective", f"must be goodput or cost, got {objective!r}")
    if slo.ttft_ms is None and slo.tpot_ms is None and slo.e2el_ms is None:
        raise ValidationError("--slo", "needs at least one of ttft_ms, tpot_ms, e2el_ms")
    t0 = time.perf_counter()
    sample = workload_sample(workload, settings.max_requests, max_model_len, settings.seed)
    stats = _sample_stats(sample)
    cands, pruned = enumerate_candidates(
        cluster, model, stats, slo, strategies=strategies, max_model_len=max_model_len, dtype=dtype,
        profiles=profiles,
    )
    results = [CandidateResult(c, "pruned", reason=why) for c, why in pruned]
    by_strategy: dict[str, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: -_objective_value(c.estimate_rps, c, objective)):
        by_strategy.setdefault(c.strategy, []).append(c)
    to_sim: list[Candidate] = []
    for strat, cs in by_strategy.items():
        to_sim.extend(cs[:max_simulated_per_strategy])
        for c in cs[max_simulated_per_strategy:]:
            best = cs[0]
            results.append(
                CandidateResult(
                    c,
                    "not_simulated",
                    reason=(
                        f"analytic estimate {c.estimate_rps:.2f} req/s; {max_simulated_per_strategy} {strat} candidates "
                        f"ranked above it (best {best.estimate_rps:.2f}) were simulated instead"
                    ),
                )
            )
    workers = max(1, min(num_workers or min(2, os.cpu_count() or 1), len(to_sim) or 1))
    to_sim = _interleave(sorted(to_sim, key=lambda c: -_objective_value(c.estimate_rps, c, objective)))
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    g = {
        "cluster": cluster,
        "model": model,
        "sample": sample,
        "slo": slo,
        "settings": settings,
        "objective": objective,
        "best": _Best(ctx.Value("d", 0.0)),
        "profiles": profiles or {},
    }
    # each candidate is challenged with the best score at the time it starts: one simulation at the rate it
    # needs to win; only a candidate that passes is searched in full
    if workers > 1:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(g,)) as pool:
            scored = list(pool.imap(_score_job, to_sim, chunksize=1))
    else:
        _init_worker(g)
        scored = [_score_job(c) for c in to_sim]
    for r in scored:
        r.score = _objective_value(r.goodput_rps, r.candidate, objective)
    scored.sort(key=lambda r: (-r.score, r.goodput_below is not None, -(r.goodput_below or 0), r.candidate.name))
    _explain(scored, slo, objective)
    rest = sorted(results, key=lambda r: (r.status != "not_simulated", -r.candidate.estimate_rps))
    return PlanResult(scored + rest, objective, slo, settings, time.perf_counter() - t0, workers, stats)


def _objective_value(goodput: float, cand: Candidate, objective: Objective) -> float:
    if objective == "cost":
        return goodput / max(cand.price_per_hour, 1e-9)
    return goodput


def _why_fail(m: dict[str, float], slo: Slo) -> str:
    if not m:
        return "no failing rate found within the simulation budget"
    rate = f"{m['rate']:.2f} req/s"
    parts = []
    if m["failed"]:
        parts.append(f"{int(m['failed'])} requests could not be served")
    if m["bad_ttft"] >= m["bad_tpot"] and slo.ttft_ms is not None:
        parts.append(f"TTFT SLO missed at {rate} (p90 TTFT {m['p90_ttft_s']:.2f} s > {slo.ttft_ms / 1000:g} s)")
    elif slo.tpot_ms is not None:
        parts.append(f"TPOT SLO missed at {rate} (p90 TPOT {m['p90_tpot_s'] * 1000:.0f} ms > {slo.tpot_ms:g} ms)")
    if not parts:
        parts.append(f"only {m['good_fraction']:.0%} of requests met the SLO at {rate}")
    if m["stopped_early"]:
        parts.append(
            f"run stopped at {m['stopped_at_s']:.1f} s once more than 10% of the {int(m['num_measured'])} "
            "judged requests had missed"
        )
    return "; ".join(parts)


def _explain(scored: list[CandidateResult], slo: Slo, objective: Objective) -> None:
    if not scored:
        return
    best = scored[0]
    unit = "req/s per $/h" if objective == "cost" else "req/s"
    for i, r in enumerate(scored):
        if r.status == "error":
            continue
        fail = _why_fail(r.at_fail, slo)
        if r.goodput_below is not None:
            r.reason = (
                f"goodput below {r.goodput_below:.2f} req/s, the rate it needed to beat the winner by the "
                f"search tolerance: {fail}"
            )
        elif r.goodput_rps <= 0:
            r.reason = f"misses the SLO even at the lowest rate tried: {fail}"
        elif i == 0:
            r.reason = f"winner; limit: {fail}"
        else:
            r.reason = f"score {r.score:.3g} < {best.score:.3g} {unit}; limit: {fail}"
