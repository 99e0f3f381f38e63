"""HTTP/2 to upstreams (``routes[].upstream_protocol: h2``): shared connections, one
stream per request; prior knowledge over plain TCP ("h2c", RFC 9113 section 3.3), which is
how gRPC servers listen.

Rules of this module:
- An ``H2UpstreamStream`` offers the forwarding code the interface of an HTTP/1.1
  ``UpstreamConnection`` (``send_head``, ``send_body``, ``end_body``, ``inbox`` of
  ``Response``/``Data``/``EndOfMessage``), so both client protocols forward to either
  upstream protocol with the same code. The request head it is given is the one
  ``wire.upstream_request_head`` built (the same header rules and certificate headers as
  for HTTP/1.1); it is turned into an HTTP/2 header list, never re-decided.
- A connection carries streams up to the upstream's SETTINGS_MAX_CONCURRENT_STREAMS, as
  h2 counts them (a stream the upstream answered while the request was still being sent
  is open until the proxy ends or resets it: an abandoned exchange always resets it);
  the pool opens another beside it when all are full, one at a time (requests that find
  none usable wait for the connect in flight), never reuses one after a GOAWAY or close
  to stream ID exhaustion (RFC 9113 section 5.1.1), and closes one left without a stream
  for ``IDLE_TIMEOUT``.
- Back-pressure: response DATA is acknowledged (WINDOW_UPDATE) on its stream while the
  stream's inbox is not paused, so an upstream can be ahead of a slow client by one
  stream window at most; request DATA is sent only as the upstream's windows allow
  (``drain`` waits for them). The connection's window is opened to the largest there is
  at the start: one slow or abandoned stream must never hold back the others (RFC 9113
  section 5.2.2), and the stream windows (times the streams, at most
  ``MAX_STREAMS_PER_CONNECTION``) already bound what the proxy holds. Bytes a stream
  held back are given back to the connection when it ends, however it ends.
- GOAWAY from the upstream is read before h2 sees it (http/h2_frames.py
  ``GoAwayFilter``): streams up to its last stream ID finish, later ones fail (never
  processed: RFC 9113 section 6.8), and the connection closes when none is left.
- A response head is checked as an HTTP/1.1 one is (``checks.make_response``): a status
  outside 100-599 or a control byte in a field is a 502, never passed on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from mtlsproxy.config import Upstream
from mtlsproxy.errors import ConnectionClosed, RemoteProtocolError, UpstreamError
from mtlsproxy.http.checks import make_response
from mtlsproxy.http.events import EndOfMessage, Event, Response
from mtlsproxy.http.h2_frames import GoAway, GoAwayFilter, bound_header_table
from mtlsproxy.proxy.connect import connect
from mtlsproxy.proxy.inbox import Inbox
from mtlsproxy.runtime.writes import WriteBatch
from mtlsproxy.tls.upstream import UpstreamTLSContexts

# Fields a request head carries that HTTP/2 forbids or expresses otherwise (RFC 9113
# section 8.2.2); Host becomes :authority.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                  b"transfer-encoding", b"upgrade", b"te", b"host"})
# Stream IDs are 31 bits and never reused: a connection this close to the end takes no
# new stream (a new connection does).
_LAST_STREAM_ID = 2**31 - 1 - 2 * 1000
# Streams per upstream connection, whatever the upstream allows (gRPC servers allow any
# number): with each stream's window, it bounds what one connection makes the proxy hold.
# nginx's http2_max_concurrent_streams default.
MAX_STREAMS_PER_CONNECTION = 100
_LARGEST_WINDOW = 2**31 - 1  # RFC 9113 section 6.9.1
# An upstream connection without a stream this long is closed (the HTTP/1.1 pool's idle
# timeout; below the common 60 s of servers, so the proxy closes first).
IDLE_TIMEOUT = 30.0


def h2_request_headers(head: bytes, scheme: bytes = b"http") -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list of an HTTP/1.1 request head the proxy built itself
    (``wire.upstream_request_head``: lower-case names, no line folding, one Host)."""
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    fields: list[tuple[bytes, bytes]] = []
    authority = b""
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip()
        if name == b"host":
            authority = value
        elif name not in _CONNECTION_SPECIFIC:
            fields.append((name, value))
    # gRPC servers require "te: trailers" (the gRPC HTTP/2 protocol): the proxy takes
    # trailers from an HTTP/2 upstream and passes them to HTTP/2 clients.
    return [(b":method", method), (b":scheme", scheme), (b":authority", authority),
            (b":path", target), (b"te", b"trailers"), *fields]


