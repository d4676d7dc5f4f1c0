"""Where a worker's threads spend their wall time: a sampling profiler for diagnosis (``HETSERVE_SAMPLE_DIR``).

cProfile cannot profile several threads at once on Python 3.12 (one profiler per process) and slows Python code
severalfold; py-spy needs ptrace. This thread wakes every ``interval_s``, reads every other thread's Python stack
(``sys._current_frames``: a thread blocked in C shows the Python line that called it) and counts, per thread,
the innermost frames. ``dump`` writes, per thread, the most frequent stacks and each function's inclusive share
of the samples. It takes the GIL at each wake-up: timings with it on are a little slower than without.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path


class StackSampler:
    def __init__(self, path: str | Path, interval_s: float = 2e-4, depth: int = 6) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.depth = depth
        self.stacks: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.samples: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            names = {t.ident: t.name for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                name = names.get(tid, str(tid))
                stack = []
                f = frame
                while f is not None and len(stack) < self.depth:
                    code = f.f_code
                    stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{f.f_lineno}")
                    f = f.f_back
                self.stacks[name, tuple(stack)] += 1
                self.samples[name] += 1

    def dump(self) -> None:
        """Per thread: its samples, the share spent waiting (innermost frame one of ``_IDLE``), and over the busy
        samples only: each function's inclusive share and the most frequent stacks (innermost first)."""
        self._stop.set()
        self._thread.join(1.0)
        out: dict[str, object] = {"interval_s": self.interval_s, "threads": {}}
        for name, n in self.samples.most_common():
            funcs: Counter[str] = Counter()
            busy: Counter[tuple[str, ...]] = Counter()
            for (tn, stack), c in self.stacks.items():
                if tn != name or not stack or stack[0].split(":")[1] in _IDLE:
                    continue
                busy[stack] += c
                for fn in {s.rsplit(":", 1)[0] for s in stack}:  # inclusive, once per sample
                    funcs[fn] += c
            nb = sum(busy.values())
            out["threads"][name] = {  # type: ignore[index]
                "samples": n, "busy_samples": nb,
                "functions": {f: round(c / nb, 4) for f, c in funcs.most_common(40)},
                "stacks": [{"share": round(c / nb, 4), "stack": list(st)} for st, c in busy.most_common(25)],
            }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(out, indent=1))


# innermost frames that are a thread waiting for work, not doing it
_IDLE = frozenset({"wait", "get", "poll", "_exact", "recv_bytes", "select", "sleep", "_wait_for_tstate_lock",
                   "recv", "_serve", "wait_until"})


def from_env(tag: str) -> StackSampler | None:
    d = os.environ.get("HETSERVE_SAMPLE_DIR")
    if not d:
        return None
    return StackSampler(Path(d) / f"{tag}-{os.getpid()}-{int(time.time())}.json")
