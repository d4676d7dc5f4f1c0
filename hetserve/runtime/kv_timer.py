"""Callbacks at given ``time.monotonic()`` times, on one thread: what waits for a declared link in ``kv_direct.py``
(a commit to another host, ``KVSent``), so the sender thread itself never waits a link out."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from hetserve.runtime.kv_transfer import LinkPacer


class Timer:
    """Runs callbacks at ``time.monotonic()`` times, in time order, on one thread (started on first use)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._n = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def at(self, t_s: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (t_s, next(self._n), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kv-link", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (not self._heap or self._heap[0][0] - time.monotonic() > 5e-4):
                    # sleep most of the way, then spin the last fraction of a millisecond: sleep overshoots
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic() - 5e-4)
                if self._closed:
                    return
                t_s, _, fn = heapq.heappop(self._heap)
            LinkPacer(None).wait_until(t_s)
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 - a callback reports its own failure; the timer lives on
                pass

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
