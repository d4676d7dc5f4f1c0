"""The simulator side of ``gpu_cluster.py``: a run's prediction, the rate scan without a GPU (``--sim-only``),
and the model and deployment config both sides build (also used by ``cluster_resim.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# pd-tp2: the prefill TP group's share of each GPU's memory and the decode instance's share of the high-end GPU
PD_TP2_MEMORY = {"prefill": 0.3, "decode": 0.65}
# the MPS clients' own profiles (measured on the H100 by benchmarks/gpu_cluster_run.sh in session 2)
DEFAULT_PROFILES = "H100-MPS75=profiles/h100-mps75-llama-3.1-8b.json,H100-MPS25=profiles/h100-mps25-llama-3.1-8b.json"


def truncated_8b(parent: Path, layers: int) -> Path:
    """``parent/llama-3.1-8b-<layers>l`` holding Llama-3.1-8B's config.json cut to ``layers`` decoder layers (the
    profiles are per layer, so one set of tables predicts any depth)."""
    model_dir = parent / f"llama-3.1-8b-{layers}l"
    model_dir.mkdir(parents=True, exist_ok=True)
    raw = json.loads((ROOT / "examples/models/llama-3.1-8b/config.json").read_text())
    raw["num_hidden_layers"] = layers
    (model_dir / "config.json").write_text(json.dumps(raw, indent=1))
    return model_dir


def strategies(hi: str, lo: str, cronus_tbt_ms: float) -> dict[str, dict[str, Any]]:
    """name -> (strategy, instances, deployment params). 'lp' = prefill on the low-end device."""
    return {
        "high-alone": {"strategy": "dp", "instances": [{"name": "hi", "devices": [hi]}]},
        "low-alone": {"strategy": "dp", "instances": [{"name": "lo", "devices": [lo]}]},
        "dp": {"strategy": "dp", "instances": [{"name": "hi", "devices": [hi]}, {"name": "lo", "devices": [lo]}]},
        "pp": {"strategy": "pp", "instances": [{"name": "pp0", "devices": [hi, lo], "layers": "auto"}]},
        "pd-lp": {"strategy": "pd", "instances": [{"name": "prefill0", "role": "prefill", "devices": [lo]},
                                                  {"name": "decode0", "role": "decode", "devices": [hi]}]},
        "pd-hp": {"strategy": "pd", "instances": [{"name": "prefill0", "role": "prefill", "devices": [hi]},
                                                  {"name": "decode0", "role": "decode", "devices": [lo]}]},
        "cronus": {"strategy": "cronus",
                   "instances": [{"name": "head0", "role": "head", "devices": [lo]},
                                 {"name": "main0", "role": "main", "devices": [hi]}],
                   "params": {"split_policy": {"kind": "adaptive", "tbt_slo_ms": cronus_tbt_ms}}},
        "hetis": {"strategy": "hetis",
                  "instances": [{"name": "main0", "role": "main", "devices": [hi], "workers": [{"device": lo}]}]},
        "pd-tp2": {"strategy": "pd", "instances": [
            {"name": "prefill0", "role": "prefill", "devices": [hi, lo], "memory_fraction": PD_TP2_MEMORY["prefill"]},
            {"name": "decode0", "role": "decode", "devices": [hi], "memory_fraction": PD_TP2_MEMORY["decode"]}]},
    }


def strategy_config(spec: dict[str, Any], dtype: str, max_model_len: int) -> dict[str, Any]:
    """The deployment config (``build_deployment`` / ``from_cluster``) of a ``gpu_cluster.strategies`` entry."""
    return {"strategy": spec["strategy"], "dtype": dtype, "max_model_len": max_model_len,
            "instances": spec["instances"], **spec.get("params", {})}


def run_sim(cluster: Any, mc: Any, cfg: dict[str, Any], profiles: dict[str, Any], engine: Any, wl: list[Any],
            slo: Any) -> dict[str, Any]:
    import dataclasses

    from hetserve.sim.contention import shared_gpu_contention
    from hetserve.sim.simulator import Simulator
    from hetserve.strategies.build import build_deployment

    dep = build_deployment(cluster, mc, cfg, profiles)
    for name, plan in list(dep.plans.items()):  # the sizes the real workers ended up with
        real = None if engine is None else engine.deployment.plans.get(name)
        if real is not None:
            dep.plans[name] = dataclasses.replace(plan, num_kv_blocks=real.num_kv_blocks,
                                                  max_model_len=real.max_model_len)
    m = Simulator(dep, contention=shared_gpu_contention(cluster, dep)).run(wl).metrics(slo)
    m["good_fraction"] = (m["request_goodput"] or 0) * m["duration"] / max(1, len(wl))
    return m


def sim_only(args: Any, rates: list[float], rates_for: dict[str, list[float]], trace: Path | None, slo: Any,
             traces: list[str] | None = None, trace_rates: dict[str, list[float]] | None = None) -> int:
    """``--sim-only``: the simulator alone for every strategy and rate (no GPU, no workers), to choose rates."""
    import tempfile

    from gpu_cluster import FALLBACK, arrival_seed, find_trace, rates_of, workload
    from gpu_cluster_devices import roles

    from hetserve.core.cluster import load_cluster
    from hetserve.core.model_config import ModelConfig
    from hetserve.planner.profile_set import load_profile_set

    cluster = load_cluster(str(ROOT / args.cluster))
    profiles = {n: p for n, (p, _) in load_profile_set(args.profiles.split(","), "--profiles", ROOT).items()}
    mc = ModelConfig.from_path(truncated_8b(Path(tempfile.mkdtemp()), args.layers))
    table = strategies(*roles(cluster), args.cronus_tbt_ms)
    traces = traces or [args.trace]
    for tr in traces:
        tr_file = trace if tr == traces[0] else find_trace(tr)
        for name in [s for s in args.strategies.split(",") if s]:
            cfg = strategy_config(table[name], "bfloat16", args.max_input + args.max_output + 16)
            for rate in rates_of(tr, name, rates, trace_rates or {}, rates_for):
                n = max(args.num_requests, int(rate * args.span_s + 0.5))
                wl = workload(tr_file, n, rate, args.max_input, args.max_output, seed=arrival_seed(rate, 0), scale=1,
                              fallback=FALLBACK[tr])
                m = run_sim(cluster, mc, cfg, profiles, None, wl, slo)
                print(f"{tr + ' ' if len(traces) > 1 else ''}"
                      f"{name:11s} {rate:6.1f} req/s n={n:4d}  good {m['good_fraction']:5.1%}  TTFT p50/p99 "
                      f"{m['p50_ttft_ms']:8.1f}/{m['p99_ttft_ms']:8.1f} ms  ITL p99 {m['p99_itl_ms']:7.1f} ms  "
                      f"{m['output_throughput']:7.0f} tok/s", flush=True)
    return 0
