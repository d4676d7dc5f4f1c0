"""``hetserve`` command line: serve | bench | plan | simulate | profile | demo | make-tiny-model | generate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hetserve.core.errors import HetserveError

# subcommand -> module path; each module has add_arguments(parser) and run(args) -> int
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hetserve.cli.demo", "run the embedded default: a tiny model on CPU, a short benchmark, a table"),
    "generate": ("hetserve.cli.generate", "generate completions for prompts with the offline API"),
    "bench": ("hetserve.bench.cli", "load-test any OpenAI-compatible server (vLLM's bench serve flags)"),
    "make-tiny-model": ("hetserve.cli.make_tiny", "write a tiny random-weight checkpoint in HF format"),
    "serve": ("hetserve.cli.serve", "run the OpenAI-compatible HTTP server"),
    "plan": ("hetserve.cli.plan", "rank deployments of a model on a cluster by simulated goodput"),
    "simulate": ("hetserve.cli.simulate", "run one deployment config on a workload in the simulator"),
    "profile": ("hetserve.cli.profile", "measure a device (GPU, SM partition, MPS client or CPU) for a model's shape"),
}


def _load(module: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    import importlib

    mod = importlib.import_module(module)
    return mod.add_arguments, mod.run


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` set, just that subcommand's module is imported (so ``hetserve plan`` runs
    where torch, aiohttp or fastapi are not installed). Commands whose module cannot be imported here are
    listed with the reason."""
    parser = argparse.ArgumentParser(prog="hetserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            add_arguments, _ = _load(module)
        except ImportError as e:
            sub.add_parser(name, help=f"{help_text} [unavailable: {e}]")
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if not hasattr(args, "_module"):
        try:
            _load(_COMMANDS[args.command][0])
        except ImportError as e:
            print(f"hetserve {args.command}: error: a dependency is missing ({e}); "
                  "install the extra it needs, e.g. pip install 'hetserve[server]'", file=sys.stderr)
            return 2
    _, run = _load(args._module)
    try:
        return int(run(args) or 0)
    except HetserveError as e:
        print(f"hetserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