class H2UpstreamStream:
    """One request/response on a shared ``H2UpstreamConnection``."""

    def __init__(self, conn: H2UpstreamConnection, key: str) -> None:
        self.conn = conn
        self.key = key  # metrics and logs
        self.stream_id = 0  # assigned by send_head
        self.inbox: Inbox[Event] = Inbox(self._pause, self._resume)
        self._paused = False
        self._unacked = 0
        self._window = asyncio.Event()
        self.ended = False  # the response ended (or the stream was reset)
        self.request_done = False  # END_STREAM sent: the request side is closed
        self.direct = None  # never a fast exchange (proxy/session.py checks the protocol)

    def __repr__(self) -> str:
        return f"<H2UpstreamStream {self.key} stream={self.stream_id}>"

    # -- what the forwarding code calls (as on an HTTP/1.1 UpstreamConnection) -----------

    def expect(self, method: bytes) -> None:
        pass  # HTTP/2 frames say where a response ends

    def send_head(self, head: bytes, end_stream: bool = False) -> None:
        self.stream_id = self.conn.open_stream(
            self, h2_request_headers(head, self.conn.scheme), end_stream)
        self.request_done = end_stream

    def send_body(self, data: bytes | bytearray, chunked: bool = False) -> None:
        self.conn.send_data(self, data)

    def end_body(self, chunked: bool = False) -> None:
        self.request_done = True
        self.conn.end_stream(self)

    @property
    def write_paused(self) -> bool:
        return self.conn.write_paused or self.conn.pending_data(self)

    async def drain(self) -> None:
        """Until the connection's buffered output for this stream has gone out (the
        upstream's windows allowed it) and the socket is writable."""
        while self.conn.pending_data(self) and not self.ended:
            self._window.clear()
            await self._window.wait()
        await self.conn.drain()

    def close(self) -> None:
        """The exchange is abandoned: reset the stream if it is still open either way (a
        response that ended before the request body did leaves the stream half open, and
        counting against the upstream's stream limit, until it is reset)."""
        if not self.ended or (not self.request_done and self.stream_id):
            self.ended = True
            self.request_done = True
            self.conn.reset(self)
        else:
            self.settle()

    def settle(self) -> None:
        """Give the connection back what this stream held unacknowledged (its stream
        window does not matter any more)."""
        size, self._unacked = self._unacked, 0
        if size:
            self.conn.ack(self, size)

    # -- what the connection calls --------------------------------------------------------

    def window_opened(self) -> None:
        self._window.set()

    def data_received(self, data: bytes, size: int) -> None:
        self.inbox.put_data(data)
        if self._paused:
            self._unacked += size
        else:
            self.conn.ack(self, size)

    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        if self._unacked:
            size, self._unacked = self._unacked, 0
            self.conn.ack(self, size)

    def failed(self, exc: BaseException) -> None:
        self.ended = True
        self.inbox.fail(exc)
        self._window.set()
        self.settle()


