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

from gpu_cluster_sim import DEFAULT_PROFILES, run_sim, sim_only, strategy_config, truncated_8b

HI, LO = "gpu0:0", "gpu0:1"
KEYS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms", "p99_itl_ms",
        "output_throughput", "request_throughput", "request_goodput", "good_fraction", "completed")
# Time model (fit to files a-i, see gpu_cluster_run.sh): the process (MPS daemon, imports) FILE_OVERHEAD_S, each
# strategy's start-up and warm-up STARTUP_S (workers, weights; 8-22 s measured), each run its arrival span
# (num_requests / rate) plus RUN_OVERHEAD_S (the drain after the last arrival, the simulator); a run cut at its cap
# costs up to span + SLO bound + 5 s.
FILE_OVERHEAD_S, STARTUP_S, RUN_OVERHEAD_S = 10.0, 15.0, 9.0


def parse_rates_for(text: str) -> dict[str, list[float]]:
    """``"hetis=4,8;low-alone=4,8,12"`` -> per-strategy rates (the others use ``--rates``)."""
    out: dict[str, list[float]] = {}
    for part in text.replace(" ", ";").split(";"):
        if part:
            name, _, rates = part.partition("=")
            out[name] = sorted(float(r) for r in rates.split(",") if r)
    return out


def estimate_s(names: list[str], rates: dict[str, list[float]], repeats: int, num_requests: int,
               bound_s: float | None) -> tuple[float, float]:
    """(typical, worst case) wall seconds of a plan: every run unsaturated / every run cut at its cap."""
    spans = [num_requests / r for n in names for r in rates[n] for _ in range(repeats)]
    base = FILE_OVERHEAD_S + STARTUP_S * len(names)
    return base + sum(spans) + RUN_OVERHEAD_S * len(spans), base + sum(spans) + (5.0 + (bound_s or 30.0)) * len(spans)


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
    }


def git_commit() -> str:
    f = ROOT / "benchmarks/.commit"
    if f.exists():
        return f.read_text().strip()
    r = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


TRACES = {"conv": "azure_llm_2023_conv.csv", "code": "azure_llm_2023_code.csv"}
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


class _Capped:
    """The engine as ``replay`` sees it, with a wall-clock cap: past ``cap_s`` it reports nothing unfinished, so
    ``replay`` returns (only once every request was sent: ``replay`` then waits for no arrival)."""

    def __init__(self, engine: Any, cap_s: float | None, num_requests: int) -> None:
        self.engine, self.cap_s, self.t0, self.cut, self.ids = engine, cap_s, time.monotonic(), False, []
        self.num_requests, self.just_added = num_requests, False

    def add_request(self, rid: str, *a: Any, **kw: Any) -> Any:
        self.ids.append(rid)
        self.just_added = True
        return self.engine.add_request(rid, *a, **kw)

    def has_unfinished_requests(self) -> bool:
        just_added, self.just_added = self.just_added, False  # replay asks right after adding: answer truly
        if (self.cap_s is not None and len(self.ids) >= self.num_requests and not just_added
                and time.monotonic() - self.t0 > self.cap_s):
            self.cut = True
            return False
        return self.engine.has_unfinished_requests()

    def step(self) -> Any:
        return self.engine.step()


