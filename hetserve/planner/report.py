"""The planner's output: a ranked table with the reason each loser lost, a JSON summary, and the winner as a
deployment config that ``hetserve simulate --config`` and ``hetserve serve --config`` read."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from hetserve.planner.search import CandidateResult, PlanResult


def _goodput_cell(r: CandidateResult) -> str:
    if r.status == "simulated":
        if r.goodput_below is not None:
            return f"< {r.goodput_below:.2f}"
        return f"{r.goodput_rps:.2f}"
    return "-"


def format_table(result: PlanResult, width: int = 150) -> str:
    """Rank, candidate, $/h, analytic estimate, simulated goodput, score, and why it lost."""
    unit = "req/s per $/h" if result.objective == "cost" else "req/s"
    head = f"{'#':>3}  {'strategy':8} {'$/h':>6} {'est':>7} {'goodput':>8} {'score':>8}  candidate / reason"
    ws, st = result.workload_summary, result.settings
    lines = [
        f"objective: {result.objective} ({unit}); SLO: {result.slo.as_dict()}; >= 90% of requests within it",
        (
            f"workload: {ws['num_requests']:.0f} sampled requests, mean prompt {ws['mean_prompt_tokens']:.0f}, mean output "
            f"{ws['mean_output_tokens']:.0f} tokens; {st.window_s:g} s of Poisson arrivals per rate (at most "
            f"{st.max_requests} requests), the first {st.warmup_fraction:.0%} not judged"
        ),
        head,
        "-" * min(width, len(head) + 40),
    ]
    indent = " " * 47
    for i, r in enumerate(result.ranked, 1):
        c = r.candidate
        score = f"{r.score:.3g}" if r.status == "simulated" and r.goodput_below is None else "-"
        est = f"{c.estimate_rps:.1f}" if c.estimate_rps else "-"
        lines.append(
            f"{i:>3}  {c.strategy:8} {c.price_per_hour:>6.2f} {est:>7} {_goodput_cell(r):>8} {score:>8}  {c.name}"
        )
        tag = {"simulated": "", "pruned": "pruned: ", "not_simulated": "not simulated: ", "error": "error: "}[r.status]
        for ln in textwrap.wrap(tag + r.reason, max(40, width - len(indent))):
            lines.append(indent + ln)
    lines.append(
        f"{len(result.ranked)} candidates, {result.num_simulations} simulations on {result.num_workers} "
        f"process(es) in {result.elapsed_s:.1f} s"
    )
    return "\n".join(lines)


def _result_dict(r: CandidateResult) -> dict[str, Any]:
    return {
        "name": r.candidate.name,
        "strategy": r.candidate.strategy,
        "status": r.status,
        "devices": list(r.candidate.device_ids),
        "price_per_hour": r.candidate.price_per_hour,
        "estimate_rps": r.candidate.estimate_rps,
        "goodput_rps": r.goodput_rps,
        "goodput_below_rps": r.goodput_below,
        "score": r.score,
        "reason": r.reason,
        "at_goodput": r.at_goodput,
        "at_fail": r.at_fail,
        "num_simulations": r.num_simulations,
        "sim_cpu_s": r.sim_cpu_s,
        "config": r.candidate.config,
    }


def plan_to_dict(result: PlanResult) -> dict[str, Any]:
    return {
        "objective": result.objective,
        "slo": result.slo.as_dict(),
        "good_fraction": 0.9,
        "settings": {k: getattr(result.settings, k) for k in result.settings.__dataclass_fields__},
        "workload": result.workload_summary,
        "elapsed_s": result.elapsed_s,
        "num_workers": result.num_workers,
        "num_simulations": result.num_simulations,
        "ranked": [_result_dict(r) for r in result.ranked],
    }


def winner_config(result: PlanResult, cluster: str | dict[str, Any], model: str | dict[str, Any]) -> dict[str, Any]:
    """The winner as a deployment config: ``strategy``, ``cluster``, ``model``, its parameters, and what the
    planner predicted (``predicted``, ignored by the builder)."""
    w = result.winner
    cfg: dict[str, Any] = {"strategy": w.candidate.strategy, "cluster": cluster, "model": model}
    cfg.update({k: v for k, v in w.candidate.config.items() if k != "strategy"})
    runner_up = next((r for r in result.ranked[1:] if r.status == "simulated"), None)
    predicted: dict[str, Any] = {
        "name": w.candidate.name,
        "objective": result.objective,
        "slo": result.slo.as_dict(),
        "goodput_rps": round(w.goodput_rps, 3),
        "score": w.score,
        "price_per_hour": w.candidate.price_per_hour,
        "window_s": result.settings.window_s,
    }
    if runner_up is not None:
        predicted["runner_up"] = runner_up.candidate.name
        if runner_up.goodput_below is not None:  # it lost a challenge: only a bound is known
            predicted["runner_up_goodput_below_rps"] = round(runner_up.goodput_below, 3)
            predicted["margin_at_least"] = round(w.goodput_rps / runner_up.goodput_below, 3)
        elif runner_up.goodput_rps > 0:
            predicted["runner_up_goodput_rps"] = round(runner_up.goodput_rps, 3)
            predicted["margin"] = round(w.goodput_rps / runner_up.goodput_rps, 3)
    cfg["predicted"] = predicted
    return cfg


def write_config(cfg: dict[str, Any], path: str | Path) -> Path:
    """YAML for ``.yaml``/``.yml``, JSON otherwise."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
    else:
        p.write_text(json.dumps(cfg, indent=2) + "\n")
    return p
