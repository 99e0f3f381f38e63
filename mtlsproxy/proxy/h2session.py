"""One HTTP/2 client connection (RFC 9113): streams in, requests to HTTP/1.1 upstreams out.

Rules of this module:
- h2 (the sans-IO HTTP/2 state machine, as h11 is for HTTP/1.1) parses and frames; this
  class moves bytes between it, the TLS connection and the upstream connections. It
  decides nothing about who may pass: each stream is a ``Request``
  (http/h2_request.py) that goes through ``screen``, the domain check, routing and the
  domain's ``Admission.admit`` like an HTTP/1.1 request, and its upstream head is built
  by ``wire.upstream_request_head`` with the same header rules and certificate headers.
- Back-pressure both ways. A request body is acknowledged (WINDOW_UPDATE) only once it
  is written upstream, so a client has at most one window in flight per stream. A
  response body is sent only as far as the client's windows allow, and while it waits
  the upstream is not read further (its inbox pauses its socket). When the TLS
  connection's write buffer is full, reading from the client pauses too, so a client
  that sends PINGs or SETTINGS without reading the answers fills nothing.
- Abuse ends the connection with GOAWAY and a count by kind
  (``mtlsproxy_h2_protocol_errors_total``): streams reset by the client before their
  answer (rapid reset, CVE-2023-44487: Envoy's premature-reset rule), CONTINUATION
  floods (h2 refuses more than 64 CONTINUATION frames), header blocks over 4 x
  ``limits.max_header_bytes`` decoded (HPACK bombs; a smaller excess is a 431 on its
  stream), consecutive DATA frames of padding only, and what ``FrameGuard``
  (http/h2_frames.py) reads in frame headers before h2 buffers them: oversized frames
  and header blocks, floods of control frames (PING, SETTINGS, RST_STREAM, unknown
  types), empty frames, PRIORITY and WINDOW_UPDATE frames.
- Every byte of a client's DATA is given back to its connection window exactly once:
  padding at once, a body piece once written upstream, and what a stream still held
  when it ended (the upstream answered early, the stream was reset) when it ends.
- Nothing waits on a client for ever: a header block left unfinished for
  ``timeouts.request_headers`` and a client that reads nothing for ``timeouts.idle``
  while answers wait end the connection (kind ``timeout``); a request body that stops
  for ``timeouts.idle`` is a 408 on its stream, as over HTTP/1.1.
- Every stream ends with an answer or a reset; the connection ends with GOAWAY when the
  listener drains, on a protocol error, or idle for ``timeouts.idle``. The drain's
  GOAWAY is written by this class, not by h2 (whose state machine refuses to send
  anything after its own GOAWAY), so the streams it lets finish can still be answered.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions

from mtlsproxy.admission.admit import Refusal, Scope
from mtlsproxy.config import Upstream
from mtlsproxy.errors import ConnectionClosed, RemoteProtocolError, UpstreamError
from mtlsproxy.http import wire
from mtlsproxy.http.events import Data, EndOfMessage, Event, Request, Response
from mtlsproxy.http.h2_frames import FrameAbuse, FrameGuard, bound_header_table, goaway_frame
from mtlsproxy.http.h2_request import request_from_h2
from mtlsproxy.identity.headers import header_block
from mtlsproxy.proxy.inbox import Inbox
from mtlsproxy.proxy.session import screen
from mtlsproxy.proxy.upstream import Exchange
from mtlsproxy.tls.bio import CLOSED as TLS_CLOSED
from mtlsproxy.tls.bio import HandshakeOver, TLSConnection

if TYPE_CHECKING:
    from mtlsproxy.admission.cache import Verdict
    from mtlsproxy.proxy.session import Domain, Listener, Snapshot

log = logging.getLogger("mtlsproxy.h2")

# Rapid reset (CVE-2023-44487): Envoy's rule, overload_manager's
# premature_reset_total_stream_count (500) and its 50 % ratio, with nginx's lower count.
PREMATURE_RESET_MIN_STREAMS = 100
# Consecutive DATA frames of padding only (h2 tells them apart only once parsed): Envoy's
# max_consecutive_inbound_frames_with_empty_payload, as FrameGuard applies to empty frames.
MAX_CONSECUTIVE_PADDING_FRAMES = 1
# The decoded header list hpack stops at, in units of limits.max_header_bytes (a client
# that ignores SETTINGS_MAX_HEADER_LIST_SIZE by this much is no mistaken client).
HEADER_CEILING_FACTOR = 4
# Bytes of HTTP/2 output waiting in the TLS connection before reading from the client
# pauses (the TLS transport's own high-water mark pauses it too).
_SEND_CHUNK = 16384
_NO_NAMES: frozenset[bytes] = frozenset()


class _Stream:
    __slots__ = ("id", "inbox", "task", "window", "answered", "received", "reset", "grpc",
                 "grpc_status", "malformed", "held", "headers_sent")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        # The request body's events; flow control, not the socket, bounds it.
        self.inbox: Inbox[Event] = Inbox(_nothing, _nothing)
        self.task: asyncio.Task[None] | None = None
        self.window = asyncio.Event()  # set when the client's window for it may have grown
        self.answered = False  # the response has ended (a reset after it is no abuse)
        self.received = 0  # request bytes (headers' block not counted: HPACK)
        self.reset = False  # the client reset it
        self.grpc = False  # a gRPC call: the proxy's own answers are gRPC errors
        self.grpc_status: str | None = None  # what the call ended with (the access log)
        self.malformed = False  # its body did not match its Content-Length (reset)
        self.held = 0  # body bytes received and not yet given back to the client's window
        self.headers_sent = False  # the response's HEADERS left: only trailers may follow


def _nothing() -> None:
    pass


class _StreamGone(Exception):
    """The client reset the stream, or the connection ended, while it was being served."""


class _BodyTimeout(Exception):
    """The client stopped sending its request body (408, nginx's client_body_timeout)."""


class H2Session(HandshakeOver):
    """The TLS handler of a connection whose ALPN chose h2 (after the handshake, which
    ``ProxySession`` ran: its verdict, domain and generation come with it)."""

    def __init__(self, rt: Listener, conn: TLSConnection, domain: Domain,
                 generation: Snapshot, verdict: Verdict | None,
                 refusal_counted: bool) -> None:
        self.rt = rt
        self.conn = conn
        self.domain = domain
        self.generation = generation
        self.verdict = verdict
        self._refusal_counted = refusal_counted
        limits = rt.config.limits
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=True,
                                           normalize_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        })
        # hpack bounds the decoded header list (an HPACK bomb's real size) by a hard
        # ceiling: past it the decoder's state is lost and only GOAWAY is left (RFC 9113
        # section 4.3). Below it, a list over max_header_bytes is a 431 on its stream
        # (request_from_h2), as over HTTP/1.1.
        # (h2 would lower it to the advertised size on the client's SETTINGS ACK if the
        # setting changed then; it is in place from the start, so the ACK changes nothing.)
        self.h2.decoder.max_header_list_size = HEADER_CEILING_FACTOR * limits.max_header_bytes
        self.h2.initiate_connection()
        self.guard = FrameGuard(self.h2.max_inbound_frame_size,
                                HEADER_CEILING_FACTOR * limits.max_header_bytes)
        self.streams: dict[int, _Stream] = {}
        self.streams_total = 0
        self.premature_resets = 0
        self._padding_only = 0  # consecutive DATA frames of padding only
        self._closing = False
        # The last stream ID of the GOAWAY this session sent (drain, a refused
        # certificate): later streams are refused, earlier ones finish.
        self._goaway_last: int | None = None
        self._received = 0  # the stream being logged's (take_received)
        self._streams_active = rt.h2_streams_gauge()
        # The ticker's deadline (``deadline``) is the earlier of the idle one (no stream
        # open) and the unfinished header block's.
        self._idle_at = rt.loop_time() + rt.config.timeouts.idle
        self.deadline = self._idle_at
        rt.connection_opened(self)
        self._flush()

    def __repr__(self) -> str:
        return f"<H2Session {self.rt.name} {self.conn!r} streams={len(self.streams)}>"

    # -- what TLSConnection and the listener call -------------------------------------

    def response_pending(self) -> bool:
        return bool(self.streams)

    def take_received(self) -> int:
        """The access log's ``bytes_received``: the logged stream's body bytes."""
        return self._received

    def plaintext_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.guard.feed(data, self.rt.loop_time())
        except FrameAbuse as exc:
            self._abort(exc.kind, h2.errors.ErrorCodes.FRAME_SIZE_ERROR
                        if exc.kind == "frame_size" else h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                        exc)
            return
        try:
            events = self.h2.receive_data(data)
        except hpack.exceptions.OversizedHeaderListError as exc:
            self._abort("header_size", h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, exc)
            return
        except h2.exceptions.DenialOfServiceError as exc:
            # h2 raises it for an oversized (decoded) header block, and for floods.
            kind = "header_size" if "header" in str(exc).lower() else "flood"
            self._abort(kind, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, exc)
            return
        except h2.exceptions.ProtocolError as exc:
            kind = "flood" if "continuation" in str(exc).lower() else "protocol"
            self._abort(kind, h2.errors.ErrorCodes.PROTOCOL_ERROR, exc)
            return
        for event in events:
            self._event(event)
            if self._closing:
                return
        self._flush()
        self._rearm()

    def eof_received(self) -> None:
        self._end_streams()
        self.conn.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closing = True
        self._end_streams()
        self.deadline = 0.0
        self.rt.connection_closed(self)

    def on_tick(self, now: float) -> None:
        since = self.guard.header_block_since
        if since is not None and now >= since + self.rt.config.timeouts.request_headers:
            # A header block begun and never finished (nginx: client_header_timeout).
            self._abort("timeout", h2.errors.ErrorCodes.NO_ERROR,
                        RemoteProtocolError("header block unfinished"))
        elif self._idle_at and now >= self._idle_at and not self.streams:
            self._idle_at = self.deadline = 0.0
            self._goaway(h2.errors.ErrorCodes.NO_ERROR)  # idle: quietly, like nginx
        else:
            self._rearm()

    def _rearm(self) -> None:
        since = self.guard.header_block_since
        block = since + self.rt.config.timeouts.request_headers if since is not None else 0.0
        idle = 0.0 if self.streams else self._idle_at
        self.deadline = min(block, idle) if block and idle else block or idle

    def on_drain(self) -> None:
        """GOAWAY: no new streams; the open ones finish, then the connection closes."""
        if self._closing or self._goaway_last is not None:
            return
        self._goaway_last = self.h2.highest_inbound_stream_id or 0
        self._flush()  # what h2 has written goes first
        if self.conn.state is not TLS_CLOSED:
            self.conn.write(goaway_frame(self._goaway_last, h2.errors.ErrorCodes.NO_ERROR))
        if not self.streams:
            self._closing = True
            self.conn.close()

    # -- events -----------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            size = len(event.data)
            if size:
                self._padding_only = 0
            elif event.flow_controlled_length and event.stream_ended is None:
                self._padding_only += 1
                if self._padding_only > MAX_CONSECUTIVE_PADDING_FRAMES:
                    self._abort("flood", h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                                RemoteProtocolError("DATA frames of padding only"))
                    return
            # A body piece is given back once written upstream (_pump); padding, and what
            # a stream already answered or gone receives, at once, so the connection
            # window stays open.
            if stream is None or stream.answered or not size:
                self._ack(event.stream_id, event.flow_controlled_length)
                return
            stream.received += size
            stream.held += size
            stream.inbox.put_data(event.data)
            if event.flow_controlled_length > size:
                self._ack(event.stream_id, event.flow_controlled_length - size)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.inbox.put([EndOfMessage()])
        elif isinstance(event, h2.events.TrailersReceived):
            pass  # an HTTP/1.1 upstream takes none from a proxy (the last chunk only)
        elif isinstance(event, h2.events.StreamReset):
            self._client_reset(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in self.streams.values():
                    stream.window.set()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            bound_header_table(self.h2.encoder)
            for stream in self.streams.values():
                stream.window.set()  # INITIAL_WINDOW_SIZE may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._closing = True
            self._end_streams()
            self._flush()
            self.conn.close()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        self._padding_only = 0
        if self.rt.draining or (self._goaway_last is not None
                                and stream_id > self._goaway_last):
            # After GOAWAY: never processed, the client may retry it elsewhere (RFC 9113
            # section 6.8).
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = _Stream(stream_id)
        self.streams[stream_id] = stream
        self.streams_total += 1
        self._streams_active.inc()
        ended = event.stream_ended is not None
        if ended:
            stream.inbox.put([EndOfMessage()])
        stream.task = asyncio.get_running_loop().create_task(
            self._serve(stream, event.headers or [], ended))
        stream.task.add_done_callback(lambda _task: self._task_done(stream))

    def _task_done(self, stream: _Stream) -> None:
        # A task cancelled before it started (the client reset the stream at once, the
        # connection ended) never ran _serve's finally: the stream must not stay counted
        # as open, or the gauge leaks and the connection never goes idle.
        if stream.id in self.streams:
            self._stream_done(stream)

    def _client_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.reset = True
        if not stream.answered:
            self.premature_resets += 1
            if (self.premature_resets >= PREMATURE_RESET_MIN_STREAMS
                    and self.premature_resets * 2 >= self.streams_total):
                self._abort("rapid_reset", h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                            RemoteProtocolError("streams reset before their answer"))
                return
        stream.inbox.fail(_StreamGone())
        stream.window.set()
        if stream.task is not None:
            stream.task.cancel()

    def _ack(self, stream_id: int, size: int) -> None:
        if size and not self._closing:
            try:
                self.h2.acknowledge_received_data(size, stream_id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass  # the stream is gone: h2 already counted the connection's share

    # -- one stream -----------------------------------------------------------------------

    async def _serve(self, stream: _Stream, headers: list[tuple[bytes, bytes]],
                     ended: bool) -> None:
        rt = self.rt
        start = perf_counter()
        status = 0
        sent = 0
        route_name = ""
        upstream_key = "-"
        upstream_status: int | None = None
        up_start = start
        up_end: float | None = None
        req: Request | None = None
        stream.grpc = wire.is_grpc(headers)
        try:
            try:
                req = request_from_h2(headers, ended, rt.config.limits.max_header_bytes)
                screen(rt, req)
            except RemoteProtocolError as exc:
                status = exc.status_hint
                sent = self._respond_error(stream, status, exc.reason)
                return
            domain = self.domain
            if rt.has_domains and rt.misdirected(domain.index, req.host):
                status = 421
                sent = self._respond_error(stream, 421, "misdirected_request")
                return
            match = domain.router.match(req.host, req.target)
            route = match[0] if match is not None else None
            assert self.verdict is not None
            self.verdict, outcome = await domain.admission.admit(self.verdict, route, req)
            if isinstance(outcome, Refusal):
                if route is not None:
                    route_name = route.name
                status = outcome.status
                sent = self._refuse(stream, outcome, route_name)
                return
            if match is None:
                status = 404
                sent = self._respond_error(stream, 404, "no_route")
                return
            route, target = match
            route_name = route.name
            extra = outcome.headers
            upstream_key = route.upstream.key
            block = (self.verdict.header_block + header_block(extra) if extra
                     else self.verdict.header_block)
            head = wire.upstream_request_head(
                req, target, self.conn.peername[0], block, rt.header_rules,
                wire.replaced_names(extra, outcome.strip))
            up_start = perf_counter()
            deadline = wire.grpc_timeout(headers) if stream.grpc else None
            if deadline is None:
                status, sent = await self._forward(stream, req, route.upstream, head)
            else:
                try:
                    # grpc-timeout is the call's deadline (PROTOCOL-HTTP2.md): past it
                    # the proxy ends the call with DEADLINE_EXCEEDED, as the client will.
                    async with asyncio.timeout(deadline):
                        status, sent = await self._forward(stream, req, route.upstream,
                                                           head)
                except TimeoutError:
                    raise UpstreamError("grpc-timeout passed", "timeout", 504) from None
            upstream_status, up_end = status, perf_counter()
        except UpstreamError as exc:
            rt.count_upstream_error(upstream_key, exc.kind)
            up_end = perf_counter()
            if exc.status_hint and not stream.answered and not stream.headers_sent \
                    and status == 0:
                status = exc.status_hint
                reason = "upstream_timeout" if status == 504 else "upstream_unavailable"
                sent = self._respond_error(stream, status, reason)
            elif stream.grpc and not stream.answered and not stream.reset:
                # Mid-call: end it with a status of its own in trailers, not a bare reset.
                code = 4 if exc.status_hint == 504 else 14
                self._send_trailers(stream, [(b"grpc-status", b"%d" % code),
                                             (b"grpc-message", exc.kind.encode())])
            else:
                self._reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
        except _BodyTimeout:
            # The client stopped sending its body (nginx's client_body_timeout: 408).
            status = 408
            sent = self._respond_error(stream, 408, "request_timeout")
        except (_StreamGone, asyncio.CancelledError, ConnectionClosed):
            # 499: nginx's code for "client closed the request".
            status = 400 if stream.malformed else status or 499
        finally:
            duration = perf_counter() - start
            self._stream_done(stream)
            if status == 0:
                status = 499
            rt.count_request(route_name, status, duration, "h2")
            if rt.access_log is not None and req is not None:
                self._received = stream.received
                rt.access(self, req, status, sent, duration, upstream_key, upstream_status,
                          None if up_end is None else up_end - up_start,
                          stream.grpc_status if stream.grpc else None)

    def _refuse(self, stream: _Stream, refusal: Refusal, route: str) -> int:
        identity = self.verdict.identity if self.verdict is not None else None
        if refusal.scope is Scope.CLIENT:
            if not self._refusal_counted:
                self._refusal_counted = True
                self.rt.count_handshake_failure(refusal.reason, self.conn.peername[0], None,
                                                identity, domain=self.domain.label)
            # The certificate itself: UNAUTHENTICATED, not PERMISSION_DENIED.
            sent = self._respond_error(stream, refusal.status, refusal.reason,
                                       wire.GRPC_UNAUTHENTICATED)
            self.on_drain()  # the certificate is refused: no more streams on it
            return sent
        elif refusal.scope is Scope.ROUTE:
            detail = (f"route {route}: no allow rule matched ({refusal.detail})"
                      if refusal.detail else f"route {route}")
            self.rt.count_handshake_failure(refusal.reason, self.conn.peername[0], None,
                                            identity, detail, self.domain.label)
        elif refusal.scope is Scope.TOKEN:
            return self._respond_error(stream, refusal.status, refusal.reason,
                                       message=refusal.detail, headers=refusal.headers)
        return self._respond_error(stream, refusal.status, refusal.reason)

    async def _forward(self, stream: _Stream, req: Request, upstream: Upstream,
                       head: bytes) -> tuple[int, int]:
        rt = self.rt
        timeouts = rt.config.timeouts
        if req.expect_continue and req.has_body:
            # Admitted: the proxy answers Expect itself, as over HTTP/1.1 (and nginx); the
            # upstream gets no Expect (wire.upstream_request_head). RFC 9110 section 10.1.1.
            self.h2.send_headers(stream.id, [(b":status", b"100")])
            self._flush()
        up, _ = await rt.pool.acquire(upstream, timeouts.upstream_connect)
        up.expect(req.method)
        up.send_head(head, not req.has_body)
        pump: asyncio.Task[None] | None = None
        if req.has_body:
            pump = asyncio.get_running_loop().create_task(self._pump(stream, req, up))
        try:
            resp = await self._response_head(up, pump, timeouts.upstream_read)
            status, sent = await self._stream_response(stream, req, resp, up)
        except BaseException:
            up.close()
            if pump is not None:
                if pump.done() and not pump.cancelled():
                    pump.exception()  # seen: its failure is the one being raised, or moot
                pump.cancel()
            raise
        body_done = pump is None or (pump.done() and not pump.cancelled()
                                     and pump.exception() is None)
        if pump is not None and not pump.done():
            pump.cancel()
        rt.pool.release(up, resp.keep_alive and body_done)
        return status, sent

    async def _pump(self, stream: _Stream, req: Request, up: Exchange) -> None:
        """Request body -> upstream; each piece acknowledged to the client once written.

        A body that does not add up to its Content-Length is malformed (RFC 9113 section
        8.1.1): the stream is reset and the upstream connection, which now waits for
        bytes that will not come, is closed by ``_forward`` (never pooled). h2 checks
        DATA frames against Content-Length, but not a body that trailers end."""
        idle = self.rt.config.timeouts.idle
        length = req.content_length
        written = 0
        while True:
            ev = stream.inbox.get_nowait()
            if ev is None:
                try:
                    async with asyncio.timeout(idle):
                        ev = await stream.inbox.get()
                except TimeoutError:
                    raise _BodyTimeout() from None
            if isinstance(ev, Data):
                written += len(ev.data)
                if length is not None and written > length:
                    self._malformed(stream)
                up.send_body(ev.data, req.chunked)
                if up.write_paused:
                    async with asyncio.timeout(self.rt.config.timeouts.upstream_read):
                        await up.drain()
                stream.held -= len(ev.data)
                self._ack(stream.id, len(ev.data))
                self._flush()
            elif isinstance(ev, EndOfMessage):
                if length is not None and written != length:
                    self._malformed(stream)
                up.end_body(req.chunked)
                return

    def _malformed(self, stream: _Stream) -> None:
        stream.malformed = True
        self._reset(stream, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        stream.reset = True
        if stream.task is not None:
            stream.task.cancel()  # it may be waiting for the upstream's answer
        raise _StreamGone()

    async def _response_head(self, up: Exchange, pump: asyncio.Task[None] | None,
                             read_timeout: float) -> Response:
        async def head() -> Response:
            while True:
                ev = await up.inbox.get()
                if isinstance(ev, Response):
                    return ev
                if isinstance(ev, Data | EndOfMessage):
                    raise UpstreamError("upstream sent body data before a head", "protocol")

        if pump is None:  # no body to watch beside the answer: no task of its own
            try:
                async with asyncio.timeout(read_timeout):
                    return await head()
            except TimeoutError:
                raise UpstreamError("upstream read timed out", "timeout", 504) from None
            except ConnectionClosed:
                raise UpstreamError("upstream closed before responding", "reset") from None
        task = asyncio.get_running_loop().create_task(head())
        try:
            if pump is not None:
                done, _ = await asyncio.wait({task, pump},
                                             return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                pump.result()  # raises if the client's body failed
            async with asyncio.timeout(read_timeout):
                return await task
        except TimeoutError:
            raise UpstreamError("upstream read timed out", "timeout", 504) from None
        except ConnectionClosed:
            raise UpstreamError("upstream closed before responding", "reset") from None
        finally:
            if not task.done():
                task.cancel()

    async def _stream_response(self, stream: _Stream, req: Request, resp: Response,
                               up: Exchange) -> tuple[int, int]:
        bodyless = req.method == b"HEAD" or resp.status in (204, 304)
        first = up.inbox.get_nowait()
        whole = bodyless or isinstance(first, EndOfMessage)
        self.h2.send_headers(stream.id, wire.h2_response_headers(resp), end_stream=whole)
        stream.headers_sent = True
        self._flush()
        for name, value in resp.headers:  # a trailers-only answer carries it here
            if name == b"grpc-status":
                stream.grpc_status = value.decode("latin-1")
        sent = 0
        if whole:
            stream.answered = True
            return resp.status, sent
        read_timeout = self.rt.config.timeouts.upstream_read
        ev: Event | None = first
        while True:
            if ev is None:
                try:
                    async with asyncio.timeout(read_timeout):
                        ev = await up.inbox.get()
                except TimeoutError:
                    raise UpstreamError("upstream read timed out", "timeout", 0) from None
                except ConnectionClosed:
                    raise UpstreamError("upstream closed mid-response", "reset", 0) from None
            if isinstance(ev, Data):
                await self._send_data(stream, ev.data)
                sent += len(ev.data)
            elif isinstance(ev, EndOfMessage):
                if ev.trailers:  # an HTTP/2 upstream's (gRPC's grpc-status)
                    self._send_trailers(stream, wire.h2_trailers(ev.trailers))
                else:
                    self.h2.end_stream(stream.id)
                    stream.answered = True
                    self._flush()
                return resp.status, sent
            ev = None

    async def _send_data(self, stream: _Stream, data: bytes | bytearray) -> None:
        """As much as the client's windows allow, waiting for WINDOW_UPDATEs for the rest;
        and no faster than the TLS connection drains."""
        view = memoryview(data)
        while view:
            if stream.reset or self._closing:
                raise _StreamGone()
            window = min(self.h2.local_flow_control_window(stream.id),
                         self.h2.max_outbound_frame_size, _SEND_CHUNK)
            if window <= 0:
                stream.window.clear()
                try:
                    async with asyncio.timeout(self.rt.config.timeouts.idle):
                        await stream.window.wait()
                except TimeoutError:
                    # The client opened no window for it (nginx's send_timeout): only
                    # this stream is stuck, so only it ends.
                    self._reset(stream, h2.errors.ErrorCodes.CANCEL)
                    raise _StreamGone() from None
                continue
            self.h2.send_data(stream.id, bytes(view[:window]))
            self.guard.data_frames_sent += 1
            view = view[window:]
            self._flush()
            if self.conn.write_paused:
                try:
                    async with asyncio.timeout(self.rt.config.timeouts.idle):
                        await self.conn.drain()
                except ConnectionResetError:
                    raise _StreamGone() from None
                except TimeoutError:
                    # The client reads nothing at all (nginx's send_timeout): every
                    # stream is stuck behind the same socket.
                    self._abort("timeout", h2.errors.ErrorCodes.NO_ERROR,
                                RemoteProtocolError("the client reads nothing"))
                    raise _StreamGone() from None

    def _respond_error(self, stream: _Stream, status: int, reason: str,
                       grpc_code: int | None = None, message: str | None = None,
                       headers: tuple[tuple[bytes, bytes], ...] = ()) -> int:
        """The proxy's own answer: a small JSON body, or for a gRPC call the gRPC error
        (trailers-only, grpc-status from the HTTP status unless ``grpc_code``)."""
        if stream.reset or self._closing:
            return 0
        try:
            if stream.grpc:
                grpc_fields = wire.grpc_error_response(status, reason, grpc_code)
                stream.grpc_status = grpc_fields[2][1].decode()
                self.h2.send_headers(stream.id, grpc_fields, end_stream=True)
                body = b""
            else:
                fields, body = wire.h2_error_response(status, reason, message, headers)
                self.h2.send_headers(stream.id, fields)
                self.h2.send_data(stream.id, body, end_stream=True)
                self.guard.data_frames_sent += 1
        except h2.exceptions.ProtocolError:
            return 0  # the stream closed meanwhile
        stream.answered = True
        self._flush()
        return len(body)

    def _send_trailers(self, stream: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        for name, value in trailers:
            if name == b"grpc-status":
                stream.grpc_status = value.decode("latin-1")
        try:
            self.h2.send_headers(stream.id, trailers, end_stream=True)
        except h2.exceptions.ProtocolError:
            return
        stream.answered = True
        self._flush()

    def _reset(self, stream: _Stream, code: h2.errors.ErrorCodes) -> None:
        if not stream.reset and not self._closing:
            self.guard.stream_reset(stream.id)
            try:
                self.h2.reset_stream(stream.id, code)
            except h2.exceptions.ProtocolError:
                pass
            stream.answered = True
            self._flush()

    def _stream_done(self, stream: _Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self._streams_active.dec()
        if not stream.answered and not stream.reset and not self._closing:
            self._reset(stream, h2.errors.ErrorCodes.CANCEL)
        if stream.held:
            # Body bytes never written upstream (an early answer, a reset): the stream is
            # closed, so only the connection's window gets them back.
            held, stream.held = stream.held, 0
            self._ack(stream.id, held)
            self._flush()
        if not self.streams:
            if self._goaway_last is not None and not self._closing:
                self._closing = True  # GOAWAY sent (drain, a refused certificate)
                self.conn.close()
            else:
                self._idle_at = self.rt.loop_time() + self.rt.config.timeouts.idle
                self._rearm()

    # -- the connection -----------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.conn.state is not TLS_CLOSED:
            self.conn.write(data)
            if self.conn.write_paused:
                self.conn.pause_reading()  # resumed by the TLS transport's drain (below)
                asyncio.get_running_loop().create_task(self._resume_after_drain())

    async def _resume_after_drain(self) -> None:
        try:
            await self.conn.drain()
        except ConnectionResetError:
            return
        self.conn.resume_reading()

    def _abort(self, kind: str, code: h2.errors.ErrorCodes, exc: BaseException) -> None:
        """GOAWAY with ``code``, count ``kind``, close."""
        if self._closing:
            return
        self.rt.count_h2_error(kind)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("h2 connection from %s ended (%s): %s", self.conn.peername[0], kind,
                      exc)
        self._goaway(code)

    def _goaway(self, code: h2.errors.ErrorCodes) -> None:
        self._closing = True
        try:
            # Never a later last stream ID than a GOAWAY already sent (RFC 9113 section 6.8).
            self.h2.close_connection(error_code=code, last_stream_id=self._goaway_last)
        except h2.exceptions.ProtocolError:
            pass
        data = self.h2.data_to_send()
        self._end_streams()
        if self.conn.state is not TLS_CLOSED:
            # Lingering (TLSConnection.close): an abusive client is still sending, and a
            # close with its bytes unread would reset the connection before it reads the
            # GOAWAY that says why.
            self.conn.write(data)
            self.conn.close(linger=True)

    def _end_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.reset = True
            stream.inbox.fail(_StreamGone())
            stream.window.set()
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
