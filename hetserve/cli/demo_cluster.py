"""``hetserve demo --cluster cpu-pair``: DP, PP, PD, Cronus and Hetis over CPU worker processes on one short
trace, one comparison table.

The trace is the Azure conversation excerpt (tests/data/azure_conv_excerpt.csv), scaled down to the tiny
model (prompt and output lengths divided, arrivals compressed). On cpu-pair one worker is paced to half speed:
the computation is real, the wait after each step is emulation (``paced_cpu`` in the cluster file), and every
row says so. A strategy the runtime cannot run yet is listed with the reason instead of a row.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

_TRACE = Path(__file__).resolve().parents[2] / "tests" / "data" / "azure_conv_excerpt.csv"
STRATEGIES = ("dp", "pp", "pd", "cronus", "hetis")
SLO_TTFT_MS = 20.0  # the goodput column counts requests within both (tiny model, CPU: milliseconds)
SLO_TPOT_MS = 5.0
# PD and Cronus move KV into a receiver declared as block 32, HND: converted on the wire, NHD in its runner
_KV_CONVERT = {"pd": ("decode0", 32), "cronus": ("main0", 32)}


def load_trace(path: Path, num_requests: int, time_scale: float) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt_len, output_len) of the first requests, scaled to a tiny model."""
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            rows.append(r)
            if len(rows) >= num_requests:
                break
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    out = []
    for r in rows:
        t = (datetime.fromisoformat(r["TIMESTAMP"][:26]) - t0).total_seconds() * time_scale
        out.append((t, max(4, min(96, int(r["ContextTokens"]) // 8)), max(2, min(24, int(r["GeneratedTokens"]) // 4))))
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def replay(engine: Any, trace: list[tuple[float, int, int]], slo_ttft_s: float = SLO_TTFT_MS / 1e3,
           slo_tpot_s: float = SLO_TPOT_MS / 1e3) -> dict[str, float]:
    """Send the trace at its arrival times through an LLMEngine-like engine; latency percentiles, throughput and
    goodput (requests/s finishing within both SLOs)."""
    from hetserve.core.sampling_params import SamplingParams

    start = time.monotonic()
    arrivals: dict[str, float] = {}
    first: dict[str, float] = {}
    ttft: list[float] = []
    tpot: list[float] = []
    num_tokens = 0
    errors = 0
    num_good = 0
    i = 0
    while i < len(trace) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while i < len(trace) and trace[i][0] <= now:
            _, plen, olen = trace[i]
            rid = str(i)
            engine.add_request(rid, [1 + (i * 13 + j) % 500 for j in range(plen)],
                               SamplingParams(max_tokens=olen, temperature=0.0, ignore_eos=True))
            arrivals[rid] = time.monotonic()
            i += 1
        for o in engine.step():
            t = time.monotonic()
            c = o.outputs[0]
            if c.token_ids and o.request_id not in first:
                first[o.request_id] = t
                ttft.append(t - arrivals[o.request_id])
            if o.finished:
                if c.finish_reason == "error":
                    errors += 1
                    continue
                num_tokens += len(c.token_ids)
                req_tpot = 0.0
                if len(c.token_ids) > 1:
                    req_tpot = (t - first[o.request_id]) / (len(c.token_ids) - 1)
                    tpot.append(req_tpot)
                if first[o.request_id] - arrivals[o.request_id] <= slo_ttft_s and req_tpot <= slo_tpot_s:
                    num_good += 1
    dur = time.monotonic() - start
    return {"ttft_p50_ms": 1e3 * _pct(ttft, 0.5), "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
            "tpot_p50_ms": 1e3 * _pct(tpot, 0.5), "tpot_p99_ms": 1e3 * _pct(tpot, 0.99),
            "tok_per_s": num_tokens / dur, "req_per_s": len(trace) / dur, "goodput_rps": num_good / dur,
            "errors": errors, "mean_ttft_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan")}


def _placement(engine: Any, cluster: Any) -> str:
    from hetserve.server.cluster import attention_devices

    """Each instance's role, devices and emulation, e.g. "decode0 decode cpu-half paced at 0.5x, emulated"."""
    parts = []
    for name, inst in engine.instances.items():
        plan = engine.deployment.plans[name]
        devs = [cluster.device(d) for d in plan.device_ids]
        where = "+".join(d.spec.name for d in devs)
        speed = getattr(inst.worker.spec, "speed", 1.0)
        emulated = any(d.emulation for d in devs)
        pace = f" paced at {speed:g}x" if speed != 1.0 else ""
        attn = attention_devices(engine, name)
        if attn:
            pace += " + attention on " + "+".join(_paced(cluster.device(d)) for d in attn)
        parts.append(f"{name} {plan.role} {where}{pace}{', emulated' if emulated else ''}")
    return "; ".join(parts)


def _paced(dev: Any) -> str:
    """A device type name with its emulated pace, read from the cluster's declaration ("... paced to 0.5x")."""
    emu = dev.emulation or ""
    return f"{dev.spec.name} paced at {emu.rsplit(' ', 1)[-1]}" if "paced to" in emu else dev.spec.name


def _engine_for(model: str, cluster: Any, strategy: str) -> Any:
    from hetserve.runtime.deploy import from_cluster
    from hetserve.strategies.defaults import default_instances

    kw: dict[str, Any] = {}
    if strategy in _KV_CONVERT:
        name, block = _KV_CONVERT[strategy]
        kw = {"block_sizes": {name: block}, "kv_layouts": {name: "HND"}}
    return from_cluster(model, cluster, strategy, instances=default_instances(strategy, cluster.device_ids),
                        max_model_len=256, num_kv_blocks=256, **kw)


def run_cluster_demo(args: argparse.Namespace) -> int:
    from hetserve.server.cluster import load_cluster_setting, runtime_support
    from hetserve.tiny.make_tiny import default_model_dir

    t0 = time.monotonic()
    model = str(args.model or default_model_dir())
    cluster = load_cluster_setting(args.cluster)
    trace = load_trace(_TRACE, getattr(args, "num_prompts", 24) or 24, 0.05)
    print(f"hetserve demo --cluster {args.cluster}: {len(trace)} requests of the Azure conversation excerpt, "
          f"lengths / 8 (prompt) and / 4 (output), arrivals x 0.05; goodput: TTFT <= {SLO_TTFT_MS:g} ms and "
          f"TPOT <= {SLO_TPOT_MS:g} ms", flush=True)
    results: dict[str, dict[str, float]] = {}
    where: dict[str, str] = {}
    missing: dict[str, str] = {}
    stopping: list[threading.Thread] = []
    for strategy in STRATEGIES:
        reason = runtime_support(strategy)
        if reason is not None:
            missing[strategy] = reason
            continue
        try:
            eng = _engine_for(model, cluster, strategy)
        except Exception as e:  # noqa: BLE001 - one strategy failing to start must not hide the others
            missing[strategy] = f"failed to start: {type(e).__name__}: {e}"
            continue
        try:
            where[strategy] = _placement(eng, cluster)
            print(f"  {strategy}: {where[strategy]}", flush=True)
            results[strategy] = replay(eng, trace)
        finally:
            # workers stop (politely, up to seconds) while the next strategy's start: nothing is measured then
            stopping.append(threading.Thread(target=eng.shutdown, name=f"stop-{strategy}"))
            stopping[-1].start()
    for t in stopping:
        t.join()
    cols = ["ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "tok_per_s", "req_per_s", "goodput_rps",
            "errors"]
    print("\n" + f"{'strategy':<9}" + "".join(f"{c:>12}" for c in cols) + "  instances (emulation)")
    for s, r in results.items():
        print(f"{s:<9}" + "".join(f"{r[c]:>12.1f}" for c in cols) + f"  {where[s]}")
    for s, why in missing.items():
        print(f"{s:<9}  not run: {why}")
    print(f"\nEmulation: the workers are CPU processes on this host; a paced one sleeps after each step until a "
          f"device of that relative speed would have finished. Throughput and goodput are per second of replay "
          f"({time.monotonic() - t0:.0f} s in all).")
    failed = any(r["errors"] for r in results.values()) or any(w.startswith("failed") for w in missing.values())
    return 1 if failed or not results else 0
