"""Import a script of ``benchmarks/`` as a module (they are scripts, not a package), for the tests here."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``_bench_<name>``, with ``benchmarks/`` importable (the scripts import
    each other) and this process's environment restored afterwards (some scripts set variables at import)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    env = dict(os.environ)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return mod
