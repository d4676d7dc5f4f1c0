"""``hetserve bench``: load-test any OpenAI-compatible server; flags spelled as in ``vllm bench serve``.

Exit codes: 0 the run finished (some requests may have failed; see ``failed``), 1 no request succeeded or the
server could not be asked for its model, 2 bad flags or values (the message names the flag).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hetserve.bench.client import (
    BenchClientError,
    ClientConfig,
    fetch_models,
    first_model_id,
    normalize_base_url,
    run_benchmark,
)
from hetserve.bench.datasets import DATASET_NAMES, DEFAULT_VOCAB_SIZE, MIN_SAFE_TOKEN_ID, DatasetConfig, load_requests
from hetserve.bench.metrics import Slo, compute_metrics, parse_percentiles, parse_slo, render_summary
from hetserve.core.errors import ValidationError

PROG = "hetserve bench"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _number(text: str, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _number(text)


def _rate(text: str) -> float:
    return _number(text, allow_inf=True)


def _ratio(text: str) -> float:
    value = _number(text, allow_zero=True)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _slo(text: str) -> Slo:
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        return parse_percentiles(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DESCRIPTION = "Benchmark an OpenAI-compatible server (hetserve, vLLM, SGLang, ...) over HTTP."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags, on ``p`` (also used as the ``hetserve bench`` subparser by ``hetserve.cli.main``)."""
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="server root; a trailing /v1 is accepted (default: %(default)s)",
    )
    srv.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    srv.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions (token-id prompts, exact lengths) or /v1/chat/completions (text) (default: %(default)s)",
    )
    srv.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    srv.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="per-request limit in seconds (default: %(default)s)"
    )

    data = p.add_argument_group("workload")
    data.add_argument(
        "--dataset",
        choices=DATASET_NAMES,
        default="random",
        help="random lengths, an Azure LLM trace CSV, or a ShareGPT JSON file (default: %(default)s)",
    )
    data.add_argument("--dataset-path", default=None, help="file for azure-conv, azure-code, sharegpt")
    data.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=1000,
        help="requests to send; traces: the first N rows (default: %(default)s)",
    )
    data.add_argument("--random-input-len", type=_positive_int, default=1024, help="(default: %(default)s)")
    data.add_argument(
        "--random-output-len", type=_positive_int, default=128, help="forced output length (default: %(default)s)"
    )
    data.add_argument(
        "--random-range-ratio",
        type=_ratio,
        default=0.0,
        help="random lengths uniform in [len*(1-r), len*(1+r)] (default: %(default)s)",
    )
    data.add_argument(
        "--max-input-len",
        type=_positive_int,
        default=None,
        help="cap prompt lengths (traces: clip; sharegpt: skip longer prompts)",
    )
    data.add_argument("--max-output-len", type=_positive_int, default=None, help="cap forced output lengths")
    data.add_argument(
        "--tokenizer", default=None, help="HF tokenizer dir (tokenizer.json): text prompts of exact token counts"
    )
    data.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=None,
        help=f"token-id prompts draw ids from [{MIN_SAFE_TOKEN_ID}, VOCAB_SIZE) "
        f"(default {DEFAULT_VOCAB_SIZE}: safe for any model, tiny ones included)",
    )
    data.add_argument(
        "--seed", type=int, default=0, help="seeds lengths, prompts and arrival times (default: %(default)s)"
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=_rate, default=None, help="requests/s with gamma arrivals (default inf: all at once)"
    )
    load.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier, >1 steadier (default: %(default)s)",
    )
    load.add_argument("--max-concurrency", type=_positive_int, default=None, help="most requests in flight")
    load.add_argument(
        "--use-trace-timestamps",
        action="store_true",
        help="azure datasets: send each row at the trace's own arrival time",
    )
    load.add_argument(
        "--time-scale",
        type=lambda s: _number(s, allow_zero=True),
        default=None,
        help="multiply trace arrival offsets (0.1 = 10x faster); needs --use-trace-timestamps",
    )
    load.add_argument(
        "--temperature", type=lambda s: _number(s, allow_zero=True), default=0.0, help="(default: %(default)s)"
    )

    out = p.add_argument_group("results")
    out.add_argument("--slo", type=_slo, default=None, help="goodput SLO, e.g. ttft_ms=500,tpot_ms=50,e2el_ms=10000")
    out.add_argument(
        "--metric-percentiles",
        type=_percentiles,
        default=(50.0, 90.0, 99.0),
        help="comma-separated percentiles to report (default: 50,90,99)",
    )
    out.add_argument("--output", default=None, help="write the result JSON here")
    out.add_argument("--plot", default=None, help="write latency CDFs and the request timeline here (PNG)")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _check_combinations(args: argparse.Namespace) -> None:
    if args.use_trace_timestamps:
        if args.dataset not in ("azure-conv", "azure-code"):
            raise ValidationError("--use-trace-timestamps", "needs --dataset azure-conv or azure-code")
        if args.request_rate is not None:
            raise ValidationError("--request-rate", "cannot be combined with --use-trace-timestamps")
    elif args.time_scale is not None:
        raise ValidationError("--time-scale", "only applies with --use-trace-timestamps")
    if args.tokenizer is not None and args.vocab_size is not None:
        raise ValidationError("--vocab-size", "give --tokenizer or --vocab-size, not both")
    if args.vocab_size is not None and args.vocab_size <= MIN_SAFE_TOKEN_ID:
        raise ValidationError("--vocab-size", f"must be > {MIN_SAFE_TOKEN_ID}")
    if not normalize_base_url(args.base_url).startswith(("http://", "https://")):
        raise ValidationError("--base-url", f"must start with http:// or https://, got {args.base_url!r}")


