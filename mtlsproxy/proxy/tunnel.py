"""Tunnels: bytes both ways between a client's TLS connection and an upstream socket, once
an HTTP/1.1 Upgrade got its 101 (a WebSocket, RFC 6455 section 4).

Rules of this module:
- A tunnel decides nothing about who may pass: it starts after the admission step did
  (proxy/session.py, proxy/tcp.py), and every second asks that step again
  (``Admission.admit_now``, and ``still_admitted`` when an OCSP answer must be awaited),
  so a certificate that expires, is revoked, or whose CA leaves the truststore ends it,
  as any of them would refuse a keep-alive connection's next request.
- Back-pressure both ways: while the upstream socket's send buffer is full, reading from
  the client pauses; while the client's TLS connection is write-paused, reading from the
  upstream pauses until it drains. Neither side's bytes pile up in the proxy.
- Half-close passes through (RFC 9293 section 3.6): the client's close_notify or FIN
  becomes a FIN upstream; the upstream's FIN becomes a close_notify to the client, whose
  bytes are still read. The tunnel ends when both sides have finished, when either is
  lost, after ``timeouts.idle`` without a byte either way, or when admission refuses.
- It ends once: one count, one access log line (bytes each way, duration), the gauge
  ``mtlsproxy_tunnels_active`` back down.
- ``open_upgrade`` reads the upstream's answer head itself: a 101 becomes a tunnel, any
  other answer is handed to an ordinary ``UpstreamConnection`` to be forwarded as a
  response.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from mtlsproxy.admission.admit import PENDING, Refusal
from mtlsproxy.config import RouteConfig, Upstream
from mtlsproxy.errors import ConnectionClosed, UpstreamError
from mtlsproxy.proxy.connect import connect
from mtlsproxy.tls.bio import OPEN, HandshakeOver, TLSConnection
from mtlsproxy.tls.upstream import UpstreamTLSContexts

if TYPE_CHECKING:
    from mtlsproxy.admission.admit import Admission
    from mtlsproxy.admission.cache import Verdict
    from mtlsproxy.http.events import Request

log = logging.getLogger("mtlsproxy.tunnel")

# How often a tunnel asks admission again (the listener's ticker runs more often).
RECHECK_INTERVAL = 1.0


class TunnelState(enum.Enum):
    """Where a tunnel is; ``Tunnel._enter`` checks every transition."""

    RELAYING = "relaying"  # both ways open
    CLIENT_DONE = "client_done"  # the client finished sending (FIN passed upstream)
    UPSTREAM_DONE = "upstream_done"  # the upstream finished (close_notify passed on)
    CLOSED = "closed"

    __hash__ = object.__hash__


RELAYING, CLIENT_DONE, UPSTREAM_DONE, CLOSED = (
    TunnelState.RELAYING, TunnelState.CLIENT_DONE, TunnelState.UPSTREAM_DONE,
    TunnelState.CLOSED)
TRANSITIONS: dict[TunnelState, frozenset[TunnelState]] = {
    RELAYING: frozenset({CLIENT_DONE, UPSTREAM_DONE, CLOSED}),
    CLIENT_DONE: frozenset({CLOSED}),
    UPSTREAM_DONE: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class TunnelStateError(RuntimeError):
    """A transition the state machine does not have: a bug."""


class Tunnel(HandshakeOver):
    """The client connection's handler after the switch, and the owner of the upstream
    transport (through ``_UpstreamEnd``)."""

    __slots__ = ("rt", "conn", "kind", "verdict", "admission", "route", "req",
                 "upstream_key", "state", "deadline", "received", "sent", "_start",
                 "_up", "_last", "_next_check", "_gauge", "_on_end", "_checking", "_route_now",
                 "__weakref__")

    def __init__(self, rt: Any, conn: TLSConnection, transport: asyncio.Transport,
                 kind: str, verdict: Verdict, admission: Admission, route: RouteConfig,
                 req: Request | None, upstream_key: str, start: float,
                 on_end: Callable[[Tunnel, int], None] | None = None,
                 route_now: Callable[[], RouteConfig | None] | None = None) -> None:
        self.rt = rt
        self.conn = conn
        self.kind = kind
        self.verdict: Verdict | None = verdict
        self.admission = admission
        self.route = route
        self.req = req
        self.upstream_key = upstream_key
        self.state = RELAYING
        self.received = 0  # client -> upstream bytes
        self.sent = 0  # upstream -> client bytes
        self._start = start
        now = rt.loop_time()
        self._last = now
        self._next_check = now + RECHECK_INTERVAL
        self.deadline = self._next_check
        self._on_end = on_end
        # The route as the config now has it: a reload that drops it (or its upgrade, or
        # tightens its rules) must reach open tunnels too.
        self._route_now = route_now
        self._checking: asyncio.Task[None] | None = None  # an awaited re-check (OCSP)
        self._gauge = rt.tunnels_gauge(kind)
        self._gauge.inc()
        self._up = _UpstreamEnd(self, transport)
        transport.set_protocol(self._up)
        conn.handler = self
        rt.connection_opened(self)

    def __repr__(self) -> str:
        return f"<Tunnel {self.kind} {self.conn!r} {self.state.value}>"

    def _enter(self, state: TunnelState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise TunnelStateError(f"{self.state.value} -> {state.value}")
        self.state = state

    def start(self, from_client: bytes, from_upstream: bytes, upstream_eof: bool) -> None:
        """Relay what each side sent before the switch was complete."""
        if from_client:
            self.plaintext_received(from_client)
        if from_upstream:
            self.upstream_data(from_upstream)
        if upstream_eof:
            self.upstream_eof()

    # -- the client side: TLSConnection's handler ---------------------------------------

    def take_received(self) -> int:
        return self.received

    def plaintext_received(self, data: bytes) -> None:
        if self.state is CLOSED or self.state is CLIENT_DONE:
            return
        self.received += len(data)
        self._last = self.rt.loop_time()
        self._up.write(data)

    def eof_received(self) -> None:
        """The client finished sending: a FIN upstream (its reading side stays)."""
        if self.state is RELAYING:
            self._enter(CLIENT_DONE)
            if not self._up.write_eof():
                self.close()
        elif self.state is UPSTREAM_DONE:
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()

    # -- the upstream side --------------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        if self.state is CLOSED or self.state is UPSTREAM_DONE:
            return
        self.sent += len(data)
        self._last = self.rt.loop_time()
        self.conn.write(data)
        if self.conn.write_paused:
            self._up.pause_reading()
            asyncio.get_running_loop().create_task(self._resume_upstream())

    async def _resume_upstream(self) -> None:
        try:
            await self.conn.drain()
        except ConnectionResetError:
            self.close()
            return
        self._up.resume_reading()

    def upstream_eof(self) -> None:
        """The upstream finished sending: close_notify to the client, still reading it."""
        if self.state is RELAYING:
            self._enter(UPSTREAM_DONE)
            self.conn.shutdown_write()
            if self.conn.state is not OPEN and not self.conn.write_shut:
                self.close()
        elif self.state is CLIENT_DONE:
            self.close()

    def upstream_lost(self) -> None:
        self.close()

    def pause_client(self) -> None:
        self.conn.pause_reading()

    def resume_client(self) -> None:
        self.conn.resume_reading()

    # -- the listener's ticker and drain ------------------------------------------------

    def on_tick(self, now: float) -> None:
        if self.state is CLOSED:
            return
        if now - self._last >= self.rt.config.timeouts.idle:
            self.close()
            return
        if now >= self._next_check:
            self._next_check = now + RECHECK_INTERVAL
            self.deadline = min(self._next_check, self._last + self.rt.config.timeouts.idle)
            verdict = self.verdict
            assert verdict is not None
            if self._route_now is not None:
                route = self._route_now()
                if route is None:
                    log.info("%s tunnel from %s closed: its route is gone from the config",
                             self.kind, self.conn.peername[0])
                    self.close()
                    return
                self.route = route
            # The route's rules too: a truststore swap may keep the CA but drop the
            # rule's reading of the certificate, and a reload may change the rules.
            self.verdict, outcome = self.admission.admit_now(verdict, self.route)
            if isinstance(outcome, Refusal):
                self._refused(outcome)
            elif outcome is PENDING and self._checking is None:
                # An OCSP answer to await (cached until its nextUpdate): off the ticker.
                self._checking = asyncio.get_running_loop().create_task(self._recheck())

    async def _recheck(self) -> None:
        try:
            assert self.verdict is not None
            self.verdict, refusal = await self.admission.still_admitted(self.verdict,
                                                                        self.route)
        finally:
            self._checking = None
        if refusal is not None and self.state is not CLOSED:
            self._refused(refusal)

    def _refused(self, refusal: Refusal) -> None:
        self.rt.count_handshake_failure(
            refusal.reason, self.conn.peername[0], None,
            self.verdict.identity if self.verdict else None,
            f"{self.kind} tunnel closed", self.route.domain)
        self.close()

    def on_drain(self) -> None:
        """Drain lets tunnels run until drain_timeout (the listener then aborts them)."""

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        if self.state is CLOSED:
            return
        self._enter(CLOSED)
        self.deadline = 0.0
        if self._checking is not None:
            self._checking.cancel()
            self._checking = None
        self._up.close()
        if self.conn.state is OPEN or self.conn.write_shut:
            self.conn.close()
        self._gauge.dec()
        self.rt.connection_closed(self)
        duration = perf_counter() - self._start
        if self.req is not None:  # an upgraded request: its 101, now that it has ended
            self.rt.count_request(self.route.name, 101, duration)
            if self.rt.access_log is not None:
                self.rt.access(self, self.req, 101, self.sent, duration, self.upstream_key,
                               101, duration)
        if self._on_end is not None:
            self._on_end(self, self.sent)


class _UpstreamEnd(asyncio.Protocol):
    """The upstream transport's protocol once the tunnel owns it."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self._reading_paused = False

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> bool:
        if self.transport.is_closing() or not self.transport.can_write_eof():
            return False
        try:
            self.transport.write_eof()
        except OSError:
            return False
        return True

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.tunnel.upstream_data(data)

    def eof_received(self) -> bool | None:
        self.tunnel.upstream_eof()
        return True  # keep the transport: the client may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.tunnel.pause_client()

    def resume_writing(self) -> None:
        self.tunnel.resume_client()


