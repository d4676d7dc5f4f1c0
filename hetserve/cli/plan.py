"""``hetserve plan``: rank deployments of a model on a cluster by simulated goodput and write the winner."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from hetserve.core.errors import HetserveError, ValidationError
from hetserve.planner.search import SearchSettings

_DEFAULTS = SearchSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, metavar="FILE", help="cluster file (YAML or JSON)")
    p.add_argument("--model", required=True, metavar="DIR_OR_CONFIG", help="model directory or its config.json")
    p.add_argument(
        "--workload",
        required=True,
        metavar="TRACE_OR_SPEC",
        help="Azure trace CSV, or fixed:input=512,output=128 / uniform:input=64-2048,output=16-512",
    )
    p.add_argument("--slo", required=True, metavar="KEY=MS,...", help="e.g. ttft_ms=2000,tpot_ms=100")
    p.add_argument(
        "--objective",
        choices=("goodput", "cost"),
        default="goodput",
        help="goodput (req/s within the SLO) or cost (goodput per $/hour) (default: %(default)s)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        default=None,
        help="write the winner as a deployment config (.yaml/.yml or .json); default: print it",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write the ranked table and details as JSON")
    p.add_argument(
        "--strategies",
        default=None,
        metavar="LIST",
        help="comma-separated subset of dp,pp,pd,cronus,hetis (default: all)",
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(2, CPUs))")
    p.add_argument(
        "--window-s",
        type=float,
        default=None,
        help=f"seconds of arrivals simulated per rate (default {_DEFAULTS.window_s:g})",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=None,
        help=f"cap on requests per simulation (default {_DEFAULTS.max_requests})",
    )
    p.add_argument("--per-strategy", type=int, default=2, help="candidates simulated per strategy (default 2)")
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="search every simulated candidate's goodput in full (slower; exact goodput for losers)",
    )
    p.add_argument("--max-model-len", type=int, default=8192, help="per-request token limit (default 8192)")
    p.add_argument("--dtype", default="bfloat16", help="weights and KV dtype (default bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profiles",
        default=None,
        metavar="PATHS",
        help="comma-separated profile JSONs or directories from `hetserve profile`, or DEVICE=PATH to let a "
        "profile stand in for another device type; a device with a matching profile is costed from it",
    )


def _flag(flag: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValidationError as e:
        raise ValidationError(flag, e.message if e.field in (flag, flag.lstrip("-")) else str(e)) from None
    except HetserveError as e:
        raise ValidationError(flag, str(e)) from None


def run(args: argparse.Namespace) -> int:
    from hetserve.bench.metrics import parse_slo
    from hetserve.core.cluster import load_cluster
    from hetserve.planner.report import format_table, plan_to_dict, winner_config, write_config
    from hetserve.planner.search import plan
    from hetserve.sim.workload import load_workload
    from hetserve.strategies import STRATEGIES
    from hetserve.strategies.build import load_model

    cluster = _flag("--cluster", load_cluster, args.cluster)
    model = _flag("--model", load_model, args.model, None, "--model")
    workload = _flag("--workload", load_workload, args.workload)
    try:
        slo = parse_slo(args.slo)
    except ValueError as e:
        raise ValidationError("--slo", str(e)) from None
    strategies = None
    if args.strategies:
        strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
        bad = [s for s in strategies if s not in STRATEGIES]
        if bad or not strategies:
            raise ValidationError("--strategies", f"unknown {bad}; known: {', '.join(STRATEGIES.names())}")
    for flag, v in (
        ("--workers", args.workers),
        ("--max-requests", args.max_requests),
        ("--per-strategy", args.per_strategy),
        ("--max-model-len", args.max_model_len),
    ):
        if v is not None and v < 1:
            raise ValidationError(flag, f"must be >= 1, got {v}")
    if args.window_s is not None and not args.window_s > 0:
        raise ValidationError("--window-s", f"must be > 0, got {args.window_s}")
    profiles, sources = _profiles(args.profiles, model, args.dtype)
    kw: dict[str, Any] = {"seed": args.seed, "exhaustive": args.exhaustive}
    if args.window_s is not None:
        kw["window_s"] = args.window_s
    if args.max_requests is not None:
        kw["max_requests"] = args.max_requests
    result = plan(
        cluster,
        model,
        workload,
        slo,
        args.objective,
        settings=SearchSettings(**kw),
        num_workers=args.workers,
        strategies=strategies,
        max_simulated_per_strategy=args.per_strategy,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        profiles=profiles,
    )
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(plan_to_dict(result), indent=2) + "\n")
    out_dir = Path(args.output).resolve().parent if args.output else Path.cwd()
    cluster_ref = os.path.relpath(Path(args.cluster).resolve(), out_dir)
    model_ref = os.path.relpath(Path(args.model).resolve(), out_dir)
    cfg = winner_config(result, cluster_ref, model_ref)
    if profiles:
        cfg["profiles"] = {n: os.path.relpath(Path(sources[n]).resolve(), out_dir) for n in sorted(profiles)}
    if args.output:
        write_config(cfg, args.output)
        print(f"winner: {result.winner.candidate.name} -> {args.output}")
    else:
        import yaml

        print("# winner config (hetserve simulate --config / serve --config):")
        sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
    return 0


def _profiles(arg: str | None, model: Any, dtype: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``--profiles`` -> (usable profiles by device type, their source files); prints the ones set aside."""
    if not arg:
        return {}, {}
    from hetserve.planner.profile_set import load_profile_set, usable_profiles

    loaded = load_profile_set(arg.split(","), "--profiles")
    usable, skipped = usable_profiles(loaded, model, dtype)
    for why in skipped:
        print(f"profile not used: {why}", file=sys.stderr)
    if usable:
        print("measured profiles: " + ", ".join(f"{n} <- {loaded[n][1]}" for n in sorted(usable)))
    return usable, {n: loaded[n][1] for n in usable}
