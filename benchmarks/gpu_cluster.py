"""Issues 7 and 8 on a GPU: every strategy on an emulated high-end + low-end pair, the simulator beside it.

The pair is one H100 split by MPS (``examples/clusters/emulated-h100-mps-pair.yaml``: 75% / 25% of the SMs,
40 / 24 GB pinned-memory caps; HBM bandwidth is shared, which real separate GPUs would not do). Each device runs
its own worker process (an MPS client); the coordinator (this process) runs the same schedulers and strategy
objects as the simulator. The model is Llama-3.1-8B's shape with random bf16 weights made on the GPU, truncated
to ``--layers`` layers so that a run fits the device budget (the profiles are per layer, so the simulator
predicts the truncated model from the same tables). Workload: Azure-conv (``--trace conv``) or Azure-code
(``--trace code``, long prompts and short outputs: the prefill-heavy case) lengths, prompts capped, with Poisson
arrivals at each rate; ``--repeats N`` runs each (strategy, rate) N times with different arrival seeds (repeat k
uses seed ``int(10 * rate) + 1000 * k``, so repeat 0 is the single run of earlier files). Per run: TTFT / TBT
(ITL) P50 and P99, throughput and goodput at the SLO, and the simulator's prediction of the same requests with
its error. Rates run in ascending order, the repeats of a rate together.

A run is cut at ``--run-cap-s`` (default: the arrival span plus the longest time a request may take and still
meet the SLO, + 5 s): whatever is unfinished then could not have met the SLO, so the fraction of good requests is
exact; unfinished requests count as failed and the run says ``cut``. A cut run below 90% good ends that
strategy's higher rates (saturated). The result file is rewritten after every run (``"complete": false`` until
the end), so a run killed by a time limit still leaves what it measured.

    python benchmarks/gpu_cluster.py --strategies dp,pp,pd-lp,pd-hp --rates 4,8,16
    python benchmarks/gpu_cluster.py --trace code --repeats 3 --rates 8,16,24
    python benchmarks/gpu_cluster.py --smoke-cpu          # the same code on the cpu-pair with the tiny model

Results: ``benchmarks/results/gpu-cluster-<tag>-<trace>.json`` (``$OUT/...`` when ``OUT`` is set) with the
command, commit, device, emulation, trace, cluster and config; every repeat is kept, ``cluster_summary.py``
reports medians.

Other cluster files (issue 9: ``--cluster examples/clusters/h200-pair.yaml`` or ``h200-pair-lowend.yaml``): the
high-end and low-end roles, each device's GPU and MPS (only where the file declares it) come from the file
(``gpu_cluster_devices.py``); the emulated MPS pair runs exactly as before. ``--trace conv,code`` runs both traces
on each strategy's workers, one after the other (a start-up saved per strategy; one result file per trace;
``--trace-rates code=4,8,12`` and ``--rates-for code:dp=4,8`` give a trace its own rates). ``pd-tp2``: PD with the
prefill instance at TP 2 over both devices, its decode instance on the high-end device beside it (each with its
share of that GPU's memory: ``memory_fraction``; needs two devices of one type).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu_cluster_devices import describe, gpu_layout, mps_daemon_visible, multicast_off, roles, worker_env
from gpu_cluster_plan import (  # noqa: F401 - re-exported for tests and callers
    FILE_OVERHEAD_S,
    RUN_OVERHEAD_S,
    STARTUP_S,
    TRACES,
    estimate_s,
    parse_rates_for,
    parse_traces,
    rates_of,
)
from gpu_cluster_real import _Capped, run_real  # noqa: F401 - _Capped: tests and callers reach it here
from gpu_cluster_sim import (  # noqa: F401 - PD_TP2_MEMORY re-exported
    DEFAULT_PROFILES,
    PD_TP2_MEMORY,
    run_sim,
    sim_only,
    strategies,
    strategy_config,
    truncated_8b,
)

KEYS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms", "p99_itl_ms",
        "output_throughput", "request_throughput", "request_goodput", "good_fraction", "completed")
def git_commit() -> str:
    f = ROOT / "benchmarks/.commit"
    if f.exists():
        return f.read_text().strip()
    r = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# a user's clone without the data: lengths like the trace's (conv: chat; code: long prompts, short outputs)
FALLBACK = {"conv": "uniform:input=64-2048,output=16-400", "code": "uniform:input=256-4096,output=4-64"}


def find_trace(name: str) -> Path | None:
    """The Azure trace ``name`` (conv / code): ``.data/`` (what travels to the device machine), then
    ``../shared/data/``."""
    for d in (ROOT / ".data", ROOT.parent / "shared/data"):
        if (d / TRACES[name]).exists():
            return d / TRACES[name]
    return None


def arrival_seed(rate: float, repeat: int) -> int:
    """Repeat 0 keeps the seed of the single-run files (``int(10 * rate)``); repeat k adds 1000 k."""
    return int(rate * 10) + 1000 * repeat


def slo_bound_s(slo: Any, max_out: int) -> float | None:
    """The longest a request may take (arrival to last token) and still meet the SLO, or None (no bound)."""
    bounds = []
    if slo.ttft_ms is not None and slo.tpot_ms is not None:
        bounds.append((slo.ttft_ms + slo.tpot_ms * max(0, max_out - 1)) / 1000.0)
    if slo.e2el_ms is not None:
        bounds.append(slo.e2el_ms / 1000.0)
    return min(bounds) if bounds else None


def workload(trace: Path | None, n: int, rate: float, max_in: int, max_out: int, seed: int,
             scale: int = 1, fallback: str = FALLBACK["conv"]) -> list[Any]:
    from hetserve.sim.workload import SimRequest, load_workload

    if trace is not None and trace.exists():
        wl = load_workload(str(trace), num_requests=n, request_rate=rate, seed=seed)
    else:
        wl = load_workload(fallback, num_requests=n, request_rate=rate, seed=seed)
    return [SimRequest(r.arrival_s, max(1, min(r.prompt_len // scale, max_in)), max(1, min(r.output_len, max_out)))
            for r in wl]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="high-alone,low-alone,dp,pp,pd-lp,pd-hp,cronus,hetis",
                    help="also pd-tp2 (prefill TP 2 over both devices -> decode on the high-end one)")
    ap.add_argument("--rates", default="8,16,24", help="request rates (req/s), comma-separated; run ascending")
    ap.add_argument("--trace", default="conv",
                    help="Azure LLM 2023 trace whose lengths are used: conv (chat) or code (prefill-heavy); "
                         "conv,code runs both on each strategy's workers (one result file each)")
    ap.add_argument("--trace-rates", default="", help='a trace\'s own default rates: "code=4,8,12"')
    ap.add_argument("--repeats", type=int, default=1, help="runs per (strategy, rate), different arrival seeds")
    ap.add_argument("--num-requests", type=int, default=160)
    ap.add_argument("--layers", type=int, default=32, help="truncate the 8B shape to this many layers")
    ap.add_argument("--max-input", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--slo", default="ttft_ms=2000,tpot_ms=100")
    ap.add_argument("--cronus-tbt-ms", type=float, default=50.0)
    ap.add_argument("--tag", default="h100-mps", help="result file gpu-cluster-<tag>-<trace>.json")
    ap.add_argument("--cluster", default="examples/clusters/emulated-h100-mps-pair.yaml",
                    help="e.g. examples/clusters/emulated-h100-mps-pair-starved.yaml (high-end memory-starved), "
                         "h200-pair.yaml / h200-pair-lowend.yaml (two GPUs)")
    ap.add_argument("--profiles", default=DEFAULT_PROFILES,
                    help="DEVICE=PATH stand-ins or profiles measured on the MPS clients themselves")
    ap.add_argument("--smoke-cpu", action="store_true", help="cpu-pair + tiny model: check the script, no GPU")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="start no run (nor strategy) that would not end before this, by its arrival span")
    ap.add_argument("--rates-for", default="",
                    help='per-strategy rates replacing --rates for those named: "hetis=4,8;low-alone=4,8,12"; '
                         'for one trace only: "code:dp=4,8"')
    ap.add_argument("--stop-after-fail", type=int, default=0,
                    help="skip a strategy's higher rates after this many rates whose median good fraction was "
                         "< 90%% (0: never)")
    ap.add_argument("--estimate", action="store_true",
                    help="print the plan's estimated wall time (typical, worst case) and exit; no GPU")
    ap.add_argument("--run-cap-s", type=float, default=None,
                    help="cut a run after this many seconds (default: arrival span + SLO bound + 5 s)")
    ap.add_argument("--span-s", type=float, default=0.0,
                    help="at least this many seconds of arrivals per run: requests = max(--num-requests, rate x "
                         "span). Short bursts never saturate an engine (100 requests at 80 req/s all fit in one "
                         "batch): throughput at SLO needs a sustained load")
    ap.add_argument("--sim-only", action="store_true",
                    help="the simulator alone for every strategy and rate (no GPU, no workers): to choose rates")
    ap.add_argument("--fail-fast", action="store_true",
                    help="cut a run, once every request was sent, as soon as more than 10%% of its requests missed "
                         "the TTFT SLO (it cannot reach 90%% good): saves the drain of a saturated run")
    args = ap.parse_args()
    t_start = time.monotonic()
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.repeats < 1:
        print("--repeats must be >= 1", file=sys.stderr)
        return 2
    try:
        traces = parse_traces(args.trace)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2

    from hetserve.bench.metrics import parse_slo
    from hetserve.core.cluster import load_cluster
    from hetserve.core.model_config import ModelConfig
    from hetserve.runtime.deploy import from_cluster

    slo = parse_slo(args.slo)
    rates = sorted(float(r) for r in args.rates.split(",") if r)
    rates_for = parse_rates_for(args.rates_for)
    trace_rates = parse_rates_for(args.trace_rates)
    names = [s for s in args.strategies.split(",") if s]
    if args.estimate:
        per = {n: [r for tr in traces for r in rates_of(tr, n, rates, trace_rates, rates_for)] for n in names}
        typ, worst = estimate_s(names, per, args.repeats, args.num_requests,
                                slo_bound_s(slo, args.max_output), args.span_s)
        print(f"estimate: {typ:.0f} s typical, {worst:.0f} s if every run were cut at its cap "
              f"({sum(len(v) for v in per.values()) * args.repeats} runs, {len(names)} strategies)")
        return 0
    trace_files = {tr: find_trace(tr) for tr in traces}
    mps = None
    layout = None
    if args.smoke_cpu:
        from hetserve.tiny.make_tiny import default_model_dir

        model_dir = default_model_dir()
        cluster_file = "examples/clusters/cpu-pair.yaml"
        cluster = load_cluster(str(ROOT / cluster_file))
        hi, lo = "host:0", "host:1"
        device, dtype, vocab_hi, scale = "cpu", "float32", 400, 8
        profiles: dict[str, Any] = {}
        worker_env_: dict[str, dict[str, str]] = {}
        engine_kw: dict[str, Any] = {"max_model_len": 512, "num_kv_blocks": 256}
        max_in, max_out = min(args.max_input, 256), min(args.max_output, 32)
        device_desc = "CPU (cpu-pair: the second worker paced to 0.5x, emulated)"
    elif args.sim_only:
        return sim_only(args, rates, rates_for, trace_files[traces[0]], slo, traces, trace_rates)
    else:
        import torch

        from hetserve.device.mps import MpsDaemon
        from hetserve.tiny.make_tiny import make_tiny_model

        multicast_off()
        work = Path("/tmp/hetserve-gpu-cluster")
        model_dir = truncated_8b(work, args.layers)
        if not (model_dir / "tokenizer.json").exists():  # a stand-in tokenizer: prompts are token ids
            tok = work / "tok"
            make_tiny_model(tok, "llama")
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (tok / f).exists():
                    (model_dir / f).write_bytes((tok / f).read_bytes())
        cluster_file = args.cluster
        cluster = load_cluster(str(ROOT / cluster_file))
        layout = gpu_layout(cluster)
        hi, lo = roles(cluster)
        device, dtype, vocab_hi, scale = "cuda", "bfloat16", 120000, 1
        from hetserve.planner.profile_set import load_profile_set

        profiles = {n: p for n, (p, _) in load_profile_set(args.profiles.split(","), "--profiles", ROOT).items()}
        ids: list[str] = []
        if layout.multi:
            from gpu_link import gpu_ids

            if torch.cuda.device_count() < layout.num_gpus:
                print(f"{cluster_file} needs {layout.num_gpus} GPUs; this machine has {torch.cuda.device_count()}",
                      file=sys.stderr)
                return 2
            ids = gpu_ids(layout.num_gpus)
        if layout.uses_mps:
            mps = MpsDaemon(visible_devices=mps_daemon_visible(layout, ids)).start()
        worker_env_ = worker_env(cluster, layout, ids, mps.client_env if mps is not None else None)
        engine_kw = {"max_model_len": args.max_input + args.max_output + 16, "num_kv_blocks": 1 << 20,
                     "load_format": "dummy"}
        max_in, max_out = args.max_input, args.max_output
        props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
        if layout.multi:
            device_desc = describe(cluster, layout, props.name if props else "cuda")
        else:
            device_desc = f"{props.name if props else 'cuda'} (one GPU; pair emulated by MPS 75/25, see cluster file)"
    mc = ModelConfig.from_path(model_dir)
    table = strategies(hi, lo, args.cronus_tbt_ms)
    unknown = [s for s in names if s not in table]
    if unknown:
        print(f"--strategies: unknown {unknown}; choose from {sorted(table)}", file=sys.stderr)
        return 2
    bound = slo_bound_s(slo, max_out)
    multi = layout is not None and layout.multi
    dests: dict[str, Path] = {}
    for tr in traces:
        tag = args.tag if args.tag.endswith(f"-{tr}") else f"{args.tag}-{tr}"
        dest = ROOT / "benchmarks/results" / (f"gpu-cluster-{tag}.json" if not args.smoke_cpu
                                              else f"cpu-cluster-smoke-{tr}.json")
        if os.environ.get("OUT"):
            dest = Path(os.environ["OUT"]) / dest.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dests[tr] = dest
    results: dict[str, list[dict[str, Any]]] = {tr: [] for tr in traces}
    finished = False

    def emulation_record() -> dict[str, Any] | None:
        if args.smoke_cpu:
            return None
        if not multi:
            return {"cluster": cluster_file,
                    "partitions": {d.spec.name: d.spec.emulated_by for d in cluster.devices},
                    "note": "both devices share one H100's HBM bandwidth and L2; simulator profiles: " + args.profiles}
        if cluster.emulation is None:
            return None
        return {"cluster": cluster_file, "partitions": {d.id: d.emulation for d in cluster.devices},
                "note": "separate GPUs (no HBM or L2 shared); the emulated devices are MPS clients of their own "
                        "GPU, the others whole GPUs; simulator profiles: " + args.profiles}

    def write(complete: bool) -> None:
        """The result files as they stand: rewritten after every run, so a killed process leaves its runs."""
        for tr in traces:
            trace = trace_files[tr]
            out = {
                "benchmark": "heterogeneous strategies on an emulated pair (issues 7, 8)" if not multi else
                             "heterogeneous strategies on two GPUs (issue 9)",
                "command": " ".join([sys.executable, *sys.argv]),
                "git_commit": git_commit(),
                "started_utc": started_utc,
                "complete": complete,
                "device": device_desc,
                "emulation": emulation_record(),
                "cluster": cluster_file,
                "cluster_name": cluster.name,
                "memory_starved": "starved" in cluster.name,
                "model": f"Llama-3.1-8B shape, {mc.num_hidden_layers} layers, random {dtype} weights",
                "trace": tr,
                "trace_file": trace.name if trace else None,
                "workload": f"{trace.name if trace else FALLBACK[tr]} lengths (prompt <= {max_in}, "
                            f"output <= {max_out}), Poisson arrivals, max({args.num_requests}, rate x {args.span_s:g} s) "
                            "requests per rate",
                "num_requests": args.num_requests,
                "span_s": args.span_s,
                "rates": trace_rates.get(tr, rates),
                "rates_for": rates_for if len(traces) == 1 else {
                    n: rates_of(tr, n, rates, trace_rates, rates_for) for n in names},
                "repeats": args.repeats,
                "arrival_seeds": "int(10 * rate) + 1000 * repeat",
                "slo": args.slo,
                "slo_bound_s": bound,
                "platform": platform.platform(),
                "wall_s": time.monotonic() - t_start,
                "results": results[tr],
            }
            if multi:
                out["profiles"] = args.profiles
                out["roles"] = {"high": hi, "low": lo}
                out["gpus"] = {"gpu_of": layout.gpu_of, "mps_gpus": list(layout.mps_gpus),  # type: ignore[union-attr]
                               "worker_env": {k: {e: v for e, v in env.items() if not e.startswith("CUDA_MPS_PIPE")
                                                  and not e.startswith("CUDA_MPS_LOG")}
                                              for k, env in worker_env_.items()},
                               "mps_daemon_visible": mps_daemon_visible(layout, ids)}  # type: ignore[arg-type]
            if len(traces) > 1:
                out["traces_in_process"] = traces
            tmp = dests[tr].with_suffix(".json.tmp")
            tmp.write_text(json.dumps(out, indent=1, default=str))
            tmp.replace(dests[tr])

    def left() -> float:
        return args.deadline_s - (time.monotonic() - t_start)

    def run_rates(engine: Any, name: str, tr: str, row: dict[str, Any], cfg: dict[str, Any]) -> None:
        """Every rate (and repeat) of one strategy on one trace, the simulator beside each run."""
        trace = trace_files[tr]
        stop = None  # why the rest of this strategy's runs are skipped
        num_failed = 0
        for rate in rates_of(tr, name, rates, trace_rates, rates_for):
            if stop is None and args.stop_after_fail and num_failed >= args.stop_after_fail:
                stop = f"failed the SLO at {num_failed} lower rate(s) (--stop-after-fail)"
            n_req = max(args.num_requests, int(rate * args.span_s + 0.5))
            for k in range(args.repeats):
                span = n_req / rate
                if stop is None and left() < span + RUN_OVERHEAD_S:
                    stop = "device-time deadline reached"
                if stop is not None:
                    row["runs"].append({"rate": rate, "repeat": k, "skipped": stop})
                    continue
                seed = arrival_seed(rate, k)
                wl = workload(trace, n_req, rate, max_in, max_out, seed=seed, scale=scale, fallback=FALLBACK[tr])
                cap = args.run_cap_s
                if cap is None and bound is not None:
                    cap = max(w.arrival_s for w in wl) + bound + 5.0
                t_run = time.monotonic()
                fail_ttft = slo.ttft_ms / 1000.0 if args.fail_fast and slo.ttft_ms is not None else None
                real = run_real(engine, wl, slo, vocab_hi, cap, fail_ttft)
                t_sim = time.monotonic()
                sim = run_sim(cluster, mc, cfg, profiles, engine, wl, slo)
                t_end = time.monotonic()
                err = {k2: ((sim[k2] - real[k2]) / real[k2] if real.get(k2) and sim.get(k2) is not None
                            else None) for k2 in KEYS if k2 != "completed"}
                run: dict[str, Any] = {
                    "rate": rate, "repeat": k, "seed": seed,
                    "real": {k2: real.get(k2) for k2 in (*KEYS, "errors", "duration")},
                    "simulated": {k2: sim.get(k2) for k2 in (*KEYS, "duration")}, "relative_error": err,
                    "cut": real["cut"], "cap_s": cap,
                    "wall_s": {"real": t_sim - t_run, "sim": t_end - t_sim},
                    "transfers_ok": engine.num_transfers_ok,
                    "transfers_failed": engine.num_transfers_failed}
                if args.fail_fast:
                    run["cut_reason"] = real["cut_reason"]
                stats = engine.kv_stats() if hasattr(engine, "kv_stats") else []
                done = [x for x in stats if x.get("ok")]
                if done:  # direct KV hand-offs so far (cumulative over this strategy's runs)
                    tot = {k2: sum(float(x.get(k2) or 0) for x in done)
                           for k2 in ("num_bytes", "wall_s", "declared_s", "send_convert_s",
                                      "recv_convert_s", "handoff_s")}
                    tot["count"] = len(done)
                    tot["achieved_over_declared_bandwidth"] = (tot["declared_s"] / tot["wall_s"]
                                                               if tot["wall_s"] else None)
                    run["kv_transfers"] = tot
                dep = engine.deployment.describe()
                if "mean_k_fraction" in dep:
                    run["cronus_mean_k_fraction"] = dep["mean_k_fraction"]
                if real["cut"]:
                    engine.abort_request(real["request_ids"])
                    t_drain = time.monotonic()
                    while time.monotonic() - t_drain < 2.0:  # replies of steps in flight
                        engine.step()
                    if (real["good_fraction"] or 0) < 0.9:
                        stop = f"saturated: the run at {rate:g} req/s was cut with < 90% good"
                    elif any(f != u for f, u in engine.free_blocks().values()):
                        stop = "KV blocks still held after aborting a cut run"
                row["runs"].append(run)
                r = run["real"]
                cut_note = "" if not real["cut"] else f"  CUT ({real['cut_reason']})" if args.fail_fast else "  CUT"
                print(f"{tr + ' ' if len(traces) > 1 else ''}"
                      f"{name:10s} {rate:5.1f} req/s #{k} TTFT p50/p99 {r['p50_ttft_ms']:8.1f}/"
                      f"{r['p99_ttft_ms']:8.1f} ms  ITL p50/p99 {r['p50_itl_ms']:6.1f}/{r['p99_itl_ms']:6.1f} ms"
                      f"  {r['output_throughput']:8.1f} tok/s  good {100 * r['good_fraction']:.0f}%  "
                      f"sim TTFT {sim['mean_ttft_ms']:.1f} ({100 * (err['mean_ttft_ms'] or 0):+.0f}%) "
                      f"tput ({100 * (err['output_throughput'] or 0):+.0f}%)"
                      f"{cut_note}  {t_end - t_run:.1f} s", flush=True)
                write(False)
            fr = sorted(x["real"]["good_fraction"] or 0.0 for x in row["runs"]
                        if x.get("rate") == rate and "real" in x)
            if fr and fr[len(fr) // 2] < 0.9:  # the median (upper for an even count)
                num_failed += 1

    try:
        for name in names:
            first_rates = rates_of(traces[0], name, rates, trace_rates, rates_for)
            first_span = max(args.num_requests / first_rates[0], args.span_s)
            if left() < STARTUP_S + first_span:
                for tr in traces:
                    results[tr].append({"strategy": name, "skipped": "device-time deadline reached"})
                continue
            spec = table[name]
            cfg = strategy_config(spec, dtype, engine_kw["max_model_len"])
            rows = {tr: {"strategy": name, "config": cfg, "runs": []} for tr in traces}
            for tr in traces:
                results[tr].append(rows[tr])
            t0 = time.monotonic()
            try:
                engine = from_cluster(str(model_dir), cluster, spec["strategy"], instances=spec["instances"],
                                      deployment_params=spec.get("params"), device=device, dtype=dtype,
                                      worker_env=worker_env_, profiles=profiles, **engine_kw)
            except Exception as e:  # noqa: BLE001 - recorded, the next strategy runs
                for row in rows.values():
                    row["error"] = f"{type(e).__name__}: {e}"
                print(f"{name}: could not start: {rows[traces[0]]['error']}")
                write(False)
                continue
            for row in rows.values():
                row["startup_s"] = time.monotonic() - t0
                row["instances"] = {n: {"num_kv_blocks": p.num_kv_blocks, "devices": list(p.device_ids),
                                        "role": p.role} for n, p in engine.deployment.plans.items()}
            try:
                run_real(engine, workload(trace_files[traces[0]], 8, 100.0, 128, 8, seed=99, scale=scale,
                                          fallback=FALLBACK[traces[0]]), None, vocab_hi)  # warm-up
                for tr in traces:
                    run_rates(engine, name, tr, rows[tr], cfg)
                    rows[tr]["free_blocks_after"] = engine.free_blocks()
            except Exception as e:  # noqa: BLE001
                for row in rows.values():
                    row.setdefault("error", f"{type(e).__name__}: {e}")
                print(f"{name}: failed: {type(e).__name__}: {e}")
            finally:
                engine.shutdown()
            write(False)
        finished = True
    finally:
        if mps is not None:
            mps.stop()
        write(finished)
    for tr in traces:
        print(f"wrote {dests[tr]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
