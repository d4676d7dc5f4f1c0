"""KV transports by name: the one place they are registered.

``make_transport("tcp", bind="tcp://0.0.0.0:5555")`` builds one; ``transport_availability()`` says which work
here and why the others do not (NIXL needs its package; CUDA IPC inside ``shm`` needs a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hetserve.core.registry import Registry
from hetserve.runtime.transport.base import (
    PeerUnavailable,
    TransferTimeout,
    Transport,
    TransportClosed,
    TransportError,
)

TRANSPORTS: Registry[Transport] = Registry("kv transport")


def _local(**kw: Any) -> Transport:
    from hetserve.runtime.transport.local import LocalTransport

    return LocalTransport(**kw)


def _shm(**kw: Any) -> Transport:
    from hetserve.runtime.transport.shm import ShmTransport

    return ShmTransport(**kw)


def _tcp(**kw: Any) -> Transport:
    from hetserve.runtime.transport.tcp import ZmqTransport

    return ZmqTransport(**kw)


def _nixl(**kw: Any) -> Transport:
    from hetserve.runtime.transport.nixl import NixlTransport

    return NixlTransport(**kw)


def _zmq_reason() -> str | None:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return "pyzmq is not installed (pip install 'hetserve[server]')"
    return None


def _nixl_reason() -> str | None:
    if (r := _zmq_reason()) is not None:
        return r
    from hetserve.runtime.transport.nixl import nixl_unavailable_reason

    return nixl_unavailable_reason()


_UNAVAILABLE: dict[str, Callable[[], str | None]] = {
    "local": lambda: None,
    "shm": _zmq_reason,
    "tcp": _zmq_reason,
    "nixl": _nixl_reason,
}
for _name, _factory in (("local", _local), ("shm", _shm), ("tcp", _tcp), ("nixl", _nixl)):
    TRANSPORTS.register(_name)(_factory)


def transport_availability() -> dict[str, str | None]:
    """Every registered transport -> None if usable here, else the reason it is not."""
    return {name: _UNAVAILABLE[name]() for name in TRANSPORTS.names()}


def make_transport(name: str, **kwargs: Any) -> Transport:
    """A new endpoint of the named transport; raises TransportError saying why when it cannot work here."""
    factory = TRANSPORTS.get(name)
    reason = _UNAVAILABLE[name]()
    if reason is not None:
        raise TransportError(f"transport {name!r} is unavailable: {reason}")
    return factory(**kwargs)  # type: ignore[call-arg]


__all__ = [
    "TRANSPORTS",
    "PeerUnavailable",
    "TransferTimeout",
    "Transport",
    "TransportClosed",
    "TransportError",
    "make_transport",
    "transport_availability",
]
