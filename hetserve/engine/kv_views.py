"""The runner's KV cache as per-layer views of one allocation, remembering the allocation."""

from __future__ import annotations

import torch


class LayerViews(list):  # type: ignore[type-arg]
    """Per-layer views ``whole.unbind(0)`` that remember ``whole``: ``stacked_view`` of them costs nothing.

    Checking 32 views one by one costs ~30 us of host time, and a hand-off asked it four to six times per side
    (extract, convert, pack, insert); the producers that have the stacked tensor hand it on this way.
    """

    __slots__ = ("_ends", "whole")

    def __init__(self, whole: torch.Tensor) -> None:
        super().__init__(whole.unbind(0))
        self.whole = whole
        self._ends = (id(self[0]), id(self[-1])) if len(self) else (0, 0)

    def intact(self) -> bool:
        """The list still holds exactly the views it was made with (nobody replaced or added one)."""
        return len(self) == self.whole.shape[0] and bool(len(self)) and (id(self[0]), id(self[-1])) == self._ends