def _redacted_command(argv: list[str]) -> str:
    """``hetserve`` + argv (which starts at the subcommand), with the API key hidden."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg == "--api-key":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--api-key="):
            shown.append("--api-key=***")
        else:
            shown.append(arg)
    return shlex.join(["hetserve", *shown])


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (inf rate is written "inf", as vLLM does)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _error(message: str) -> int:
    print(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Runs a benchmark; ``argv`` are the arguments after ``bench`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message naming the flag
        return e.code if isinstance(e.code, int) else 2
    return run(args, command_argv=["bench", *argv])


def run(args: argparse.Namespace, command_argv: list[str] | None = None) -> int:
    """Runs a benchmark from parsed flags. ``command_argv`` is what to record as the command (from the
    subcommand on); by default ``sys.argv[1:]``, right when called from ``hetserve bench ...``."""
    command = _redacted_command(list(sys.argv[1:] if command_argv is None else command_argv))
    try:
        _check_combinations(args)
        ds_cfg = DatasetConfig(
            name=args.dataset,
            path=args.dataset_path,
            num_prompts=args.num_prompts,
            random_input_len=args.random_input_len,
            random_output_len=args.random_output_len,
            random_range_ratio=args.random_range_ratio,
            max_input_len=args.max_input_len,
            max_output_len=args.max_output_len,
            seed=args.seed,
            vocab_size=args.vocab_size,
            tokenizer_path=args.tokenizer,
        )
        requests = load_requests(ds_cfg, as_text=args.endpoint == "chat")
    except ValidationError as e:
        return _error(str(e))
    if len(requests) < args.num_prompts:
        print(
            f"{PROG}: note: the dataset has {len(requests)} usable requests, fewer than --num-prompts "
            f"{args.num_prompts}",
            file=sys.stderr,
        )

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or None
    try:
        server_models: dict[str, Any] = fetch_models(args.base_url, api_key, timeout_s=min(args.timeout, 30.0))
    except BenchClientError as e:
        if args.model is None:
            print(f"{PROG}: error: cannot ask the server for a model (pass --model): {e}", file=sys.stderr)
            return 1
        server_models = {"error": str(e)}
    model = args.model or first_model_id(server_models)
    if model is None:
        print(f"{PROG}: error: /v1/models lists no model; pass --model", file=sys.stderr)
        return 1

    request_rate = math.inf if args.request_rate is None else args.request_rate
    client_cfg = ClientConfig(
        base_url=args.base_url,
        model=model,
        endpoint=args.endpoint,
        api_key=api_key,
        request_rate=request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        timeout_s=args.timeout,
        use_trace_timestamps=args.use_trace_timestamps,
        time_scale=1.0 if args.time_scale is None else args.time_scale,
        temperature=args.temperature,
        disable_tqdm=args.disable_tqdm,
    )
    run = run_benchmark(requests, client_cfg)
    result: dict[str, Any] = {
        "date": datetime.fromtimestamp(run.started_at_unix_s, tz=timezone.utc).astimezone().isoformat(),
        "command": command,
        "backend": "openai-chat" if args.endpoint == "chat" else "openai",
        "endpoint_type": args.endpoint,
        "base_url": normalize_base_url(args.base_url),
        "model_id": model,
        "tokenizer_id": args.tokenizer,
        "server_models": server_models,
        "dataset": args.dataset,
        "dataset_path": args.dataset_path,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "use_trace_timestamps": args.use_trace_timestamps,
        "time_scale": client_cfg.time_scale if args.use_trace_timestamps else None,
        "seed": args.seed,
        "slo": args.slo.as_dict() if args.slo else None,
        "percentiles": list(args.metric_percentiles),
    }
    result.update(compute_metrics(run.records, run.duration_s, args.slo, args.metric_percentiles))

    print(render_summary(result))
    if result["failed"]:
        common = Counter(e for e in result["errors"] if e).most_common(3)
        print(f"{result['failed']} request(s) failed; most common errors:", file=sys.stderr)
        for message, count in common:
            print(f"  {count} x {message}", file=sys.stderr)
    if result["num_output_len_mismatch"]:
        print(
            f"warning: {result['num_output_len_mismatch']} request(s) returned a different number of tokens "
            "than forced (does the server honour ignore_eos / min_tokens?)",
            file=sys.stderr,
        )
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    if args.plot:
        try:
            from hetserve.bench.plot import plot_result

            print(f"wrote {plot_result(result, args.plot)}")
        except ImportError as e:
            print(f"{PROG}: warning: no plot ({e}); pip install matplotlib", file=sys.stderr)
    if not result["completed"]:
        print(f"{PROG}: error: no request succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
