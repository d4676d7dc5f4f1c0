"""Drive the real engine in-process with timed arrivals (no HTTP), recording the same per-request records as
``hetserve bench`` and the simulator, so the three can be compared number for number.

The driver is the engine loop of an offline server: between two steps it takes in every request whose arrival
time has passed (a request that arrives during a step waits for the step to end, as in the simulator), and
when nothing is running it sleeps until the next arrival. Prompts are drawn before the clock starts, so the
driver's own work is not charged to the engine. With ``timeline`` it also records, per request, when it was
taken in (``added_s``) and, per step, its start, end and number of new requests.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from typing import Any

from hetserve.bench.records import RequestRecord
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.llm_engine import LLMEngine
from hetserve.sim.workload import SimRequest


def replay(engine: LLMEngine, workload: Sequence[SimRequest], seed: int = 0,
           vocab_range: tuple[int, int] = (10, 400),
           timeline: dict[str, Any] | None = None) -> tuple[list[RequestRecord], float]:
    """Send each request at its arrival time (wall clock), step the engine, record token times.
    Returns the records and the duration (first arrival to last token)."""
    rng = random.Random(seed)
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    prompts = {i: [rng.randrange(*vocab_range) for _ in range(workload[i].prompt_len)] for i in order}
    params = {i: SamplingParams(max_tokens=workload[i].output_len, ignore_eos=True, temperature=0.0,
                                detokenize=False) for i in order}
    records = [RequestRecord(index=i, prompt_len=w.prompt_len, expected_output_len=w.output_len,
                             scheduled_s=w.arrival_s) for i, w in enumerate(workload)]
    token_times: dict[int, list[float]] = {}
    added: dict[int, float] = {}
    steps: list[tuple[float, float, int]] = []
    t0 = time.perf_counter()
    nxt = 0
    last = 0.0
    while nxt < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        num_new = 0
        while nxt < len(order) and workload[order[nxt]].arrival_s <= now:
            i = order[nxt]
            engine.add_request(str(i), prompts[i], params[i])
            token_times[i] = []
            added[i] = now
            num_new += 1
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, workload[order[nxt]].arrival_s - (time.perf_counter() - t0)))
            continue
        start = time.perf_counter() - t0
        outs = engine.step()
        now = time.perf_counter() - t0
        if timeline is not None:
            steps.append((start, now, num_new))
        for o in outs:
            i = int(o.request_id)
            n = len(o.outputs[0].delta_token_ids)
            token_times[i].extend([now] * n)
            if o.finished:
                last = max(last, now)
    for i, w in enumerate(workload):
        times = token_times.get(i, [])
        rec = records[i]
        if times:
            rec.success = True
            rec.output_len = len(times)
            rec.ttft_s = times[0] - w.arrival_s
            rec.itl_s = [b - a for a, b in itertools.pairwise(times)]
            rec.e2el_s = times[-1] - w.arrival_s
            rec.start_s, rec.end_s = w.arrival_s, times[-1]
        else:
            rec.error = "no tokens"
    if timeline is not None:
        timeline["added_s"] = [added.get(i) for i in range(len(workload))]
        timeline["steps"] = steps
    first = min(w.arrival_s for w in workload)
    return records, last - first
