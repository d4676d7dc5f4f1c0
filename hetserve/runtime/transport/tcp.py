"""TCP transport over pyzmq: a msgspec header frame plus raw payload frames, acknowledged by the receiver.

Each endpoint binds one ROUTER socket, served by a background thread that takes whole messages, hands them to
``recv`` through a bounded queue and acknowledges them. Sending uses one DEALER socket per peer and a socket
monitor: a send waits for the connection's handshake before it queues anything, and a refused or dropped
connection becomes ``PeerUnavailable`` instead of a silent wait (not ``IMMEDIATE``: on a disconnect it drops
an acknowledgement that had already arrived). Payload frames are sent zero-copy
(``copy=False``) and received zero-copy (the returned memoryviews point into the zmq messages). A failed send
closes that peer's socket with linger 0: nothing of the message stays queued.

Subclasses change where buffers travel (``_pack`` / ``_unpack`` / ``_release``), e.g. shared memory. A
subclass whose ``_pack`` copies the buffers (``_may_return_early``) may let ``send`` return before the
acknowledgement (``window`` > 1: up to ``window`` messages per peer unacknowledged); what ``_pack`` set up is then
released when the acknowledgement comes (or the peer is dropped), and a late failure is raised by the next
``send`` to that peer or by ``flush``. The receiving thread takes every message that is there at once (one wake-up
per batch, not per message: it shares the GIL with the process's main loop).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from hetserve.runtime.messages import Ack, Envelope, MessageDecodeError, decode, encode
from hetserve.runtime.transport.base import (
    Buffer,
    Header,
    PeerUnavailable,
    TransferTimeout,
    Transport,
    TransportClosed,
    TransportError,
    as_bytes_view,
    remaining_s,
)

_POLL_MS = 50
_READY_EVENT = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)


class _Peer:
    """A DEALER connected to one peer, and the events of its monitor."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.monitor = self.sock.get_monitor_socket()
        self.ready = False
        self.lost = False
        self.refused = False
        self.created_s = time.monotonic()
        # sent, not yet acknowledged: msg_id -> (deadline, what ``_release`` frees once acknowledged)
        self.outstanding: dict[int, tuple[float, Any]] = {}
        self.sock.connect(address)

    def pump(self, timeout_ms: int = 0) -> None:
        while self.monitor.poll(timeout_ms):
            ev = recv_monitor_message(self.monitor)["event"]
            timeout_ms = 0
            if ev == _READY_EVENT:
                self.ready, self.lost = True, False
            elif ev in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                if self.ready:
                    self.lost = True
                self.ready = False
            elif ev == zmq.EVENT_CONNECT_RETRIED:
                self.refused = True

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class ZmqTransport(Transport):
    """``bind``: a zmq endpoint (``tcp://127.0.0.1:*`` picks a free port). ``advertise``: the address peers
    should use when it differs from the bound one (binding ``tcp://0.0.0.0:*`` on a multi-host cluster: give
    ``tcp://<this host's IP>:<port>``; a ``{port}`` placeholder is filled in). ``connect_timeout_s`` bounds how
    long a send waits for a connection to come up before the peer counts as unavailable."""

    name = "tcp"

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:*",
        connect_timeout_s: float = 1.0,
        max_queued: int = 64,
        advertise: str | None = None,
        window: int = 1,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(bind)
        bound = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._address = bound if advertise is None else advertise.format(port=bound.rsplit(":", 1)[-1])
        self.connect_timeout_s = connect_timeout_s
        self._inbox: queue.Queue[tuple[Header, list[Buffer]]] = queue.Queue(maxsize=max_queued)
        self._peers: dict[str, _Peer] = {}
        # peers whose connection dropped: a refused reconnect then fails at once instead of after the timeout
        self._lost: set[str] = set()
        # one lock per peer (a slow peer does not hold up sends to others), one for the tables
        self._peer_locks: dict[str, threading.Lock] = {}
        self._table_lock = threading.Lock()
        self._msg_ids = itertools.count(1)
        self._unpacking_for = b""  # the ROUTER identity of the message ``_unpack`` is working on
        # ``sink(header, buffers, arrived_s) -> bool``, called on the receiving thread with borrowed buffers
        # (valid only during the call) before a message is queued for ``recv``: True = consumed (it finished
        # reading them), so it is acknowledged and never queued. A receiver that can put a message where it
        # belongs at once saves the copy out of the sender's staging and the hand-over to its reading thread.
        self.sink: Any = None
        # diagnostics (benchmarks/kv_runtime.py's timeline): monotonic marks of the last send / message taken
        self.send_marks: dict[str, float] = {}
        self.recv_marks: dict[str, float] = {}
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"zmq-recv {self._address}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return self._address

    @property
    def num_peer_connections(self) -> int:
        return len(self._peers)

    # ---- where buffers travel (overridden by same-host transports) ----------------------------
    def _pack(self, peer: str, msg_id: int, buffers: Sequence[Buffer]) -> tuple[Envelope, list[Any], Any]:
        """-> (envelope, payload frames, state for ``_release``)."""
        env = Envelope(msg_id=msg_id, sender=self._address, num_buffers=len(buffers))
        return env, [as_bytes_view(b) for b in buffers], None

    def _unpack(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer]:
        if len(frames) != env.num_buffers:
            raise MessageDecodeError(f"{env.num_buffers} buffers announced, {len(frames)} frames arrived")
        return [f.buffer for f in frames]

    def _unpack_borrowed(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer] | None:
        """The buffers as views valid only until ``_take`` returns (no copy, nothing to release), for ``sink``;
        None where that cannot be had (the message then goes the ordinary way)."""
        if env.kind != "inline" or env.handles or len(frames) != env.num_buffers:
            return None
        return [f.buffer for f in frames]

    def _release(self, state: Any) -> None:
        """The send is over (delivered or failed): drop what ``_pack`` set up."""

    def _may_return_early(self, state: Any) -> bool:
        """May ``send`` return before this message is acknowledged? Not when the frames still reference the
        caller's buffers (zero-copy), as here."""
        return False

    def _on_free(self, peer: str, msg_ids: list[int]) -> None:
        """The receiver no longer reads what messages ``msg_ids`` left in memory the sender owns."""

    def _on_reply(self, peer: str, reply: dict[str, Any]) -> None:
        """Another reply of ``peer``'s receiver to this endpoint (a subclass's protocol)."""

    def _peer_dropped(self, peer: str) -> None:
        """``peer``'s socket was dropped (failure, close): free what is kept for it."""

    def _wake_fd(self) -> int | None:
        """A file descriptor that wakes the receiving thread for ``_service`` (None: none)."""
        return None

    def _service(self) -> None:
        """Called by the receiving thread after each wake-up (it owns the ROUTER socket)."""

    def _reply_to(self, ident: bytes, reply: Any) -> None:
        """Send ``reply`` to the sender ``ident`` (receiving thread only)."""
        self._router.send_multipart([ident, encode(reply)])

    # ---- sending ------------------------------------------------------------------------------
    def send(self, peer: str, header: Header, buffers: Sequence[Buffer], deadline_s: float) -> None:
        if self._closed:
            raise TransportClosed(f"{self._address} is closed")
        head = encode(header)
        with self._table_lock:
            lock = self._peer_locks.setdefault(peer, threading.Lock())
        with lock:
            if self._closed:
                raise TransportClosed(f"{self._address} is closed")
            conn = self._connection(peer)
            try:
                self._wait_ready(conn, deadline_s)
                self._wait_acks(conn, self.window - 1, deadline_s)  # room in the window; earlier failures
                msg_id = next(self._msg_ids)
                marks = {"at_send": time.monotonic()}
                env, frames, state = self._pack(peer, msg_id, buffers)
                marks["at_packed"] = time.monotonic()
                conn.outstanding[msg_id] = (deadline_s, state)  # released on its acknowledgement or the drop
                self._send_frames(conn, [encode(env), head, *frames], deadline_s)
                marks["at_framed"] = time.monotonic()
                early = self.window > 1 and self._may_return_early(state)
                self._wait_acks(conn, self.window - 1 if early else 0, deadline_s)
                marks["at_acked"] = time.monotonic()
                self.send_marks = marks
            except BaseException:
                # a half-sent or unacknowledged message must not linger: drop the socket with it
                self._drop(peer)
                raise

    def flush(self, peer: str, deadline_s: float) -> None:
        """Wait until every message sent to ``peer`` was acknowledged; raises what a late one failed with."""
        with self._table_lock:
            lock = self._peer_locks.get(peer)
        if lock is None:
            return
        with lock:
            with self._table_lock:
                conn = self._peers.get(peer)
            if conn is None or not conn.outstanding:
                return
            try:
                self._wait_acks(conn, 0, deadline_s)
            except BaseException:
                self._drop(peer)
                raise

    def _connection(self, peer: str) -> _Peer:
        with self._table_lock:
            conn = self._peers.get(peer)
        if conn is not None:
            conn.pump()
            if conn.lost:
                self._lost.add(peer)
                self._drop(peer)
                conn = None
        if conn is None:
            try:
                conn = _Peer(self._ctx, peer)
            except zmq.ZMQError as e:
                raise PeerUnavailable(f"cannot connect to {peer}: {e}") from None
            with self._table_lock:
                self._peers[peer] = conn
        return conn

    def _drop(self, peer: str) -> None:
        with self._table_lock:
            conn = self._peers.pop(peer, None)
        if conn is not None:
            conn.close()
            for _, state in conn.outstanding.values():
                if state is not None:
                    self._release(state)
            conn.outstanding.clear()
            self._peer_dropped(peer)

    def _wait_ready(self, conn: _Peer, deadline_s: float) -> None:
        give_up_s = min(deadline_s, conn.created_s + self.connect_timeout_s) if not conn.ready else deadline_s
        while not conn.ready:
            if self._closed:
                raise TransportClosed(f"{self._address} was closed during a send")
            left = give_up_s - time.monotonic()
            if conn.refused and conn.address in self._lost:
                raise PeerUnavailable(f"{conn.address} went away and refuses connections")
            if left <= 0:
                if conn.refused or time.monotonic() < deadline_s:
                    raise PeerUnavailable(f"no connection to {conn.address} (refused or unreachable)")
                raise TransferTimeout(f"deadline passed while connecting to {conn.address}")
            conn.pump(timeout_ms=max(1, min(_POLL_MS, int(left * 1000))))
        self._lost.discard(conn.address)

    def _send_frames(self, conn: _Peer, frames: list[Any], deadline_s: float) -> None:
        left_ms = int(remaining_s(deadline_s) * 1000)
        if left_ms <= 0:
            raise TransferTimeout(f"deadline passed before sending to {conn.address}")
        conn.sock.setsockopt(zmq.SNDTIMEO, left_ms)
        try:
            conn.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise TransferTimeout(f"{conn.address} did not take the message before the deadline") from None

    def _wait_acks(self, conn: _Peer, limit: int, deadline_s: float) -> None:
        """Take the peer's replies (acknowledgements, frees) until at most ``limit`` messages are unacknowledged;
        each may take until its own deadline (``deadline_s`` bounds only a wait with nothing outstanding)."""
        self._take_replies(conn)
        if len(conn.outstanding) <= limit:
            return
        poller = zmq.Poller()
        poller.register(conn.sock, zmq.POLLIN)
        poller.register(conn.monitor, zmq.POLLIN)
        while len(conn.outstanding) > limit:
            if self._closed:
                raise TransportClosed(f"{self._address} was closed during a send")
            left = remaining_s(min(d for d, _ in conn.outstanding.values()))
            if left <= 0:
                raise TransferTimeout(f"{conn.address} did not acknowledge before the deadline")
            events = dict(poller.poll(max(1, min(_POLL_MS, int(left * 1000) + 1))))
            # the acknowledgement first: a peer that acknowledged and then closed did take the message
            self._take_replies(conn)
            if len(conn.outstanding) <= limit:
                return
            if conn.monitor in events:
                conn.pump()
                if conn.lost or not conn.ready:
                    self._lost.add(conn.address)
                    raise PeerUnavailable(f"connection to {conn.address} lost during the transfer")

    def _take_replies(self, conn: _Peer) -> None:
        while conn.sock.poll(0):
            reply = decode(conn.sock.recv())
            if isinstance(reply, Ack):
                entry = conn.outstanding.pop(reply.msg_id, None)
                if entry is None:
                    continue
                if entry[1] is not None:
                    self._release(entry[1])
                if not reply.ok:
                    self._on_free(conn.address, [reply.msg_id])  # refused: it holds nothing of ours
                    raise TransportError(f"{conn.address} refused the message: {reply.error}")
            elif isinstance(reply, dict) and isinstance(reply.get("free"), list):
                self._on_free(conn.address, [int(m) for m in reply["free"]])
            elif isinstance(reply, dict):
                self._on_reply(conn.address, reply)

    # ---- receiving ----------------------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        wake = self._wake_fd()
        if wake is not None:
            poller.register(wake, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            # every message already there, then the service: one wake-up (one GIL hand-off) per batch
            while True:
                try:
                    frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if not self._take(frames):
                    return
            self._service()

    def _take(self, frames: list[zmq.Frame]) -> bool:
        ident, rest = frames[0], frames[1:]
        env: Any = None
        try:
            if len(rest) < 2:
                raise MessageDecodeError("a message has an envelope and a header frame")
            env = decode(rest[0].buffer)
            if not isinstance(env, Envelope):
                raise MessageDecodeError("the first frame is not an envelope")
            self._unpacking_for = ident.bytes
            t_rx = time.monotonic()
            header = decode(rest[1].buffer)
            sink = self.sink
            if sink is not None:
                borrowed = self._unpack_borrowed(env, rest[2:])
                try:
                    consumed = borrowed is not None and bool(sink(header, borrowed, t_rx))
                except Exception:  # noqa: BLE001 - a sink's bug must not end this thread: the ordinary way
                    consumed = False
                if consumed:
                    # consumed on this thread (its reads are done): acknowledge; wake the reader, who may be
                    # waiting in ``recv`` for exactly this
                    del borrowed
                    self.recv_marks = {"at_rx": t_rx, "at_unpacked": time.monotonic()}
                    self._router.send_multipart([ident, encode(Ack(msg_id=env.msg_id))])
                    return self._offer(({"sunk": True}, []))
                del borrowed
            item = (header, self._unpack(env, rest[2:]))
            self.recv_marks = {"at_rx": t_rx, "at_unpacked": time.monotonic()}
        except (MessageDecodeError, OSError, ValueError) as e:
            msg_id = env.msg_id if isinstance(env, Envelope) else -1
            self._router.send_multipart([ident, encode(Ack(msg_id=msg_id, ok=False, error=str(e)))])
            return True
        if not self._offer(item):
            return False
        self._router.send_multipart([ident, encode(Ack(msg_id=env.msg_id))])
        return True

    def _offer(self, item: tuple[Header, list[Buffer]]) -> bool:
        # a full inbox holds the ack back, so a receiver that stops reading stalls its senders (deadline)
        while not self._stop.is_set():
            try:
                self._inbox.put(item, timeout=_POLL_MS / 1000)
                return True
            except queue.Full:
                continue
        return False

    def recv(self, timeout_s: float) -> tuple[Header, list[Buffer]]:
        if self._closed:
            raise TransportClosed(f"{self._address} is closed")
        try:
            return self._inbox.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            raise TransferTimeout(f"nothing arrived at {self._address} in {timeout_s} s") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._table_lock:
            locks = list(self._peer_locks.items())
        for peer, lock in locks:  # wait for sends in progress, then drop their sockets
            with lock:
                self._drop(peer)
        for peer in list(self._peers):
            self._drop(peer)
        # a short linger lets the acknowledgement of the last message taken still reach its sender
        self._router.close(linger=200)
        self._ctx.term()


def default_ipc_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
