"""The pure-Python layers (core, kv, sched, planner, strategies, sim) must import with torch unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PURE = ["hetserve.core", "hetserve.engine.kv", "hetserve.engine.sched", "hetserve.planner",
        "hetserve.strategies", "hetserve.sim", "hetserve.bench.records", "hetserve.bench.metrics", "hetserve.bench.datasets"]


def _pure_modules() -> list[str]:
    mods = []
    for pkg in PURE:
        d = ROOT / pkg.replace(".", "/")
        files = [d.with_suffix(".py")] if d.with_suffix(".py").exists() else sorted(d.rglob("*.py"))
        for f in files:
            rel = f.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.append(".".join(parts))
    return mods


def test_pure_layers_import_without_torch():
    mods = _pure_modules()
    assert "hetserve.engine.sched.scheduler" in mods and "hetserve.bench.metrics" in mods
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "numpy", "safetensors", "tokenizers", "transformers"):
            sys.modules[name] = None  # any import of these raises ImportError
        import importlib
        for m in {mods!r}:
            importlib.import_module(m)
        import hetserve
        assert hetserve.SamplingParams
        print("ok", len({mods!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
