"""This machine's sustained speed against its profile: a per-machine term for the cost model (issue 6).

A profile times a few layers in short bursts. Machines of one SKU run the whole model under sustained load at
different speeds (clocks under load: session 7 saw big mixed steps 4% slower than the tables on three H100s and
4% faster on a fourth; session 8 measured 0.978 and 0.995 on two). ``calibrate`` serves a request stream of its
own (uniform lengths, Poisson arrivals, seeded: not any trace under test) on an engine holding the whole model,
records each step's span (CUDA events on a GPU: the device's time, idle gaps inside included; the host's wall
time on a CPU, where the host is the device) and sets it beside the cost model's time for that step's shape with
the profile as measured. The ratio of the sums, by step kind (with a prefill chunk / decode only), is what
``CostModel`` multiplies the device time by (``planner/runtime_terms.py``: ``mixed_device_scale``,
``decode_device_scale`` in the profile's meta). ``hetserve profile --sustained`` and
``benchmarks/gpu_online_fidelity.py --calibrate`` run it.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

#: the calibration stream: its own lengths and arrivals (seeded); ~25 s on an H100 with the 8B shape
NUM_REQUESTS, RATE, SEED = 160, 14.0, 9001
PROMPT_RANGE, OUTPUT_RANGE = (128, 2048), (16, 256)
#: a step whose launch starts this long after the previous result follows an idle engine: not sustained work
IDLE_GAP_S = 0.5e-3
#: fewer steps of a kind than this: no scale for it (1.0)
MIN_STEPS = 20
#: a step whose span is this many times off the median ratio is left out of the sums
OUTLIER = 3.0
FIELDS = ("launch_start_s", "launch_end_s", "ready_s", "num_decode_seqs", "decode_context_tokens",
          "prefill_chunks", "num_sampled", "num_new_seqs", "new_seq_tokens", "device_span_s", "decode_max_context")


def calibration_workload(max_input: int, max_output: int, num_requests: int = NUM_REQUESTS, rate: float = RATE,
                         seed: int = SEED) -> list[Any]:
    from hetserve.sim.workload import SimRequest

    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        out.append(SimRequest(t, min(max_input, rng.randint(*PROMPT_RANGE)),
                              min(max_output, rng.randint(*OUTPUT_RANGE))))
    return out


class StepLog:
    """Wraps a runner's ``execute_async``: per step its batch shape (``BatchShape`` fields), when the launch
    started and ended, when its result was ready, and (``finish``) its span on the device."""

    def __init__(self, runner: Any) -> None:
        import torch

        self.runner = runner
        self.inner = runner.execute_async
        self.rows: list[list[Any]] = []
        # on CUDA, an event before and after each launch: the stream reaches the first once the step before is
        # done, the second once this step is; their gap is the step's span on the device
        self.cuda = torch.cuda.is_available() and getattr(getattr(runner, "device", None), "type", "") == "cuda"
        self.events: list[tuple[Any, Any]] = []
        runner.execute_async = self.execute_async

    def execute_async(self, so: Any) -> Any:
        from hetserve.planner.batch_shape import BatchShape

        t0 = time.perf_counter()
        if self.cuda:
            import torch

            e0 = torch.cuda.Event(enable_timing=True)
            e0.record()
        res = self.inner(so)
        if self.cuda:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            self.events.append((e0, e1))
        t1 = time.perf_counter()
        sh = BatchShape.from_scheduler_output(so)
        row = [t0, t1, None, sh.num_decode_seqs, sh.decode_context_tokens, [list(c) for c in sh.prefill_chunks],
               sh.num_sampled, sh.num_new_seqs, sh.new_seq_tokens, None, sh.decode_max_context]
        self.rows.append(row)

        class Ready:
            def __getattr__(self, name: str) -> Any:
                return getattr(res, name)

            def result(self) -> Any:
                out = res.result()
                if row[2] is None:
                    row[2] = time.perf_counter()
                return out

        return Ready()

    def finish(self) -> dict[str, Any]:
        """Unwrap the runner; the rows whose result was read, spans filled in."""
        self.runner.execute_async = self.inner
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            for row, (e0, e1) in zip(self.rows, self.events, strict=True):
                row[9] = e0.elapsed_time(e1) / 1e3
        else:  # the host is the device: launch to result
            for row in self.rows:
                if row[2] is not None:
                    row[9] = row[2] - row[0]
        return {"fields": list(FIELDS), "rows": [r for r in self.rows if r[2] is not None]}


def row_shape(f: dict[str, int], r: list[Any]) -> Any:
    """The ``BatchShape`` of one ``StepLog`` row (``f``: field name -> column; older logs lack some fields)."""
    from hetserve.planner.batch_shape import BatchShape

    def get(name: str, default: Any = None) -> Any:
        return r[f[name]] if name in f else default

    return BatchShape(tuple(tuple(c) for c in r[f["prefill_chunks"]]), r[f["num_decode_seqs"]],
                      r[f["decode_context_tokens"]], get("num_sampled"), get("num_new_seqs", 0),
                      get("new_seq_tokens", 0), get("decode_max_context", 0))


def scales_from_steps(steps: dict[str, Any], cm: Any) -> dict[str, Any]:
    """Per step kind: the spans of busy steps against the model's time for their shapes (``cm`` unscaled, with
    the engine's async flag). Steps after an idle gap, steps the model has bound by the host's time (they say
    nothing of the device's speed) and steps ``OUTLIER`` times off the median are left out. Returns the two
    scales (``meta``) and their evidence."""
    f = {name: i for i, name in enumerate(steps["fields"])}
    rows = sorted(steps["rows"], key=lambda r: r[f["ready_s"]])
    acc: dict[str, dict[str, list[float]]] = {"mixed": {"real": [], "model": []}, "decode": {"real": [], "model": []}}
    prev_ready = None
    for r in rows:
        start, ready, span = r[f["launch_start_s"]], r[f["ready_s"]], r[f["device_span_s"]]
        after_gap = prev_ready is None or start - prev_ready > IDLE_GAP_S
        prev_ready = ready
        if after_gap or span is None:
            continue
        shape = row_shape(f, r)
        bd = cm.breakdown(shape)
        model = cm.step_time_s(shape)
        if model <= (bd["overhead"] + bd["eager_launch"]) * 1.05:
            continue
        d = acc["mixed" if shape.prefill_chunks else "decode"]
        d["real"].append(span)
        d["model"].append(model)
    out: dict[str, Any] = {"workload": {"prompt_range": PROMPT_RANGE, "output_range": OUTPUT_RANGE}}
    for kind, d in acc.items():
        ratios = [x / m for x, m in zip(d["real"], d["model"], strict=True)]
        med = statistics.median(ratios) if ratios else None
        # a step OUTLIER x off the median is the host's doing (a preempted process, a collection), not the device's
        keep = [i for i, q in enumerate(ratios) if med is not None and med / OUTLIER <= q <= med * OUTLIER]
        real, model = sum(d["real"][i] for i in keep), sum(d["model"][i] for i in keep)
        n = len(keep)
        scale = real / model if n >= MIN_STEPS else 1.0
        out[kind] = {"steps": n, "dropped_outliers": len(ratios) - n, "real_s": real, "model_s": model,
                     "median_ratio": med, "scale": round(min(2.0, max(0.5, scale)), 4)}
    out["meta"] = {"mixed_device_scale": out["mixed"]["scale"], "decode_device_scale": out["decode"]["scale"]}
    return out


def replay(engine: Any, workload: list[Any], vocab_hi: int, seed: int = 0) -> None:
    """Add each request at its arrival time (wall clock) and step the engine until all are done."""
    from hetserve.core.sampling_params import SamplingParams

    rng = random.Random(seed)
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while nxt < len(order) and workload[order[nxt]].arrival_s <= now:
            w = workload[order[nxt]]
            engine.add_request(f"cal-{order[nxt]}", [rng.randrange(10, vocab_hi) for _ in range(w.prompt_len)],
                               SamplingParams(max_tokens=w.output_len, ignore_eos=True, temperature=0.0,
                                              detokenize=False))
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, workload[order[nxt]].arrival_s - (time.perf_counter() - t0)))
            continue
        engine.step()


def measure(engine: Any, cm: Any, max_input: int, max_output: int, vocab_hi: int,
            num_requests: int = NUM_REQUESTS, rate: float = RATE) -> dict[str, Any]:
    """Serve the calibration stream on ``engine`` and return ``scales_from_steps`` against ``cm``."""
    runner = engine.executor if hasattr(engine, "executor") else engine.core.executor
    log = StepLog(runner)
    try:
        replay(engine, calibration_workload(max_input, max_output, num_requests, rate), vocab_hi)
    finally:
        steps = log.finish()
    out = scales_from_steps(steps, cm)
    out["workload"].update(num_requests=num_requests, rate=rate, seed=SEED)
    return out


def write_scales(profile_path: str | Path, cal: dict[str, Any], dest: str | Path, git_commit: str = "") -> Path:
    """The profile at ``profile_path`` with the calibration's scales (and its evidence) in its meta."""
    data = json.loads(Path(profile_path).read_text())
    meta = data.setdefault("meta", {})
    meta.update(cal["meta"])
    meta["sustained_calibration"] = {k: cal[k] for k in ("workload", "mixed", "decode")}
    if git_commit:
        meta["sustained_calibration"]["git_commit"] = git_commit
    Path(dest).write_text(json.dumps(data, indent=1))
    return Path(dest)
