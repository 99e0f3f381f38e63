"""One client connection's HTTP side: identity check, route, forward, stream back.

Rules of this module:
- The TLS protocol pushes plaintext into ``plaintext_received``; parsing happens there
  (sans-IO parser).
- The fast path (a keep-alive proxy's common case: a bodyless request, a route with no
  authorizer and no OCSP, a current verdict, an idle pooled upstream connection, and a
  response that arrives whole) runs entirely in protocol callbacks: no task, no future,
  one write each way. Anything else - and anything unexpected on the way - goes to the
  general path: events queue in an ``Inbox`` with back-pressure and a task (``run``)
  consumes them one request at a time. A fast exchange that cannot finish in callbacks
  hands its state to that task (``_Fast``), which continues it with the general code
  (retry on a dead pooled connection, streaming, timeouts, error responses).
- Between requests no task exists: the session is "parked" with a deadline that the
  listener's ticker enforces (request_headers for the first request, then idle).
- Identity comes only from the TLS layer (``Verdict``); the certificate headers a client
  sends are always dropped (``wire.upstream_request_head`` with the listener's
  ``HeaderRules``).
- What is routed, authorized and forwarded is one target: ``_screen`` normalises it
  (http/normalize.py) and applies the header rules that refuse a request, on both paths,
  before any route is looked up.
- Who may pass is decided by the listener's ``Admission`` (admission/admit.py) alone, on
  both paths: ``admit_now`` in callbacks, ``admit`` when it needs an await.
- The session sees its listener through the ``Listener`` protocol below: what it reads
  (settings, routes, admission, the pool) and what it reports (counts, the access log).
- Before the response head is sent, every failure becomes a small JSON error
  (400/403/404/408/431/501/502/504); after it, the only honest signal is closing the
  connection. Either way the client is never left hanging.

Over ~400 lines on purpose: the fast path and the general path share one connection's
state (``SessionState``), and keeping them in one class keeps every transition in one
place; admission (admission/admit.py), heads and framing (http/wire.py), parsing
(http/parser.py) and the upstream pool (pool.py) live elsewhere.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Any, Protocol, cast

from mtlsproxy.admission.admit import (
    ADMITTED,
    Admission,
    Admitted,
    Installed,
    Refusal,
    Scope,
)
from mtlsproxy.admission.cache import Verdict
from mtlsproxy.config import ListenerConfig, RouteConfig, Upstream
from mtlsproxy.errors import ConnectionClosed, RemoteProtocolError, UpstreamError
from mtlsproxy.http import normalize, speedups, wire
from mtlsproxy.http.events import Data, EndOfMessage, Event, Request, Response
from mtlsproxy.http.header_rules import HeaderRules, UnderscoreRejected
from mtlsproxy.http.normalize import normalize_target
from mtlsproxy.http.parser import request_parser, response_parser
from mtlsproxy.identity.headers import header_block
from mtlsproxy.identity.peer import ClientIdentity
from mtlsproxy.proxy.inbox import Inbox
from mtlsproxy.proxy.pool import UpstreamPool
from mtlsproxy.proxy.routing import Router
from mtlsproxy.proxy.tunnel import Tunnel, open_upgrade
from mtlsproxy.proxy.upstream import ACTIVE as UP_ACTIVE
from mtlsproxy.proxy.upstream import Exchange, UpstreamConnection
from mtlsproxy.runtime.series import RequestSeries
from mtlsproxy.tls.bio import OPEN, TLSConnection
from mtlsproxy.tls.contexts import ServerContexts


class _ClientGone(Exception):
    """The client connection closed while we were writing to it."""


class _BodyTimeout(Exception):
    """The client sent no more of its request body within the idle timeout."""


class _Fast:
    """A request forwarded from callbacks, waiting for its response."""

    __slots__ = ("req", "upstream", "route_name", "up", "head", "start")

    def __init__(self, req: Request, upstream: Upstream, route_name: str,
                 up: UpstreamConnection, head: bytes, start: float) -> None:
        self.req, self.upstream, self.route_name = req, upstream, route_name
        self.up, self.head, self.start = up, head, start


class Snapshot(Installed, Protocol):
    """The listener's generation a connection's handshake used."""

    @property
    def contexts(self) -> ServerContexts: ...


class Domain(Protocol):
    """The listener's domain a connection's SNI name chose (server/listener.py): its
    generation, routes and admission step."""

    index: int
    router: Router
    admission: Admission

    @property
    def label(self) -> str: ...  # "" for a listener without domains
    def generation(self) -> Snapshot: ...


class Connection(Protocol):
    """What a listener keeps of a client connection, whichever its protocol: its deadline
    (fired by the listener's ticker), drain, and what the access log reads."""

    conn: TLSConnection
    deadline: float

    @property
    def verdict(self) -> Verdict | None: ...
    def on_tick(self, now: float) -> None: ...
    def on_drain(self) -> None: ...
    def take_received(self) -> int: ...


class Listener(Protocol):
    """What a session reads from its listener and reports to it (server/listener.py)."""

    name: str
    config: ListenerConfig  # timeouts, limits, path settings: read per use (reloads)
    parser_kind: str
    header_rules: HeaderRules
    has_domains: bool  # more than one: a request's Host is checked against its SNI's
    pool: UpstreamPool
    draining: bool
    loop_time: Callable[[], float]

    @property
    def access_log(self) -> object | None: ...  # None: no access log, no record built

    def generation(self) -> Snapshot: ...
    def domain_for(self, server_name: str | None) -> Domain: ...
    def misdirected(self, domain: int, host: bytes) -> bool: ...
    def connection_opened(self, session: Connection) -> None: ...
    def connection_closed(self, session: Connection) -> None: ...
    def start_h2(self, conn: TLSConnection, domain: Domain, generation: Snapshot,
                 verdict: Verdict, refusal_counted: bool) -> None: ...
    def start_tcp(self, conn: TLSConnection, domain: Domain, verdict: Verdict,
                  refusal_counted: bool) -> None: ...
    def h2_streams_gauge(self) -> Any: ...
    def tunnels_gauge(self, kind: str) -> Any: ...
    def count_h2_error(self, kind: str) -> None: ...
    def count_handshake(self, resumed: bool) -> None: ...
    def count_handshake_failure(self, reason: str, client: str,
                                exc: BaseException | None,
                                identity: ClientIdentity | None = None,
                                detail: str | None = None, domain: str = "") -> None: ...
    def count_request(self, route: str, status: int, duration: float,
                      protocol: str = "http1") -> None: ...
    def request_series(self, route: str, protocol: str = "http1") -> RequestSeries | None: ...
    def count_upstream_error(self, upstream: str, kind: str) -> None: ...
    def access(self, session: Connection, req: Request, status: int, sent: int,
               duration: float, upstream: str, upstream_status: int | None = None,
               upstream_duration: float | None = None,
               grpc_status: str | None = None) -> None: ...


class SessionState(enum.Enum):
    """Where a connection is; ``ProxySession._enter`` checks every transition."""

    HANDSHAKE = "handshake"  # the TLS handshake runs
    PARKED = "parked"  # between requests in callback mode: no task, a ticker deadline
    FAST = "fast"  # a fast exchange is in flight (callbacks only)
    TASK = "task"  # the general path's task serves the connection
    TUNNEL = "tunnel"  # an upgrade switched: the connection is a Tunnel's (proxy/tunnel.py)
    CLOSING = "closing"  # the session closed the connection; connection_lost follows
    CLOSED = "closed"  # connection_lost: nothing more happens

    # Identity hashing (a C slot), not Enum's Python-level hash(name): the transition
    # check hashes a member on every change (as tls/bio.py's TLSState).
    __hash__ = object.__hash__


# The members as module globals: ``SessionState.X`` goes through EnumType.__getattr__ in
# Python 3.11, far slower than a global, and the fast path reads them per request.
_S = SessionState
HANDSHAKE, PARKED, FAST, TASK, TUNNEL, CLOSING, CLOSED = (
    _S.HANDSHAKE, _S.PARKED, _S.FAST, _S.TASK, _S.TUNNEL, _S.CLOSING, _S.CLOSED)
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    HANDSHAKE: frozenset({PARKED, TASK, CLOSING, CLOSED}),
    PARKED: frozenset({FAST, TASK, CLOSING, CLOSED}),
    FAST: frozenset({PARKED, TASK, CLOSING, CLOSED}),
    # TASK -> TASK: the task ended with requests queued meanwhile; a new one takes them.
    TASK: frozenset({PARKED, TASK, TUNNEL, CLOSING, CLOSED}),
    TUNNEL: frozenset({CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class SessionStateError(RuntimeError):
    """A transition the state machine does not have: a bug, never the client's doing."""


_PARK = object()  # _next_request: nothing queued; return to callback mode
_NO_NAMES: frozenset[bytes] = frozenset()
# normalize.may_need_normalising, compiled when http/_speedups.pyx is built: every request
# asks it.
may_need_normalising = speedups.may_need_normalising or normalize.may_need_normalising


def _route_now(domain: Domain, host: bytes, target: bytes,
               protocol: bytes) -> RouteConfig | None:
    """An upgraded route as the current config has it (a reload may drop the upgrade): the
    tunnel asks. A function given its values, not a closure in ``_upgrade``: compiled, that
    closure's scope would hold the session for as long as the tunnel lives."""
    match = domain.router.match(host, target)
    return match[0] if match is not None and protocol in match[0].upgrades else None


def screen(rt: Listener, req: Request) -> None:
    """Normalise the target in place (routing, rules, the authorizer, the upstream and the
    access log all see the normalised one) and refuse what the header rules refuse.
    Raises normalize.PathError or UnderscoreRejected (400). Every protocol calls it, on
    every path, before any route is looked up."""
    target = req.target
    if may_need_normalising(target):  # the usual target: nothing to normalise
        config = rt.config
        req.target = normalize_target(target, config.merge_slashes, config.escaped_slashes)
    rules = rt.header_rules
    if rules.rejects_underscores:
        name = rules.underscore_header(req.headers)
        if name is not None:
            raise UnderscoreRejected(f"header name with an underscore: {name[:40]!r}")


class ProxySession:
    # One per connection: slots make it smaller (no __dict__).
    __slots__ = ("rt", "conn", "domain", "generation", "verdict", "parser", "inbox", "task", "fast",
                 "state", "served", "deadline", "waiting_on", "_head_bytes_seen",
                 "_refusal_counted", "_parse_failed", "received", "_series_route",
                 "_series", "__weakref__")

    def __init__(self, rt: Listener, conn: TLSConnection) -> None:
        self.rt = rt
        self.conn = conn
        # The default domain until the ClientHello's SNI name chooses one (``context``).
        self.domain = rt.domain_for(None)
        self.generation = rt.generation()  # one snapshot for the connection's life
        self.verdict: Verdict | None = None
        self.parser = request_parser(rt.parser_kind, rt.config.limits.max_header_bytes)
        self.inbox: Inbox[Event] = Inbox(conn.pause_reading, conn.resume_reading)
        self.task: asyncio.Task[None] | None = None  # only while the general path runs
        self.fast: _Fast | None = None  # a fast exchange in flight
        self.state = HANDSHAKE
        self.served = 0
        # Hot-path timeouts are deadlines checked by the listener's ticker (one float store
        # per wait) rather than an asyncio.timeout (a timer handle per wait). The first
        # one is the TLS handshake's.
        self.deadline = rt.loop_time() + rt.config.timeouts.handshake
        self.waiting_on: Inbox[Event] | None = None
        self._head_bytes_seen = False
        self._refusal_counted = False
        self._parse_failed = False
        self.received = 0  # plaintext bytes read from the client not yet logged
        # The request counts of the route this connection's last fast exchange took (the
        # listener's object, kept here: the next request of the connection usually takes
        # the same route and then counts with no look-up), and that route's name (None:
        # none looked up yet). A None series is kept too: with workers: N the counts are
        # prometheus-client's, and the listener is asked once, not per request.
        self._series_route: str | None = None
        self._series: RequestSeries | None = None
        rt.connection_opened(self)

    def __repr__(self) -> str:
        return f"<ProxySession {self.rt.name} {self.conn!r} {self.state.value}>"

    def _enter(self, state: SessionState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise SessionStateError(f"{self.state.value} -> {state.value}")
        self.state = state

    # -- TLSHandler ---------------------------------------------------------------------

    def context(self, server_name: str | None) -> ssl.SSLContext:
        """The context of the domain ``server_name`` chooses, from that domain's current
        generation: the snapshot this connection keeps."""
        domain = self.domain = self.rt.domain_for(server_name)
        self.generation = generation = domain.generation()
        return generation.contexts.default

    def handshake_done(self, conn: TLSConnection) -> None:
        rt = self.rt
        resumed = conn.session_reused
        rt.count_handshake(resumed)
        gen = self.generation
        admission = self.domain.admission
        self.verdict = verdict = admission.handshake(
            gen, conn.peer_certificate_der() if gen.bundle is not None else None,
            None if resumed else conn.verified_chain_der)
        now = admission.clock()
        if not verdict.admits(now):
            reason = verdict.reason_at(now)
            assert reason is not None  # admits() is reason_at() is None
            self._count_refusal(reason)
        if rt.config.tcp is not None:
            # TCP mode: no HTTP; the connection is a TcpSession's from here (proxy/tcp.py).
            self._enter(CLOSED)
            self.deadline = 0.0
            rt.connection_closed(self)
            rt.start_tcp(conn, self.domain, verdict, self._refusal_counted)
            return
        sslobj = conn.sslobj
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            # HTTP/2 (RFC 9113 section 3.2): the connection's streams are served by an
            # H2Session with this verdict; this session's part ends here.
            self._enter(CLOSED)
            self.deadline = 0.0
            rt.connection_closed(self)
            rt.start_h2(conn, self.domain, self.generation, verdict, self._refusal_counted)
            return
        self._park()

    def response_pending(self) -> bool:
        """An exchange is in flight: a write will follow (TLSConnection may hold back the
        session ticket to send it with that write)."""
        return self.fast is not None or self.task is not None

    def handshake_failed(self, conn: TLSConnection, reason: str, exc: BaseException) -> None:
        self.rt.count_handshake_failure(reason, conn.peername[0], exc,
                                        domain=self.domain.label)

    def take_received(self) -> int:
        """The bytes read since the last call (the access log's ``bytes_received``)."""
        received, self.received = self.received, 0
        return received

    def plaintext_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._parse_failed:
            return
        try:
            events = self.parser.feed(data)
        except RemoteProtocolError as exc:
            self._parse_failed = True
            self.conn.pause_reading()
            self.inbox.fail(exc)
            self._wake()
            return
        if self.parser.held > HOLD_LIMIT:
            # After an upgrade request nothing is parsed: bytes wait for the tunnel (which
            # resumes reading) or the connection's end, no more than this many.
            self.conn.pause_reading()
        if not events:
            if self.state is PARKED and not self._head_bytes_seen:
                # Slowloris: a head that started (and did not end in this read) must
                # complete within request_headers. A whole head pays no clock read.
                self._head_bytes_seen = True
                deadline = self.rt.loop_time() + self.rt.config.timeouts.request_headers
                if deadline < self.deadline:
                    self.deadline = deadline
            return
        if self.state is PARKED and len(events) == 2 and type(events[1]) is EndOfMessage:
            req = events[0]
            # Request.has_body, inline (a property call per request otherwise).
            if (type(req) is Request and not req.chunked and not req.content_length
                    and not self.inbox.events and self._try_fast(req)):
                return
        self.inbox.put(events)
        self._wake()

    def _wake(self) -> None:
        """Events or an error queued: the general path takes them (unless a fast exchange
        is in flight: its end checks the inbox)."""
        if self.state is PARKED:
            self._start_task(None)

    def _start_task(self, fast: _Fast | None) -> None:
        self._enter(TASK)
        self.deadline = 0.0
        self.task = asyncio.get_running_loop().create_task(self.run(fast))

    def _park(self) -> None:
        """No request pending: wait in callback mode under the ticker's deadline."""
        rt = self.rt
        if self.inbox.events or self.inbox.failed is not None:
            self._start_task(None)
            return
        if rt.draining:
            self._enter(CLOSING)
            self.conn.close()
            return
        if PARKED not in TRANSITIONS[self.state]:  # _enter, inline: once per request
            raise SessionStateError(f"{self.state.value} -> parked")
        self.state = PARKED
        self._head_bytes_seen = False
        timeouts = rt.config.timeouts
        self.deadline = rt.loop_time() + (timeouts.idle if self.served
                                          else timeouts.request_headers)

    def on_drain(self) -> None:
        """The listener drains: an idle connection closes now, a busy one after its
        response (``keep`` is false while draining)."""
        if self.state is PARKED:
            self._enter(CLOSING)
            self.conn.close()

    def eof_received(self) -> None:
        self.inbox.fail(ConnectionClosed("client closed the connection"))
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.task is not None:  # the only reader of the inbox (no exception otherwise)
            self.inbox.fail(ConnectionClosed("client connection lost"))
        fast, self.fast = self.fast, None
        if fast is not None:
            fast.up.direct = None
            fast.up.close()
            self._count_fast(fast, 499, 0)  # nginx's code for "client closed the request"
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._enter(CLOSED)
        self.deadline = 0.0
        self.parser.close()
        self.rt.connection_closed(self)

    # -- the fast path ------------------------------------------------------------------

    def _try_fast(self, req: Request) -> bool:
        """Forward ``req`` from this callback if nothing in it needs the general path."""
        rt = self.rt
        if self.verdict is None or rt.draining or req.upgrade:
            return False
        # _screen's own test, inline: the usual request has nothing to normalise or refuse
        # and pays no call for it.
        if may_need_normalising(req.target) or rt.header_rules.rejects_underscores:
            try:
                self._screen(req)
            except RemoteProtocolError:
                return False  # the general path answers 400
        domain = self.domain
        if rt.has_domains and rt.misdirected(domain.index, req.host):
            return False  # the general path answers 421
        match = domain.router.match(req.host, req.target)
        if match is None:
            return False
        route, target = match
        if route.upstream.protocol != "http1":
            return False  # an HTTP/2 upstream: a stream, not a pooled connection
        # The same decision as the general path's; a refusal (its answer, its count, its
        # log line) and anything that needs an await belong to the general path.
        self.verdict, outcome = domain.admission.admit_now(self.verdict, route)
        if outcome is not ADMITTED:
            return False
        verdict = self.verdict
        pool = rt.pool
        up = pool.take_idle(route.upstream.pool_key)
        if up is None:
            return False
        head = wire.upstream_request_head(req, target, self.conn.peername[0],
                                          verdict.header_block, rt.header_rules, _NO_NAMES)
        up.expect(req.method)
        try:
            up.write(head)
        except UpstreamError:
            up.close()
            return False
        self.state = FAST  # from PARKED, which plaintext_received checked: always allowed
        # Durations from perf_counter: the loop's clock has a millisecond's resolution on
        # uvloop, deadlines are fine with it, a request's latency is not.
        self.fast = _Fast(req, route.upstream, route.name, up, head, perf_counter())
        up.direct = self
        self.deadline = rt.loop_time() + rt.config.timeouts.upstream_read
        return True

    def upstream_events(self, events: list[Event]) -> None:
        """UpstreamConnection callback during a fast exchange: a whole response finishes
        the exchange here; anything else goes to the general path (``_fast_to_task``)."""
        fast = self.fast
        assert fast is not None
        if not (events and type(events[0]) is Response and type(events[-1]) is EndOfMessage
                and events[0].status >= 200 and not fast.up.inbox.events):
            self._fast_to_task(fast, events, None)
            return
        rt = self.rt
        req, up = fast.req, fast.up
        resp = events[0]
        assert isinstance(resp, Response)
        up.direct = None
        self.fast = None
        self.deadline = 0.0
        head, rechunk, keep = wire.client_response_head(req, resp, rt.draining)
        body = events[1]
        if len(events) == 3 and not rechunk and type(body) is Data:
            data = head + body.data  # the common case: one body piece, framed as it came
        else:
            parts = [head]
            for ev in events[1:-1]:
                if isinstance(ev, Data):
                    parts.append(wire.frame(ev.data, rechunk))
            if rechunk:
                parts.append(wire.LAST_CHUNK)
            data = b"".join(parts)
        pool = rt.pool
        pool.release(up, resp.keep_alive)
        if keep:
            self.conn.write(data)  # one TLS record, one system call
        else:
            self.conn.write_and_close(data)  # with close_notify, still one system call
        self.served += 1
        self._count_fast(fast, resp.status, len(data))
        if self.conn.state is not OPEN:  # closing (not keep) or closed
            if self.state is not CLOSED:
                self._enter(CLOSING)
            self.conn.close()
        elif self.conn.write_paused:
            self._start_task(None)  # the general path waits for the drain
        else:
            self._park()

    def upstream_failed(self, exc: BaseException, events: list[Event]) -> None:
        """UpstreamConnection callback: it closed or broke before a whole response."""
        fast = self.fast
        assert fast is not None
        self._fast_to_task(fast, events, exc)

    def _fast_to_task(self, fast: _Fast, events: list[Event],
                      exc: BaseException | None) -> None:
        fast.up.direct = None
        self.fast = None
        if events:
            fast.up.inbox.put(events)
        if exc is not None:
            fast.up.inbox.fail(exc)
        self._start_task(fast)

    def _count_fast(self, fast: _Fast, status: int, sent: int) -> None:
        rt = self.rt
        duration = perf_counter() - fast.start
        if fast.route_name != self._series_route:
            self._series = rt.request_series(fast.route_name)
            self._series_route = fast.route_name
        if self._series is not None:
            self._series.observe(status, duration)
        else:
            rt.count_request(fast.route_name, status, duration)
        if rt.access_log is not None:
            # From the forward to the end of the answer: the upstream's time (499: none).
            rt.access(self, fast.req, status, sent, duration, fast.upstream.key,
                      None if status == 499 else status, None if status == 499 else duration)

    # -- the request loop ---------------------------------------------------------------

    def _count_refusal(self, reason: str) -> None:
        if not self._refusal_counted:
            self._refusal_counted = True
            verdict = self.verdict
            self.rt.count_handshake_failure(reason, self.conn.peername[0], None,
                                            verdict.identity if verdict else None,
                                            domain=self.domain.label)

    async def run(self, fast: _Fast | None = None) -> None:
        """The general path: serve queued requests until none is left (then park in
        callback mode again) or the connection ends. ``fast``: a fast exchange to finish."""
        park = False
        try:
            if fast is not None and not await self._serve(fast.req, fast):
                return
            while self.conn.state is OPEN:
                if self.conn.write_paused:
                    await self._drain_client()
                request = await self._next_request()
                if request is None:
                    break
                if request is _PARK:
                    park = True
                    break
                assert isinstance(request, Request)
                if not await self._serve(request):
                    break
        except RemoteProtocolError as exc:
            # A malformed head: answer with its status; nothing went upstream.
            self._write_error(exc.status_hint, exc.reason)
            self.rt.count_request("", exc.status_hint, 0.0)
        except TimeoutError:
            if self._head_bytes_seen:
                self._write_error(408, "request_timeout")
                self.rt.count_request("", 408, 0.0)
        except (ConnectionClosed, _ClientGone, asyncio.CancelledError):
            pass
        finally:
            self.task = None
            if self.state is TUNNEL:
                # The connection is the tunnel's now (it is its handler): this session
                # only leaves the listener's books.
                self._enter(CLOSED)
                self.deadline = 0.0
                self.parser.close()
                self.rt.connection_closed(self)
            elif park and self.conn.state is OPEN:
                self._park()
            else:
                if self.state is not CLOSED:
                    self._enter(CLOSING)
                # Lingering: the client may still be sending what was not read (a body
                # after an early answer, a pipelined request) - see TLSConnection.close.
                self.conn.close(linger=True)

    async def _next_request(self) -> Request | object | None:
        """The next queued request head; _PARK when none is queued; None when the client
        or a drain ends the connection."""
        ev = self.inbox.get_nowait()
        if ev is None:
            if self.rt.draining:
                return None
            error = self.inbox.failed
            if isinstance(error, ConnectionClosed):
                return None
            if error is not None:
                raise error
            return _PARK
        if not isinstance(ev, Request):
            raise RemoteProtocolError("unexpected message data")
        if not ev.has_body:
            # A bodyless request's EndOfMessage arrives with its head: consume it here so
            # the next get() finds the next request.
            end = self.inbox.get_nowait()
            if not isinstance(end, EndOfMessage):
                raise RemoteProtocolError("unexpected message data")
        return ev

    async def _get(self, inbox: Inbox[Event], timeout: float) -> Event:
        """The next event of ``inbox``; TimeoutError after ``timeout`` seconds of nothing."""
        ev = inbox.get_nowait()
        if ev is not None:
            return ev
        self.deadline = self.rt.loop_time() + timeout
        self.waiting_on = inbox
        try:
            return await inbox.get()
        finally:
            self.deadline = 0.0
            self.waiting_on = None

    def on_tick(self, now: float) -> None:
        """Called by the listener's ticker: fire an expired deadline."""
        if not self.deadline or now < self.deadline:
            return
        if self.conn.in_handshake:
            self.deadline = 0.0
            self.conn.handshake_expired()
        elif self.waiting_on is not None:
            self.deadline = 0.0
            self.waiting_on.interrupt(TimeoutError())
        elif self.fast is not None:
            self.deadline = 0.0
            self._fast_to_task(self.fast, [], UpstreamError("upstream read timed out",
                                                            "timeout", 504))
        elif self.state is PARKED:
            self.deadline = 0.0
            self._enter(CLOSING)
            if self._head_bytes_seen:  # a head started but did not finish in time
                self._write_error(408, "request_timeout")
                self.rt.count_request("", 408, 0.0)
            self.conn.close()  # an idle keep-alive connection: quietly, like nginx

    def _write_error(self, status: int, reason: str, keep_alive: bool = False,
                     message: str | None = None,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> int:
        data = wire.error_response(status, reason, keep_alive, message, headers)
        self.conn.write(data)
        return len(data)

    async def _serve(self, req: Request, fast: _Fast | None = None) -> bool:
        """Answer one request; True when the connection may carry another. ``fast``: the
        request already went upstream from the fast path; finish it here."""
        rt = self.rt
        start = perf_counter() if fast is None else fast.start
        route_name = "" if fast is None else fast.route_name
        status = 0
        sent = 0
        upstream_key = "-" if fast is None else fast.upstream.key
        upstream_status: int | None = None
        up_start = start
        up_end: float | None = None
        keep = False
        try:
            if fast is not None:
                status, sent, keep = await self._forward(req, fast.upstream, fast.head, fast)
                upstream_status, up_end = status, perf_counter()
                return keep
            assert self.verdict is not None
            self._screen(req)  # 400 (RemoteProtocolError below) for a path or header refused
            domain = self.domain
            if rt.has_domains and rt.misdirected(domain.index, req.host):
                # The Host names another domain of this listener than the SNI name chose:
                # its truststore never judged this client (RFC 9110 section 15.5.20).
                status = 421
                keep = req.keep_alive and not req.has_body and not rt.draining
                sent = self._write_error(421, "misdirected_request", keep_alive=keep)
                return keep
            match = domain.router.match(req.host, req.target)
            route = match[0] if match is not None else None
            self.verdict, outcome = await domain.admission.admit(self.verdict, route, req)
            verdict = self.verdict
            keep = req.keep_alive and not req.has_body and not rt.draining
            if isinstance(outcome, Refusal):
                if route is not None:
                    route_name = route.name
                status = outcome.status
                keep = keep and outcome.scope is not Scope.CLIENT
                sent = self._refuse(outcome, route_name, keep)
                return keep
            if match is None:
                status = 404
                sent = self._write_error(404, "no_route", keep_alive=keep)
                return keep
            route, target = match
            route_name = route.name
            upgrade = req.upgrade
            if upgrade and (upgrade == b"h2c" or req.http_version != b"1.1"):
                # Not a tunnel: HTTP/2 over TLS is chosen by ALPN (RFC 9113 section 3.2),
                # and an HTTP/1.0 Upgrade is to be ignored (RFC 9110 section 7.8). The
                # request is served as it is; the connection ends after it (the parser
                # read nothing past it).
                upgrade = b""
            elif upgrade and (upgrade not in route.upgrades or req.method != b"GET"):
                status = 501
                sent = self._write_error(501, "upgrade_not_allowed")
                return False
            extra = outcome.headers if isinstance(outcome, Admitted) else ()
            upstream_key = route.upstream.key
            block = verdict.header_block + header_block(extra) if extra \
                else verdict.header_block
            # The authorizer's headers replace a client's of the same (folded) name, as
            # Envoy's ext_authz does: a client must not pre-send X-Tenant beside them.
            head = wire.upstream_request_head(
                req, target, self.conn.peername[0], block, rt.header_rules,
                wire.replaced_names(extra, outcome.strip if isinstance(outcome, Admitted)
                               else _NO_NAMES))
            up_start = perf_counter()
            if upgrade:
                status, sent = await self._upgrade(req, route, head, start)
                upstream_status, up_end = status, perf_counter()
                return False
            status, sent, keep = await self._forward(req, route.upstream, head)
            upstream_status, up_end = status, perf_counter()
            return keep
        except _UpstreamAfterHead as exc:
            # The response head went out: closing is the only honest signal left.
            rt.count_upstream_error(upstream_key, exc.kind)
            status = upstream_status = exc.status_hint
            up_end = perf_counter()
            self.conn.abort()
            return False
        except UpstreamError as exc:
            rt.count_upstream_error(upstream_key, exc.kind)
            status = exc.status_hint
            reason = "upstream_timeout" if status == 504 else "upstream_unavailable"
            sent = self._write_error(status, reason)
            return False
        except RemoteProtocolError as exc:
            # A malformed request body (bad chunking): nothing more can be read from it.
            status = exc.status_hint
            sent = self._write_error(status, exc.reason)
            return False
        except _BodyTimeout:
            # The client stopped sending its body (nginx's client_body_timeout: 408).
            status = 408
            sent = self._write_error(408, "request_timeout")
            return False
        finally:
            self.served += 1
            duration = perf_counter() - start
            if status == 0:
                status = 499  # nginx's code for "client closed the request"
            tunnelled = self.state is TUNNEL  # counted and logged by the tunnel at its end
            if not tunnelled:
                rt.count_request(route_name, status, duration)
            if rt.access_log is not None and not tunnelled:
                rt.access(self, req, status, sent, duration, upstream_key, upstream_status,
                          None if up_end is None else up_end - up_start)

    def _screen(self, req: Request) -> None:
        screen(self.rt, req)

    def _refuse(self, refusal: Refusal, route: str, keep: bool) -> int:
        """Answer and count a refusal of the admission step; the bytes sent."""
        if refusal.scope is Scope.CLIENT:
            self._count_refusal(refusal.reason)
        elif refusal.scope is Scope.ROUTE:
            identity = self.verdict.identity if self.verdict is not None else None
            detail = (f"route {route}: no allow rule matched ({refusal.detail})"
                      if refusal.detail else f"route {route}")
            self.rt.count_handshake_failure(refusal.reason, self.conn.peername[0], None,
                                            identity, detail, self.domain.label)
        elif refusal.scope is Scope.TOKEN:
            # RFC 6750 section 3: the challenge, and a short description (never the token).
            return self._write_error(refusal.status, refusal.reason, keep, refusal.detail,
                                     refusal.headers)
        return self._write_error(refusal.status, refusal.reason, keep_alive=keep)

    async def _forward(self, req: Request, upstream: Upstream, head: bytes,
                       fast: _Fast | None = None) -> tuple[int, int, bool]:
        """Send the request upstream and stream the response back: (status, bytes, keep).
        ``fast``: the head already went out on ``fast.up`` (a pooled connection)."""
        rt = self.rt
        timeouts = rt.config.timeouts
        if req.expect_continue and req.has_body:
            self.conn.write(wire.CONTINUE)
        for attempt in (0, 1):
            up: Exchange
            if fast is not None and attempt == 0:
                up, reused = fast.up, True
            else:
                up, reused = await rt.pool.acquire(upstream, timeouts.upstream_connect)
                up.expect(req.method)
                up.send_head(head, not req.has_body)
            pump: asyncio.Task[None] | None = None
            if req.has_body:
                pump = asyncio.get_running_loop().create_task(self._pump_body(req, up))
            try:
                resp = await self._response_head(up, pump, timeouts.upstream_read)
            except BaseException as exc:
                up.close()
                if pump is not None:
                    pump.cancel()
                if not isinstance(exc, ConnectionClosed):
                    raise
                if (reused and attempt == 0 and pump is None
                        and req.method not in _NON_IDEMPOTENT):
                    # The pooled connection closed before a byte of the answer (the
                    # upstream's keep-alive timeout raced us): one retry on a fresh one,
                    # as nginx does (proxy_next_upstream error).
                    continue
                raise UpstreamError("upstream closed before responding", "reset") from None
            return await self._stream_response(req, resp, up, pump)
        raise AssertionError("unreachable")

    async def _upgrade(self, req: Request, route: RouteConfig, head: bytes,
                       start: float) -> tuple[int, int]:
        """Ask the upstream for the upgrade; on its 101, the connection becomes a
        ``Tunnel``; any other answer is forwarded as a response. (status, bytes sent)."""
        rt = self.rt
        timeouts = rt.config.timeouts
        protocol = req.upgrade
        try:
            opened = await open_upgrade(route.upstream,
                                        wire.upgrade_request_head(head, protocol),
                                        timeouts.upstream_connect, timeouts.upstream_read,
                                        rt.pool.tls)
        except ConnectionClosed:
            raise UpstreamError("upstream closed before responding", "reset") from None
        try:
            switched = wire.switching_response(opened.head, protocol)
        except RemoteProtocolError as exc:
            opened.transport.close()
            raise UpstreamError(str(exc), "protocol") from None
        if switched is None:
            # Not switched: an ordinary answer, read by an ordinary upstream connection.
            # Its own key (TLS settings included), and never pooled after (below): it
            # carried an upgrade request.
            up = UpstreamConnection(route.upstream.key,
                                    response_parser(rt.parser_kind), rt.pool.writes,
                                    route.upstream.pool_key)
            opened.transport.set_protocol(cast(asyncio.Protocol, up))  # see its class
            up.connection_made(opened.transport)
            up.set_state(UP_ACTIVE)
            up.expect(req.method)
            up.data_received(opened.head + opened.rest)
            if opened.eof:
                up.eof_received()
            try:
                resp = await self._response_head(up, None, timeouts.upstream_read)
                status, sent, _ = await self._stream_response(req, resp, up, None)
            finally:
                up.close()
            return status, sent
        assert self.verdict is not None
        self._enter(TUNNEL)
        self.conn.write(switched)
        tunnel = Tunnel(rt, self.conn, opened.transport, protocol.decode(), self.verdict,
                        self.domain.admission, route, req, route.upstream.key, start,
                        route_now=partial(_route_now, self.domain, req.host, req.target,
                                          protocol))
        tunnel.start(self.parser.take_held(), opened.rest, opened.eof)
        self.conn.resume_reading()  # paused if the held bytes reached HOLD_LIMIT
        return 101, len(switched)

    async def _pump_body(self, req: Request, up: Exchange) -> None:
        """Client body -> upstream, re-framed, with back-pressure both ways."""
        idle = self.rt.config.timeouts.idle
        while True:
            ev = self.inbox.get_nowait()
            if ev is None:
                try:
                    async with asyncio.timeout(idle):
                        ev = await self.inbox.get()
                except TimeoutError:
                    # Its own type: the response-head wait that may surface it turns its
                    # TimeoutErrors into an upstream timeout (504), and this is the client's.
                    raise _BodyTimeout() from None
            if isinstance(ev, Data):
                up.send_body(ev.data, req.chunked)
                if up.write_paused:
                    try:
                        async with asyncio.timeout(self.rt.config.timeouts.upstream_read):
                            await up.drain()
                    except TimeoutError:
                        raise UpstreamError("upstream write timed out", "timeout", 504) from None
            elif isinstance(ev, EndOfMessage):
                up.end_body(req.chunked)
                return
            else:
                raise RemoteProtocolError("unexpected message data")

    async def _head_of(self, up: Exchange, timeout: float | None) -> Response:
        # A method, not a closure in _response_head: compiled (mtlsproxy/compiled.py), a
        # closure's scope holds the function that holds the scope, a cycle that would keep
        # the session for the cyclic GC (tests/integration/test_lifetime.py).
        while True:
            ev = await (up.inbox.get() if timeout is None else self._get(up.inbox, timeout))
            if isinstance(ev, Response):
                return ev
            if isinstance(ev, Data | EndOfMessage):
                raise UpstreamError("upstream sent body data before a head", "protocol")
            # 1xx: the proxy answered Expect itself; other interim responses are dropped.

    async def _response_head(self, up: Exchange, pump: asyncio.Task[None] | None,
                             read_timeout: float) -> Response:
        try:
            if pump is None:
                return await self._head_of(up, read_timeout)
            # While the body uploads, the pump's own timeouts apply; the read timeout
            # starts when the request is complete (nginx's proxy_read_timeout).
            head_task = asyncio.get_running_loop().create_task(self._head_of(up, None))
            try:
                done, _ = await asyncio.wait({head_task, pump},
                                             return_when=asyncio.FIRST_COMPLETED)
                if head_task in done:
                    return head_task.result()
                pump.result()  # raises if the client's body failed
                async with asyncio.timeout(read_timeout):
                    return await head_task
            finally:
                if not head_task.done():
                    head_task.cancel()
        except TimeoutError:
            raise UpstreamError("upstream read timed out", "timeout", 504) from None

    async def _stream_response(self, req: Request, resp: Response, up: Exchange,
                               pump: asyncio.Task[None] | None) -> tuple[int, int, bool]:
        rt = self.rt
        head, rechunk, keep = wire.client_response_head(req, resp, rt.draining)
        # Writes are coalesced: the head and whatever body is already here go out as one
        # TLS record and one system call (for small responses, the whole response).
        pending = [head]
        pending_size = sent = len(head)
        status = resp.status
        read_timeout = rt.config.timeouts.upstream_read
        try:
            while True:
                ev = up.inbox.get_nowait()
                if ev is None:
                    if pending:
                        await self._write_out(pending)
                        pending, pending_size = [], 0
                    try:
                        ev = await self._get(up.inbox, read_timeout)
                    except TimeoutError:
                        raise UpstreamError("upstream read timed out", "timeout", 504) from None
                    except ConnectionClosed:
                        raise UpstreamError("upstream closed mid-response", "reset") from None
                if isinstance(ev, Data):
                    data = wire.frame(ev.data, rechunk)
                    pending.append(data)
                    pending_size += len(data)
                    sent += len(data)
                    if pending_size >= _COALESCE_LIMIT:
                        await self._write_out(pending)
                        pending, pending_size = [], 0
                elif isinstance(ev, EndOfMessage):
                    break
            if rechunk:
                pending.append(wire.LAST_CHUNK)
                sent += len(wire.LAST_CHUNK)
            if pending:
                await self._write_out(pending)
        except BaseException as exc:
            up.close()
            if pump is not None:
                pump.cancel()
            if isinstance(exc, UpstreamError):
                exc.status_hint = status  # the head went out; the caller must not answer
                raise _UpstreamAfterHead(exc) from None
            raise
        body_done = pump is None or pump.done() and not pump.cancelled() and \
            pump.exception() is None
        if pump is not None and not pump.done():
            # The upstream answered before reading the whole request body: neither side
            # can be resynchronised.
            pump.cancel()
            keep = False
        rt.pool.release(up, resp.keep_alive and body_done)
        return status, sent, keep and body_done


    async def _write_out(self, parts: list[bytes]) -> None:
        self.conn.write(parts[0] if len(parts) == 1 else b"".join(parts))
        await self._drain_client()

    async def _drain_client(self) -> None:
        conn = self.conn
        if conn.write_paused:
            try:
                await conn.drain()
            except ConnectionResetError:
                raise _ClientGone() from None
        if conn.state is not OPEN:
            raise _ClientGone()


_COALESCE_LIMIT = 64 * 1024
# Bytes a client may send after an upgrade request before reading from it pauses: they
# wait for the tunnel, never parsed (proxy/tcp.py holds as much before its tunnel).
HOLD_LIMIT = 64 * 1024
# Never retried: the upstream may have acted on them before it closed. nginx's list
# (ngx_http_upstream.c: POST, LOCK, PATCH; "proxy_next_upstream non_idempotent" is off by
# default), which it applies to every other method, WebDAV's included.
_NON_IDEMPOTENT = frozenset({b"POST", b"LOCK", b"PATCH"})


class _UpstreamAfterHead(UpstreamError):
    def __init__(self, exc: UpstreamError) -> None:
        super().__init__(str(exc), exc.kind, exc.status_hint)
