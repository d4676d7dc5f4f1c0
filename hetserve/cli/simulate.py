"""``hetserve simulate``: run one deployment config on a workload in the simulator (the engine's own
schedulers, timed by the cost model) and report the metrics ``hetserve bench`` reports."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from hetserve.core.errors import HetserveError, ValidationError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="deployment config (what hetserve plan writes)")
    p.add_argument(
        "--workload",
        required=True,
        metavar="TRACE_OR_SPEC",
        help="Azure trace CSV, or fixed:input=512,output=128 / uniform:input=64-2048,output=16-512",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals at this rate (req/s); default: the trace's own timestamps",
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    p.add_argument("--num-requests", type=int, default=None, help="first N requests of the workload")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace timestamps (replay faster < 1)")
    p.add_argument("--max-input-len", type=int, default=None, help="clip prompts to this many tokens")
    p.add_argument("--max-output-len", type=int, default=None, help="clip outputs to this many tokens")
    p.add_argument("--slo", default=None, metavar="KEY=MS,...", help="for goodput, e.g. ttft_ms=2000,tpot_ms=100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="FILE.json", default=None, help="write the metrics JSON here")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="draw latency CDFs and the timeline (matplotlib)")


def run(args: argparse.Namespace) -> int:
    from hetserve.bench.metrics import parse_slo, render_summary
    from hetserve.sim.simulator import Simulator
    from hetserve.sim.workload import load_workload
    from hetserve.strategies.build import load_run_config

    for flag, v in (
        ("--request-rate", args.request_rate),
        ("--num-requests", args.num_requests),
        ("--burstiness", args.burstiness),
        ("--time-scale", args.time_scale),
        ("--max-input-len", args.max_input_len),
        ("--max-output-len", args.max_output_len),
    ):
        if v is not None and not v > 0:
            raise ValidationError(flag, f"must be > 0, got {v}")
    slo = None
    if args.slo:
        try:
            slo = parse_slo(args.slo)
        except ValueError as e:
            raise ValidationError("--slo", str(e)) from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValidationError("--plot", "needs matplotlib (pip install matplotlib)") from None
    try:
        rc = load_run_config(args.config)
    except ValidationError as e:
        raise ValidationError(f"--config {args.config}: {e.field}", e.message) from None
    except HetserveError as e:
        raise ValidationError(f"--config {args.config}", str(e)) from None
    workload = load_workload(
        args.workload,
        num_requests=args.num_requests,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        seed=args.seed,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        time_scale=args.time_scale,
    )
    if not workload:
        raise ValidationError("--workload", "no requests")
    from hetserve.sim.contention import shared_gpu_contention

    sim = Simulator(rc.deployment, contention=shared_gpu_contention(rc.cluster, rc.deployment))
    t0 = time.perf_counter()
    res = sim.run(workload)
    wall = time.perf_counter() - t0
    result: dict[str, Any] = res.metrics(slo)
    result.update(
        {
            "backend": "hetserve-simulator",
            "simulated": True,
            "config_file": str(args.config),
            "deployment": rc.deployment.describe(),
            "instances": res.instances,
            "num_events": res.num_events,
            "sim_wall_s": wall,
            "workload": args.workload,
            "request_rate": args.request_rate,
            "slo": slo.as_dict() if slo else None,
        }
    )
    print(render_summary(result, use_rich=False))
    print(f"simulated {len(workload)} requests on {len(res.instances)} instance(s) in {wall:.2f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.plot:
        from hetserve.bench.plot import plot_result

        plot_result(result, args.plot)
    return 0
