"""One plain-HTTP connection to an upstream, with explicit states."""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol, cast

from mtlsproxy.errors import ConnectionClosed, ProtocolError, UpstreamError
from mtlsproxy.http.parser import Event, ResponseParser
from mtlsproxy.http.wire import LAST_CHUNK, chunk
from mtlsproxy.proxy.inbox import Inbox
from mtlsproxy.runtime.writes import WriteBatch


class Exchange(Protocol):
    """One request/response with an upstream, whatever its protocol: an HTTP/1.1
    ``UpstreamConnection`` or an HTTP/2 stream (proxy/h2upstream.py)."""

    key: str
    inbox: Inbox[Event]

    @property
    def write_paused(self) -> bool: ...
    def expect(self, method: bytes) -> None: ...
    def send_head(self, head: bytes, end_stream: bool = False) -> None: ...
    def send_body(self, data: bytes | bytearray, chunked: bool = False) -> None: ...
    def end_body(self, chunked: bool = False) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class DirectHandler(Protocol):
    def upstream_events(self, events: list[Event]) -> None: ...
    def upstream_failed(self, exc: BaseException, events: list[Event]) -> None: ...


class UpstreamState(enum.Enum):
    CONNECTING = "connecting"
    ACTIVE = "active"   # carrying one request/response
    IDLE = "idle"       # in the pool
    CLOSED = "closed"

    __hash__ = object.__hash__  # identity: see TLSState (two transitions per request)


# The members as module globals, for the checks made per request (see TLSState's note
# in tls/bio.py: ``UpstreamState.X`` costs an ``EnumType.__getattr__`` slot call in 3.11).
CONNECTING, ACTIVE, IDLE, CLOSED = (UpstreamState.CONNECTING, UpstreamState.ACTIVE,
                                    UpstreamState.IDLE, UpstreamState.CLOSED)

_ALLOWED = {
    UpstreamState.CONNECTING: {UpstreamState.ACTIVE, UpstreamState.CLOSED},
    UpstreamState.ACTIVE: {UpstreamState.IDLE, UpstreamState.CLOSED},
    UpstreamState.IDLE: {UpstreamState.ACTIVE, UpstreamState.CLOSED},
    UpstreamState.CLOSED: set(),
}


class UpstreamConnection:
    """An ``asyncio.Protocol`` without that base class, as TLSConnection (tls/bio.py)."""

    __slots__ = ("key", "pool_key", "parser", "state", "transport", "inbox", "requests",
                 "idle_since", "answered", "_write_paused", "_drain_waiter", "direct",
                 "_writes", "_out", "__weakref__")

    def __init__(self, key: str, parser: ResponseParser,
                 writes: WriteBatch | None = None, pool_key: str | None = None) -> None:
        self.key = key  # metrics and logs
        self.pool_key = pool_key or key  # the idle list it goes back to
        self.parser = parser
        self.state = CONNECTING
        self.transport: asyncio.Transport | None = None
        self.inbox: Inbox[Event] = Inbox(self._pause_reading, self._resume_reading)
        self.requests = 0
        self.idle_since = 0.0
        # Whether any byte of the current response arrived: a close before the first one
        # is ConnectionClosed (the request may be retried), after it an UpstreamError.
        self.answered = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # A fast exchange (proxy/session.py) takes events straight from the callbacks; when
        # it is None they queue in ``inbox`` for a task.
        self.direct: DirectHandler | None = None
        # Sends deferred to the end of the loop's pass (runtime/writes.py) wait here, in order.
        self._writes = writes
        self._out: list[bytes | bytearray] = []

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.key} {self.state.value} requests={self.requests}>"

    def set_state(self, new: UpstreamState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"upstream state {self.state.value} -> {new.value} is not allowed")
        self.state = new

    def expect(self, method: bytes) -> None:
        """A ``method`` request is being sent: the next bytes answer it."""
        self.answered = False
        self.parser.expect(method)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.state is not ACTIVE:
            # Bytes while idle: the upstream is confused; this connection is not reusable.
            self.close()
            return
        self.answered = True
        try:
            events = self.parser.feed(data)
        except ProtocolError as exc:
            self._ended(UpstreamError(str(exc), "protocol"), [])
            self.close()
            return
        direct = self.direct
        if direct is not None:
            direct.upstream_events(events)
        else:
            self.inbox.put(events)

    def eof_received(self) -> bool | None:
        events: list[Event] = []
        error: BaseException = ConnectionClosed("upstream closed the connection")
        if self.state is ACTIVE and self.answered:
            try:
                events = self.parser.feed_eof()
            except ProtocolError as exc:
                error = UpstreamError(str(exc), "reset")
        self._ended(error, events)
        return False

    def _ended(self, error: BaseException, events: list[Event]) -> None:
        direct, self.direct = self.direct, None
        if direct is not None:
            direct.upstream_failed(error, events)  # it queues both in the inbox
        else:
            if events:
                self.inbox.put(events)
            self.inbox.fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not CLOSED:
            self.state = CLOSED
        self._ended(ConnectionClosed("upstream connection lost"), [])
        self._wake(exc or ConnectionResetError("upstream connection lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(None)

    def _wake(self, exc: BaseException | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes | bytearray) -> None:
        if self.transport is None or self.transport.is_closing():
            raise UpstreamError("upstream connection closed while sending", "reset")
        if self._writes is None:
            self.transport.write(data)
            return
        if not self._out:
            self._writes.add(self)
        self._out.append(data)

    def send_head(self, head: bytes, end_stream: bool = False) -> None:
        self.write(head)

    def send_body(self, data: bytes | bytearray, chunked: bool = False) -> None:
        self.write(chunk(data) if chunked else data)

    def end_body(self, chunked: bool = False) -> None:
        if chunked:
            self.write(LAST_CHUNK)

    def flush_deferred(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self.state is CLOSED:
            raise UpstreamError("upstream connection closed while sending", "reset")
        self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    def close(self) -> None:
        self.flush_deferred()  # a request written in this pass still goes out first
        if self.state is not CLOSED:
            self.state = CLOSED
        if self.transport is not None:
            self.transport.close()