def run_real(engine: Any, wl: list[Any], slo: Any, vocab_hi: int, cap_s: float | None = None) -> dict[str, Any]:
    from replay import replay

    from hetserve.bench.metrics import compute_metrics

    capped = _Capped(engine, cap_s, len(wl))
    records, dur = replay(capped, wl, vocab_range=(10, vocab_hi))
    if capped.cut:  # a request cut short did not finish: it failed (and could not have met the SLO)
        for rec in records:
            if rec.success and rec.output_len < rec.expected_output_len:
                rec.success, rec.error = False, "cut at the run cap"
            elif not rec.success:
                rec.error = "cut at the run cap"
        dur = max(dur, (cap_s or 0.0) - min(w.arrival_s for w in wl))  # the engine worked until the cut
    m = compute_metrics(records, dur, slo)
    m["errors"] = sum(1 for r in records if not r.success)
    m["good_fraction"] = (m["request_goodput"] or 0) * m["duration"] / max(1, len(records))
    m["cut"] = capped.cut
    m["request_ids"] = capped.ids  # to abort what a cut left in the engine
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="high-alone,low-alone,dp,pp,pd-lp,pd-hp,cronus,hetis")
    ap.add_argument("--rates", default="8,16,24", help="request rates (req/s), comma-separated; run ascending")
    ap.add_argument("--trace", choices=sorted(TRACES), default="conv",
                    help="Azure LLM 2023 trace whose lengths are used: conv (chat) or code (prefill-heavy)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (strategy, rate), different arrival seeds")
    ap.add_argument("--num-requests", type=int, default=160)
    ap.add_argument("--layers", type=int, default=32, help="truncate the 8B shape to this many layers")
    ap.add_argument("--max-input", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--slo", default="ttft_ms=2000,tpot_ms=100")
    ap.add_argument("--cronus-tbt-ms", type=float, default=50.0)
    ap.add_argument("--tag", default="h100-mps", help="result file gpu-cluster-<tag>-<trace>.json")
    ap.add_argument("--cluster", default="examples/clusters/emulated-h100-mps-pair.yaml",
                    help="e.g. examples/clusters/emulated-h100-mps-pair-starved.yaml (high-end memory-starved)")
    ap.add_argument("--profiles", default=DEFAULT_PROFILES,
                    help="DEVICE=PATH stand-ins or profiles measured on the MPS clients themselves")
    ap.add_argument("--smoke-cpu", action="store_true", help="cpu-pair + tiny model: check the script, no GPU")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="start no run (nor strategy) that would not end before this, by its arrival span")
    ap.add_argument("--rates-for", default="",
                    help='per-strategy rates replacing --rates for those named: "hetis=4,8;low-alone=4,8,12"')
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
    args = ap.parse_args()
    t_start = time.monotonic()
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.repeats < 1:
        print("--repeats must be >= 1", file=sys.stderr)
        return 2

    from hetserve.bench.metrics import parse_slo
    from hetserve.core.cluster import load_cluster
    from hetserve.core.model_config import ModelConfig
    from hetserve.runtime.deploy import from_cluster

    slo = parse_slo(args.slo)
    rates = sorted(float(r) for r in args.rates.split(",") if r)
    rates_for = parse_rates_for(args.rates_for)
    if args.estimate:
        names = [s for s in args.strategies.split(",") if s]
        per = {n: rates_for.get(n, rates) for n in names}
        typ, worst = estimate_s(names, per, args.repeats, args.num_requests,
                                slo_bound_s(slo, args.max_output))
        print(f"estimate: {typ:.0f} s typical, {worst:.0f} s if every run were cut at its cap "
              f"({sum(len(v) for v in per.values()) * args.repeats} runs, {len(names)} strategies)")
        return 0
    trace = find_trace(args.trace)
    mps = None
    if args.smoke_cpu:
        from hetserve.tiny.make_tiny import default_model_dir

        model_dir = default_model_dir()
        cluster_file = "examples/clusters/cpu-pair.yaml"
        cluster = load_cluster(str(ROOT / cluster_file))
        hi, lo = "host:0", "host:1"
        device, dtype, vocab_hi, scale = "cpu", "float32", 400, 8
        profiles: dict[str, Any] = {}
        worker_env: dict[str, dict[str, str]] = {}
        engine_kw: dict[str, Any] = {"max_model_len": 512, "num_kv_blocks": 256}
        max_in, max_out = min(args.max_input, 256), min(args.max_output, 32)
        device_desc = "CPU (cpu-pair: the second worker paced to 0.5x, emulated)"
    elif args.sim_only:
        return sim_only(args, rates, rates_for, trace, slo)
    else:
        import torch

        from hetserve.device.mps import MpsDaemon
        from hetserve.tiny.make_tiny import make_tiny_model

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
        hi, lo = HI, LO
        device, dtype, vocab_hi, scale = "cuda", "bfloat16", 120000, 1
        from hetserve.planner.profile_set import load_profile_set

        profiles = {n: p for n, (p, _) in load_profile_set(args.profiles.split(","), "--profiles", ROOT).items()}
        mps = MpsDaemon().start()
        worker_env = {}
        for part in cluster.emulation.partitions:  # type: ignore[union-attr]
            # the cap: the declared memory plus 3 GiB for the CUDA context and workspaces the plan does not count
            cap = None if part.memory_bytes is None else part.memory_bytes + 3 * 2**30
            worker_env[part.name] = mps.client_env(part.amount, cap)
        engine_kw = {"max_model_len": args.max_input + args.max_output + 16, "num_kv_blocks": 1 << 20,
                     "load_format": "dummy"}
        max_in, max_out = args.max_input, args.max_output
        props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
        device_desc = f"{props.name if props else 'cuda'} (one GPU; pair emulated by MPS 75/25, see cluster file)"
    mc = ModelConfig.from_path(model_dir)
    table = strategies(hi, lo, args.cronus_tbt_ms)
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in table]
    if unknown:
        print(f"--strategies: unknown {unknown}; choose from {sorted(table)}", file=sys.stderr)
        return 2
    bound = slo_bound_s(slo, max_out)
    tag = args.tag if args.tag.endswith(f"-{args.trace}") else f"{args.tag}-{args.trace}"
    dest = ROOT / "benchmarks/results" / (f"gpu-cluster-{tag}.json" if not args.smoke_cpu
                                          else f"cpu-cluster-smoke-{args.trace}.json")
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"]) / dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    finished = False

    def write(complete: bool) -> None:
        """The result file as it stands: rewritten after every run, so a killed process leaves its runs."""
        out = {
            "benchmark": "heterogeneous strategies on an emulated pair (issues 7, 8)",
            "command": " ".join([sys.executable, *sys.argv]),
            "git_commit": git_commit(),
            "started_utc": started_utc,
            "complete": complete,
            "device": device_desc,
            "emulation": None if args.smoke_cpu else {
                "cluster": cluster_file,
                "partitions": {d.spec.name: d.spec.emulated_by for d in cluster.devices},
                "note": "both devices share one H100's HBM bandwidth and L2; simulator profiles: " + args.profiles},
            "cluster": cluster_file,
            "cluster_name": cluster.name,
            "memory_starved": "starved" in cluster.name,
            "model": f"Llama-3.1-8B shape, {mc.num_hidden_layers} layers, random {dtype} weights",
            "trace": args.trace,
            "trace_file": trace.name if trace else None,
            "workload": f"{trace.name if trace else FALLBACK[args.trace]} lengths (prompt <= {max_in}, "
                        f"output <= {max_out}), Poisson arrivals, max({args.num_requests}, rate x {args.span_s:g} s) "
                        "requests per rate",
            "num_requests": args.num_requests,
            "span_s": args.span_s,
            "rates": rates,
            "rates_for": rates_for,
            "repeats": args.repeats,
            "arrival_seeds": "int(10 * rate) + 1000 * repeat",
            "slo": args.slo,
            "slo_bound_s": bound,
            "platform": platform.platform(),
            "wall_s": time.monotonic() - t_start,
            "results": results,
        }
        tmp = dest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        tmp.replace(dest)

    def left() -> float:
        return args.deadline_s - (time.monotonic() - t_start)

    try:
        for name in names:
            my_rates = rates_for.get(name, rates)
            first_span = max(args.num_requests / my_rates[0], args.span_s)
            if left() < STARTUP_S + first_span:
                results.append({"strategy": name, "skipped": "device-time deadline reached"})
                continue
            spec = table[name]
            cfg = strategy_config(spec, dtype, engine_kw["max_model_len"])
            row: dict[str, Any] = {"strategy": name, "config": cfg, "runs": []}
            results.append(row)
            t0 = time.monotonic()
            try:
                engine = from_cluster(str(model_dir), cluster, spec["strategy"], instances=spec["instances"],
                                      deployment_params=spec.get("params"), device=device, dtype=dtype,
                                      worker_env=worker_env, profiles=profiles, **engine_kw)
            except Exception as e:  # noqa: BLE001 - recorded, the next strategy runs
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{name}: could not start: {row['error']}")
                write(False)
                continue
            row["startup_s"] = time.monotonic() - t0
            row["instances"] = {n: {"num_kv_blocks": p.num_kv_blocks, "devices": list(p.device_ids),
                                    "role": p.role} for n, p in engine.deployment.plans.items()}
            try:
                run_real(engine, workload(trace, 8, 100.0, 128, 8, seed=99, scale=scale,
                                          fallback=FALLBACK[args.trace]), None, vocab_hi)  # warm-up
                stop = None  # why the rest of this strategy's runs are skipped
                num_failed = 0
                for rate in my_rates:
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
                        wl = workload(trace, n_req, rate, max_in, max_out, seed=seed, scale=scale,
                                      fallback=FALLBACK[args.trace])
                        cap = args.run_cap_s
                        if cap is None and bound is not None:
                            cap = max(w.arrival_s for w in wl) + bound + 5.0
                        t_run = time.monotonic()
                        real = run_real(engine, wl, slo, vocab_hi, cap)
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
                        print(f"{name:10s} {rate:5.1f} req/s #{k} TTFT p50/p99 {r['p50_ttft_ms']:8.1f}/"
                              f"{r['p99_ttft_ms']:8.1f} ms  ITL p50/p99 {r['p50_itl_ms']:6.1f}/{r['p99_itl_ms']:6.1f} ms"
                              f"  {r['output_throughput']:8.1f} tok/s  good {100 * r['good_fraction']:.0f}%  "
                              f"sim TTFT {sim['mean_ttft_ms']:.1f} ({100 * (err['mean_ttft_ms'] or 0):+.0f}%) "
                              f"tput ({100 * (err['output_throughput'] or 0):+.0f}%)"
                              f"{'  CUT' if real['cut'] else ''}  {t_end - t_run:.1f} s", flush=True)
                        write(False)
                    fr = sorted(x["real"]["good_fraction"] or 0.0 for x in row["runs"]
                                if x.get("rate") == rate and "real" in x)
                    if fr and fr[len(fr) // 2] < 0.9:  # the median (upper for an even count)
                        num_failed += 1
                row["free_blocks_after"] = engine.free_blocks()
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{name}: failed: {row['error']}")
            finally:
                engine.shutdown()
            write(False)
        finished = True
    finally:
        if mps is not None:
            mps.stop()
        write(finished)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
