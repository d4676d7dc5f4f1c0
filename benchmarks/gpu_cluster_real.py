"""The real side of ``gpu_cluster.py``: a run replayed against the engine with a wall-clock cap (and
``--fail-fast``), its metrics."""

from __future__ import annotations

import time
from typing import Any


class _Capped:
    """The engine as ``replay`` sees it, with a wall-clock cap: past ``cap_s`` it reports nothing unfinished, so
    ``replay`` returns (only once every request was sent: ``replay`` then waits for no arrival). With
    ``fail_ttft_s`` (``--fail-fast``) it also cuts once more than 10% of the run's requests got no first token within
    that long of being added: they missed the TTFT SLO, so fewer than 90% can be good whatever follows (a request
    is added at or after its arrival, so this never counts a miss too many)."""

    def __init__(self, engine: Any, cap_s: float | None, num_requests: int, fail_ttft_s: float | None = None) -> None:
        self.engine, self.cap_s, self.t0, self.cut, self.ids = engine, cap_s, time.monotonic(), False, []
        self.num_requests, self.just_added = num_requests, False
        self.fail_ttft_s, self.cut_reason, self.cut_at_s = fail_ttft_s, None, None
        self.waiting_first: dict[str, float] = {}  # request -> when it was added, until its first token
        self.num_late = 0  # requests whose first token came later than fail_ttft_s after they were added

    def add_request(self, rid: str, *a: Any, **kw: Any) -> Any:
        self.ids.append(rid)
        self.just_added = True
        if self.fail_ttft_s is not None:
            self.waiting_first[rid] = time.monotonic()
        return self.engine.add_request(rid, *a, **kw)

    def _num_missed(self, now: float) -> int:
        assert self.fail_ttft_s is not None
        return self.num_late + sum(1 for t in self.waiting_first.values() if now - t > self.fail_ttft_s)

    def has_unfinished_requests(self) -> bool:
        just_added, self.just_added = self.just_added, False  # replay asks right after adding: answer truly
        if len(self.ids) >= self.num_requests and not just_added:
            now = time.monotonic()
            if self.cap_s is not None and now - self.t0 > self.cap_s:
                self.cut, self.cut_reason, self.cut_at_s = True, "cap", now - self.t0
                return False
            if self.fail_ttft_s is not None and self._num_missed(now) > 0.1 * self.num_requests:
                self.cut, self.cut_reason, self.cut_at_s = True, "fail-fast", now - self.t0
                return False
        return self.engine.has_unfinished_requests()

    def step(self) -> Any:
        outs = self.engine.step()
        if self.fail_ttft_s is not None and self.waiting_first:
            now = time.monotonic()
            for o in outs:
                t = self.waiting_first.get(o.request_id)
                if t is not None and o.outputs and o.outputs[0].delta_token_ids:
                    del self.waiting_first[o.request_id]
                    self.num_late += now - t > self.fail_ttft_s
        return outs


def run_real(engine: Any, wl: list[Any], slo: Any, vocab_hi: int, cap_s: float | None = None,
             fail_ttft_s: float | None = None) -> dict[str, Any]:
    from replay import replay

    from hetserve.bench.metrics import compute_metrics

    capped = _Capped(engine, cap_s, len(wl), fail_ttft_s)
    records, dur = replay(capped, wl, vocab_range=(10, vocab_hi))
    if capped.cut:  # a request cut short did not finish: it failed (and could not have met the SLO)
        why = "cut at the run cap" if capped.cut_reason == "cap" else "cut: > 10% had missed the TTFT SLO"
        for rec in records:
            if rec.success and rec.output_len < rec.expected_output_len:
                rec.success, rec.error = False, why
            elif not rec.success:
                rec.error = why
        until = cap_s if capped.cut_reason == "cap" else capped.cut_at_s
        dur = max(dur, (until or 0.0) - min(w.arrival_s for w in wl))  # the engine worked until the cut
    m = compute_metrics(records, dur, slo)
    m["errors"] = sum(1 for r in records if not r.success)
    m["good_fraction"] = (m["request_goodput"] or 0) * m["duration"] / max(1, len(records))
    m["cut"] = capped.cut
    m["cut_reason"] = capped.cut_reason
    m["request_ids"] = capped.ids  # to abort what a cut left in the engine
    return m