# -- opening: the upgrade request and the answer's head ---------------------------------

class _HeadReader(asyncio.Protocol):
    """Reads the upstream's answer head (up to its blank line) and whatever follows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.head_end: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head_end.done():
            if self.transport is not None and len(self.buf) > self.limit:
                self.transport.pause_reading()  # the new owner takes it from here
            return
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            self.head_end.set_result(end + 4)
        elif len(self.buf) > self.limit:
            self.head_end.set_exception(UpstreamError("upstream response head too large",
                                                      "protocol"))

    def eof_received(self) -> bool | None:
        self.eof = True
        if not self.head_end.done():
            self.head_end.set_exception(ConnectionClosed("upstream closed before responding"))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head_end.done():
            self.head_end.set_exception(ConnectionClosed("upstream closed before responding"))


class Opened:
    """An upgrade request sent and its answer's head read: ``head`` and the bytes after
    it, on ``transport`` (whose protocol the caller replaces)."""

    __slots__ = ("transport", "head", "rest", "eof")

    def __init__(self, transport: asyncio.Transport, head: bytes, rest: bytes,
                 eof: bool) -> None:
        self.transport, self.head, self.rest, self.eof = transport, head, rest, eof


async def open_upgrade(upstream: Upstream, head: bytes, connect_timeout: float,
                       read_timeout: float, contexts: UpstreamTLSContexts,
                       limit: int = 65536) -> Opened:
    """Connect to ``upstream``, send the request ``head``, read its answer's head.
    Raises UpstreamError (connect failures, timeouts, a head over ``limit``) or
    ConnectionClosed (closed before answering)."""
    transport, reader = await connect(upstream, lambda: _HeadReader(limit),
                                      connect_timeout, contexts)
    transport.write(head)
    try:
        async with asyncio.timeout(read_timeout):
            end = await reader.head_end
    except TimeoutError:
        transport.close()
        raise UpstreamError("upstream read timed out", "timeout", 504) from None
    except BaseException:
        transport.close()
        raise
    return Opened(transport, bytes(reader.buf[:end]), bytes(reader.buf[end:]), reader.eof)
