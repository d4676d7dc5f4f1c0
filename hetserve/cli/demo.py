"""``hetserve demo``: the embedded default, end to end on loopback.

Makes the tiny model if missing, starts ``hetserve serve`` in-process on a free 127.0.0.1 port, runs a short
``hetserve bench`` against it (~64 requests), prints the summary table, writes the result JSON, a plot and the
server settings used (a valid ``hetserve serve --config`` file) to ``./hetserve-demo/``, and shuts down.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    p.add_argument("--input-len", type=int, default=64, help="mean prompt length in tokens")
    p.add_argument("--output-len", "--max-tokens", dest="output_len", type=int, default=32,
                   help="mean forced output length in tokens")
    p.add_argument("--request-rate", default="32", help="requests/s (Poisson arrivals), or inf for all at once")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--output-dir", default="hetserve-demo", help="where the JSON, plot and settings go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cluster", default=None,
                   help="run DP and PD over worker processes on this cluster file or name (e.g. cpu-pair)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "cluster", None):
        from hetserve.cli.demo_cluster import run_cluster_demo

        return run_cluster_demo(args)
    from hetserve.bench.cli import main as bench_main
    from hetserve.server.launch import ServerThread, resolve_model
    from hetserve.server.settings import ServerSettings

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise SystemExit(f"hetserve demo: error: --{name.replace('_', '-')} must be >= 1")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.model is None:
        print("hetserve demo: preparing the embedded tiny model (made once, then cached) ...", flush=True)
    settings = resolve_model(ServerSettings(model=args.model, port=0, device=args.device,
                                            uvicorn_log_level="warning", shutdown_timeout_s=10.0))
    max_len = 2 * (args.input_len + args.output_len)
    settings = dataclasses.replace(settings, max_model_len=max_len)
    server = ServerThread(settings).start()
    t_ready = time.perf_counter() - t0
    print(f"hetserve demo: serving {settings.model_names[0]!r} at {server.base_url}/v1 "
          f"(ready in {t_ready:.1f} s, device {server.engine.engine.executor.device})", flush=True)
    result_json, plot_png = out_dir / "result.json", out_dir / "result.png"
    try:
        argv = ["--base-url", server.base_url, "--endpoint", args.endpoint, "--num-prompts", str(args.num_prompts),
                "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                "--random-range-ratio", "0.5", "--request-rate", str(args.request_rate), "--seed", "0",
                "--output", str(result_json), "--plot", str(plot_png)]
        if args.endpoint == "chat":
            argv += ["--tokenizer", str(settings.model)]
        if args.no_progress:
            argv.append("--disable-tqdm")
        code = bench_main(argv)
    finally:
        server.stop()
    settings_file = out_dir / "server-settings.json"
    # as a config file for ``hetserve serve``: the default port and logs, not the demo's throwaway ones
    data = {**dataclasses.asdict(settings), "port": 8000, "uvicorn_log_level": "info"}
    data["served_model_name"] = list(settings.model_names)
    settings_file.write_text(json.dumps(data, indent=2) + "\n")
    if code != 0 or not result_json.exists():
        print("hetserve demo: the benchmark failed; see the messages above")
        return 1
    result = json.loads(result_json.read_text())
    print(f"\nhetserve demo: {result['completed']}/{len(result['errors'])} requests, "
          f"{result['request_throughput']:.1f} requests/s, {result['output_throughput']:.0f} output tokens/s, "
          f"total {time.perf_counter() - t0:.1f} s")
    print(f"hetserve demo: wrote {result_json}, {plot_png} and {settings_file} "
          f"(serve it again: hetserve serve --config {settings_file})")
    return 0 if result["failed"] == 0 else 1