class H2UpstreamConnection(asyncio.Protocol):
    def __init__(self, key: str, on_lost: Callable[[H2UpstreamConnection], None],
                 writes: WriteBatch | None = None, pool_key: str | None = None,
                 scheme: bytes = b"http", idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self.key = key  # metrics and logs
        self.pool_key = pool_key or key
        self.scheme = scheme  # :scheme of its requests: https over TLS
        self._on_lost = on_lost
        # Frames wait for the end of the loop's pass (runtime/writes.py): a request's
        # HEADERS, DATA and END_STREAM, and many streams' frames, leave in one send.
        self._writes = writes
        self._deferred = False
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=True))
        self.h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            # Windows as large as a response a slow client makes the proxy hold: the
            # default 64 KiB per stream (RFC 9113 section 6.9.2).
        })
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2UpstreamStream] = {}
        self.closed = False
        self.goaway = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Request bytes waiting for the upstream's flow-control windows, by stream.
        self._pending: dict[int, bytearray] = {}
        self._end_after: set[int] = set()
        self._goaways = GoAwayFilter()
        self._idle_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<H2UpstreamConnection {self.key} streams={len(self.streams)}>"

    @property
    def usable(self) -> bool:
        """May take one more stream now."""
        return (not self.closed and not self.goaway
                and self.h2.open_outbound_streams < min(
                    self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_CONNECTION)
                and (self.h2.highest_outbound_stream_id or 0) < _LAST_STREAM_ID)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(
            _LARGEST_WINDOW - self.h2.inbound_flow_control_window)
        self._flush()

    def data_received(self, data: bytes) -> None:
        for part in self._goaways.feed(data):
            if self.closed:
                return
            if isinstance(part, GoAway):
                self._goaway(part)
                continue
            try:
                events = self.h2.receive_data(part)
            except h2.exceptions.ProtocolError as exc:
                self._fail_all(UpstreamError(f"upstream HTTP/2 protocol error: {exc}",
                                             "protocol"))
                self._close()
                return
            for event in events:
                self._event(event)
        self._flush()
        self._maybe_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(ConnectionClosed("upstream closed the connection"))
        self._wake_drain()
        self._on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # -- events -------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                try:
                    response = _response(event.headers or [])
                except RemoteProtocolError as exc:
                    stream.ended = True
                    self.reset(stream)
                    stream.failed(UpstreamError(f"upstream response refused: {exc}",
                                                "protocol"))
                    return
                stream.inbox.put([response])
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and event.data:
                stream.data_received(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:
                self._ack_id(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.ended = True
                stream.inbox.put([EndOfMessage(tuple(event.headers or ()))])
            if self.goaway and not self.streams:
                self._close()
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.ended = True
                stream.inbox.put([EndOfMessage()])
            if self.goaway and not self.streams:
                self._close()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            self._pending.pop(event.stream_id, None)
            if stream is not None:
                stream.failed(UpstreamError(
                    f"upstream reset the stream ({event.error_code!s})", "reset"))
            if self.goaway and not self.streams:
                self._close()
        elif isinstance(event, h2.events.WindowUpdated):
            self._send_pending()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            bound_header_table(self.h2.encoder)
            self._send_pending()

    def _goaway(self, goaway: GoAway) -> None:
        self.goaway = True
        for stream_id in [i for i in self.streams if i > goaway.last_stream_id]:
            # Never processed by the upstream (RFC 9113 section 6.8): safe to retry, but a
            # body may have gone; reported as a reset.
            self._pending.pop(stream_id, None)
            self.streams.pop(stream_id).failed(ConnectionClosed("upstream GOAWAY"))
        if not self.streams:
            self._close()

    # -- what streams call ----------------------------------------------------------------

    def open_stream(self, stream: H2UpstreamStream, headers: list[tuple[bytes, bytes]],
                    end_stream: bool) -> int:
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:  # TooManyStreamsError, a closed state
            raise UpstreamError(f"upstream HTTP/2 stream refused: {exc}", "protocol") from None
        self.streams[stream_id] = stream
        self._busy()
        if end_stream:
            self._end_after.discard(stream_id)
        self._flush()
        return stream_id

    def send_data(self, stream: H2UpstreamStream, data: bytes | bytearray) -> None:
        self._pending.setdefault(stream.stream_id, bytearray()).extend(data)
        self._send_pending()

    def end_stream(self, stream: H2UpstreamStream) -> None:
        self._end_after.add(stream.stream_id)
        self._send_pending()

    def pending_data(self, stream: H2UpstreamStream) -> bool:
        return bool(self._pending.get(stream.stream_id))

    def ack(self, stream: H2UpstreamStream, size: int) -> None:
        self._ack_id(stream.stream_id, size)
        self._flush()

    def reset(self, stream: H2UpstreamStream) -> None:
        self._pending.pop(stream.stream_id, None)
        self._end_after.discard(stream.stream_id)
        self.streams.pop(stream.stream_id, None)
        if not self.closed:
            try:
                # Also a stream whose response ended first (it left self.streams then):
                # its request side is still open on both ends until this.
                self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass  # closed already on both sides
            stream.settle()  # closed now: only the connection's share is given back
            self._flush()
        self._maybe_idle()
        if self.goaway and not self.streams:
            self._close()

    async def drain(self) -> None:
        if not self.write_paused or self.closed:
            return
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    # -- internals ------------------------------------------------------------------------

    def _ack_id(self, stream_id: int, size: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _send_pending(self) -> None:
        for stream_id in list(self._pending.keys() | self._end_after):
            buf = self._pending.get(stream_id)
            while buf:
                try:
                    window = min(self.h2.local_flow_control_window(stream_id),
                                 self.h2.max_outbound_frame_size)
                except h2.exceptions.StreamClosedError:
                    buf.clear()
                    break
                if window <= 0:
                    break
                self.h2.send_data(stream_id, bytes(buf[:window]))
                del buf[:window]
            if not buf:
                self._pending.pop(stream_id, None)
                if stream_id in self._end_after:
                    self._end_after.discard(stream_id)
                    try:
                        self.h2.end_stream(stream_id)
                    except h2.exceptions.ProtocolError:
                        pass
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.window_opened()
        self._flush()

    def _flush(self) -> None:
        if self._writes is not None:
            if not self._deferred:
                self._deferred = True
                self._writes.add(self)
            return
        self.flush_deferred()

    def flush_deferred(self) -> None:
        self._deferred = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self.streams = self.streams, {}
        self._pending.clear()
        for stream in streams.values():
            stream.failed(exc)

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _busy(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _maybe_idle(self) -> None:
        if not self.streams and not self.closed and self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(self.idle_timeout,
                                                                     self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams and not self.closed:
            try:
                self.h2.close_connection()  # GOAWAY NO_ERROR: a polite end
            except h2.exceptions.ProtocolError:
                pass
            self._close()

    def _close(self) -> None:
        self.closed = True
        self._busy()
        if self.transport is not None:
            self.flush_deferred()  # a RST_STREAM or GOAWAY still waiting goes first
            self.transport.close()


def _response(headers: list[tuple[bytes, bytes]]) -> Response:
    """The response of an HTTP/2 head, held to the rules of an HTTP/1.1 one (the fields a
    client gets are the same either way); raises RemoteProtocolError."""
    status = b""
    fields: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            status = value
        elif name[:1] != b":":
            fields.append((name, value))
    # RFC 9113 section 8.3.2: three digits (int() would take " 2_00" and "-1").
    if len(status) != 3 or not status.isdigit():
        raise RemoteProtocolError(f"invalid :status {status[:16]!r}", 502)
    response = make_response(int(status), b"", b"1.1", fields, b"GET")
    # HTTP/2 frames end the body: no Content-Length means it ends with the stream, so an
    # HTTP/1.1 client gets it chunked (``chunked`` is how the framing code reads
    # "delimited by its end").
    length = response.content_length
    return Response(response.status, b"", b"2", fields, True, length is None, length)


class H2UpstreamPool:
    """Shared HTTP/2 connections per upstream; see the rules at the top."""

    def __init__(self, tls: UpstreamTLSContexts | None = None,
                 writes: WriteBatch | None = None) -> None:
        self._conns: dict[str, list[H2UpstreamConnection]] = {}
        # The connect in flight per pool key: requests that find no usable connection
        # wait for it instead of each opening their own (a burst of N streams would open
        # N connections).
        self._connecting: dict[str, asyncio.Future[H2UpstreamConnection]] = {}
        self.opened = 0
        self.writes = writes
        self.tls = tls or UpstreamTLSContexts()
        self.idle_timeout = IDLE_TIMEOUT

    def __repr__(self) -> str:
        return f"<H2UpstreamPool {({k: len(v) for k, v in self._conns.items()})}>"

    async def acquire(self, upstream: Upstream, timeout: float) -> H2UpstreamStream:
        key, pool_key = upstream.key, upstream.pool_key
        while True:
            for conn in self._conns.get(pool_key, ()):
                if conn.usable:
                    return H2UpstreamStream(conn, key)
            pending = self._connecting.get(pool_key)
            if pending is None:
                break
            # asyncio.wait: this waiter's cancellation leaves the connect alone.
            await asyncio.wait({pending})
            failed = None if pending.cancelled() else pending.exception()
            if isinstance(failed, UpstreamError):  # the upstream is down: for all of them
                raise UpstreamError(str(failed), failed.kind, failed.status_hint)
        future: asyncio.Future[H2UpstreamConnection] = (
            asyncio.get_running_loop().create_future())
        self._connecting[pool_key] = future
        try:
            conn = await self._connect(upstream, timeout)
        except UpstreamError as exc:
            future.set_exception(exc)
            future.exception()  # waiters raise their own copy; this one is seen
            raise
        except BaseException:
            future.cancel()  # waiters try again themselves
            raise
        finally:
            del self._connecting[pool_key]
        self._conns.setdefault(pool_key, []).append(conn)
        future.set_result(conn)
        return H2UpstreamStream(conn, key)

    async def _connect(self, upstream: Upstream, timeout: float) -> H2UpstreamConnection:
        key, pool_key = upstream.key, upstream.pool_key
        scheme = b"https" if upstream.tls is not None else b"http"
        _, proto = await connect(
            upstream, lambda: H2UpstreamConnection(key, self._lost, self.writes, pool_key,
                                                   scheme, self.idle_timeout),
            timeout, self.tls)
        self.opened += 1
        return proto

    def _lost(self, conn: H2UpstreamConnection) -> None:
        conns = self._conns.get(conn.pool_key)
        if conns is not None and conn in conns:
            conns.remove(conn)

    def release(self, stream: H2UpstreamStream, reusable: bool) -> None:
        """The exchange is over: an unfinished stream is reset; the connection stays."""
        if not stream.ended or not reusable:
            stream.close()
        else:
            stream.settle()

    def close_all(self) -> None:
        for conns in self._conns.values():
            for conn in list(conns):
                conn._close()
