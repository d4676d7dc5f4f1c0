"""This machine's sustained speed against its profile (issue 6): a per-machine term for the cost model.

A profile times 2 layers in short bursts; machines of one SKU run the whole model under sustained load at
different speeds (session 7: big mixed steps 4% slower than the tables on three H100s, 4% faster on a fourth).
``calibrate`` replays a request stream of its own on the real engine (uniform lengths and Poisson arrivals drawn
here, not the trace under test), records each step's span on the device (CUDA events) and sets it beside the cost
model's time for that step's shape with the profile as measured. The ratio of the sums, by step kind (with a
prefill chunk / decode only), is what ``CostModel`` multiplies the device time by (``runtime_terms.py``:
``mixed_device_scale``, ``decode_device_scale`` in the profile's meta). Used by ``gpu_online_fidelity.py
--calibrate``, which writes the scaled profile beside its result.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

#: the calibration stream: its own lengths and arrivals (seeded), ~25 s on an H100 with the 8B shape
NUM_REQUESTS, RATE, SEED = 160, 14.0, 9001
PROMPT_RANGE, OUTPUT_RANGE = (128, 2048), (16, 256)
#: steps after an idle gap are not sustained work, and steps the model has bound by the host's time say nothing
#: of the device's speed: both are left out
IDLE_GAP_S = 0.5e-3


def calibration_workload(max_input: int, max_output: int) -> list[Any]:
    from hetserve.sim.workload import SimRequest

    rng = random.Random(SEED)
    t, out = 0.0, []
    for _ in range(NUM_REQUESTS):
        t += rng.expovariate(RATE)
        out.append(SimRequest(t, min(max_input, rng.randint(*PROMPT_RANGE)), min(max_output, rng.randint(*OUTPUT_RANGE))))
    return out


def scales_from_steps(steps: dict[str, Any], cm: Any) -> dict[str, Any]:
    """Per step kind: the device spans of busy steps against the model's time for their shapes, unscaled
    (``cm`` as the profile has it, async). Returns the two scales and their evidence."""
    from hetserve.planner.batch_shape import BatchShape

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
        shape = BatchShape(tuple(tuple(c) for c in r[f["prefill_chunks"]]), r[f["num_decode_seqs"]],
                           r[f["decode_context_tokens"]], r[f["num_sampled"]], r[f["num_new_seqs"]],
                           r[f["new_seq_tokens"]], r[f["decode_max_context"]])
        bd = cm.breakdown(shape)
        host = bd["overhead"] + bd["eager_launch"]
        model = cm.step_time_s(shape)
        if model <= host * 1.05:
            continue  # the host's time bounds this step in the model: it says nothing of the device's speed
        d = acc["mixed" if shape.prefill_chunks else "decode"]
        d["real"].append(span)
        d["model"].append(model)
    out: dict[str, Any] = {"workload": {"num_requests": NUM_REQUESTS, "rate": RATE, "seed": SEED,
                                        "prompt_range": PROMPT_RANGE, "output_range": OUTPUT_RANGE}}
    for kind, d in acc.items():
        n = len(d["real"])
        scale = sum(d["real"]) / sum(d["model"]) if n >= 20 else 1.0
        out[kind] = {"steps": n, "real_s": sum(d["real"]), "model_s": sum(d["model"]),
                     "median_ratio": statistics.median(x / m for x, m in zip(d["real"], d["model"], strict=True))
                     if n else None, "scale": round(min(2.0, max(0.5, scale)), 4)}
    out["meta"] = {"mixed_device_scale": out["mixed"]["scale"], "decode_device_scale": out["decode"]["scale"]}
    return out


def calibrated_profile(profile_path: Any, cal: dict[str, Any], dest: Any) -> Any:
    """The profile at ``profile_path`` with the calibration's scales in its meta, written to ``dest``."""
    import json
    from pathlib import Path

    from hetserve.cli.profile import git_commit

    data = json.loads(Path(profile_path).read_text())
    meta = data.setdefault("meta", {})
    meta.update(cal["meta"])
    meta["sustained_calibration"] = {k: cal[k] for k in ("workload", "mixed", "decode")}
    meta["sustained_calibration"]["git_commit"] = git_commit()
    Path(dest).write_text(json.dumps(data, indent=1))
    return Path(dest)
