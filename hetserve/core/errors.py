"""Errors raised by hetserve. Each names the field (or flag, or config key) at fault."""

from __future__ import annotations


class HetserveError(Exception):
    """Base class of every error hetserve raises on purpose."""


class ValidationError(HetserveError, ValueError):
    """Bad user input. ``field`` names the parameter, flag or config key at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelLoadError(HetserveError):
    """A model directory is missing files, has corrupt files or an unsupported architecture."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class EngineDeadError(HetserveError):
    """The engine loop died; no more requests can be served."""


class QueueFullError(HetserveError):
    """The waiting queue holds ``max_queued_requests`` already."""
