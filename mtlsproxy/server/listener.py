"""One listener at runtime: accepts, owns its sessions, counts what happens to them."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Any, cast

from mtlsproxy.admission.admit import Admission
from mtlsproxy.admission.authorizer import AuthorizerClient
from mtlsproxy.admission.cache import ValidationCache, Verdict
from mtlsproxy.admission.jwks import AccessTokens
from mtlsproxy.admission.tokens import redact_query
from mtlsproxy.config import ListenerConfig
from mtlsproxy.http.client import post
from mtlsproxy.http.header_rules import HeaderRules
from mtlsproxy.http.parser import Request
from mtlsproxy.identity.peer import ClientIdentity
from mtlsproxy.metrics import Metrics
from mtlsproxy.proxy.h2session import H2Session
from mtlsproxy.proxy.pool import UpstreamPool
from mtlsproxy.proxy.routing import DomainNames, Router, route_host
from mtlsproxy.proxy.session import Connection, Domain, ProxySession, Snapshot
from mtlsproxy.proxy.tcp import TcpSession
from mtlsproxy.revocation.ocsp import OcspClient
from mtlsproxy.revocation.watcher import RevocationWatcher
from mtlsproxy.runtime.series import RequestSeries
from mtlsproxy.runtime.writes import WriteBatch
from mtlsproxy.server.generation import Generation, GenerationOwner, TruststoreHolder
from mtlsproxy.server.refusals import RefusalLog
from mtlsproxy.tls.bio import TLSConnection

log = logging.getLogger("mtlsproxy")

# Request timeouts fire within this many seconds of their deadline (nginx's timers are
# similarly coarse); a ticker beats a timer handle per request on the hot path.
TICK = 0.1


# The policy's clock, read on every request (the verdict's validity window): a partial
# calls datetime.now from C, without a Python frame (docs/performance.md, "Per request").
utc_now: Callable[[], dt.datetime] = functools.partial(dt.datetime.now, dt.UTC)


class AccessLog:
    """One JSON line per request; buffered and flushed at most every 200 ms."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, record: dict[str, Any]) -> None:
        self._lines.append(json.dumps(record, separators=(",", ":")))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(0.2, self.flush)

    def flush(self) -> None:
        self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass


class _Refuse(asyncio.Protocol):
    """Over max_connections: close before spending a handshake on it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class DomainRuntime:
    """One domain of a listener (``listeners[].domains[]``, or the listener itself without
    them): its generation's owner, its routes and its admission step. A connection keeps
    the domain its SNI name chose for its whole life."""

    __slots__ = ("index", "config", "owner", "holder", "router", "admission")

    def __init__(self, index: int, owner: GenerationOwner, admission: Admission) -> None:
        self.index = index  # in listeners[].domains; 0 is the default
        self.config = owner.config  # the domain's view (ListenerConfig.domain_views)
        self.owner = owner  # the one writer of the domain's generation
        self.holder = owner.holder  # read: holder.current
        self.router = Router(owner.config.routes)
        self.admission = admission

    @property
    def label(self) -> str:
        return self.config.domain

    def generation(self) -> Generation:
        return self.holder.current

    def apply(self, config: ListenerConfig) -> None:
        """A reload's new view of this domain: its routes and admission settings."""
        self.config = self.owner.config = config
        self.router = Router(config.routes)
        admission = self.admission
        admission.mutual_tls = config.mutual_tls
        wanted = config.mutual_tls.revocation.ocsp
        if wanted and admission.ocsp is None:
            admission.ocsp = OcspClient(post)
        elif not wanted:
            admission.ocsp = None

    def __repr__(self) -> str:
        return f"<DomainRuntime {self.config.label} {self.holder!r}>"


class ListenerRuntime:
    def __init__(self, config: ListenerConfig, owners: list[GenerationOwner], metrics: Metrics,
                 pool: UpstreamPool, cache: ValidationCache, parser_kind: str = "httptools",
                 clock: Callable[[], dt.datetime] = utc_now,
                 access_log: AccessLog | None = None, worker: int | None = None,
                 writes: WriteBatch | None = None) -> None:
        self.config = config
        self.writes = writes  # client connections' sends deferred to the pass's end
        self.worker = worker  # index among ``workers: N``; None when there is one process
        self.name = config.name
        self.metrics = metrics
        self.pool = pool
        self.cache = cache
        self.parser_kind = parser_kind
        self.clock = clock
        self.access_log = access_log
        self._headers_dropped = metrics.headers_dropped
        self.header_rules = self.make_header_rules(config)
        self._cache_hits = metrics.cert_cache.labels("hit")
        self._cache_misses = metrics.cert_cache.labels("miss")
        authorizer = AuthorizerClient(
            lambda route, result: metrics.authorizer_requests.labels(route, result).inc())
        access_tokens = metrics.access_tokens
        name = config.name
        # Routes' access tokens: key sets, verified tokens; the listener's clock (Unix time
        # for exp/nbf/iat).
        tokens = AccessTokens(
            lambda route, result: access_tokens.labels(name, route, result).inc(),
            clock=lambda: clock().timestamp())
        for domain_config in config.domains:
            for route in domain_config.routes:
                if route.access_token is not None:
                    metrics.declare_token_route(name, route.name)
        # Who may pass: the one decision every protocol asks (admission/admit.py), one per
        # domain (its truststore, its CRLs); the authorizer client, the access tokens and
        # their caches are shared.
        self.domains = [
            DomainRuntime(i, owner, Admission(owner.config.label, owner.holder, cache, clock,
                                              owner.config.mutual_tls, authorizer,
                                              self.count_cache, tokens=tokens))
            for i, owner in enumerate(owners)]
        for domain in self.domains:
            domain.apply(domain.config)
        self.domain_names = DomainNames(tuple(d.names for d in config.domains))
        self.has_domains = len(config.domains) > 1
        self.sessions: set[Connection] = set()  # HTTP/1.1 sessions and HTTP/2 ones
        self.refusals = RefusalLog(logging.getLogger("mtlsproxy.refusals"))
        self.draining = False
        self._handshakes_resumed = metrics.handshakes.labels(self.name, "true")
        self._handshakes_full = metrics.handshakes.labels(self.name, "false")
        self.server: asyncio.Server | None = None
        self.loop_time: Callable[[], float] = time.monotonic
        self._ticker: asyncio.Task[None] | None = None
        self._requests: dict[tuple[str, str, int], Any] = {}
        # By (route, protocol): RequestCounts' series.
        self._series: dict[tuple[str, str], RequestSeries] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._active = metrics.connections_active.labels(self.name)
        self._h2_streams = metrics.h2_streams_active.labels(self.name)
        metrics.declare_listener(self.name, tuple(d.label for d in self.domains),
                                 tcp=config.tcp is not None)

    def make_header_rules(self, config: ListenerConfig) -> HeaderRules:
        """The header rules of ``config`` (a reload builds new ones, then swaps them in)."""
        dropped = self._headers_dropped
        name = self.name
        return HeaderRules(config.headers_with_underscores, config.strip_headers,
                           config.forwarded_headers,
                           lambda reason: dropped.labels(name, reason).inc())

    # The default (first) domain's parts: all there is for a listener without domains.
    @property
    def owner(self) -> GenerationOwner:
        return self.domains[0].owner

    @property
    def holder(self) -> TruststoreHolder:
        return self.domains[0].holder

    @property
    def admission(self) -> Admission:
        return self.domains[0].admission

    @property
    def router(self) -> Router:
        return self.domains[0].router

    @property
    def revocation(self) -> RevocationWatcher | None:
        return self.owner.revocation

    def generation(self) -> Generation:
        """The generation new connections take (one snapshot each)."""
        return self.holder.current

    def domain_for(self, server_name: str | None) -> DomainRuntime:
        """The domain a handshake's SNI name chooses: the default (first) one when the
        name is absent or names no domain (nginx's default_server)."""
        index = self.domain_names.index(server_name)
        return self.domains[index or 0]

    def misdirected(self, domain: int, host: bytes) -> bool:
        """A request on a connection of the domain of index ``domain`` whose Host names
        another domain of this listener: 421 (RFC 9110 section 15.5.20), never that
        domain's routes."""
        index = self.domain_names.index(route_host(host)) if host else None
        return index is not None and index != domain

    def apply_config(self, config: ListenerConfig) -> None:
        """A reload's config (the number of domains unchanged: ``_not_live`` checks)."""
        self.config = config
        for domain, view in zip(self.domains, config.domain_views(), strict=True):
            domain.apply(view)
        self.domain_names = DomainNames(tuple(d.names for d in config.domains))
        self.header_rules = self.make_header_rules(config)

    def __repr__(self) -> str:
        return (f"<ListenerRuntime {self.name} {self.config.host}:{self.config.port} "
                f"sessions={len(self.sessions)} draining={self.draining}>")

    # -- accept -----------------------------------------------------------------------

    def protocol_factory(self) -> asyncio.Protocol:
        if len(self.sessions) >= self.config.limits.max_connections:
            return _Refuse()
        config = self.config  # read per connection: a reload applies to the next one
        # TLSConnection has asyncio.Protocol's methods, not that base (see its class).
        return cast(asyncio.Protocol, TLSConnection(
            lambda conn: ProxySession(self, conn), config.proxy_protocol, self.writes,
            config.proxy_protocol_sources))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop_time = loop.time
        self._ticker = loop.create_task(self._tick())
        self.server = await loop.create_server(self.protocol_factory, self.config.host,
                                               self.config.port, reuse_address=True,
                                               reuse_port=self.worker is not None or None,
                                               backlog=1024)

    async def _tick(self) -> None:
        """Fire the sessions' expired deadlines; the granularity of every request timeout."""
        while True:
            await asyncio.sleep(TICK)
            self._fire_deadlines(self.loop_time())

    def _fire_deadlines(self, now: float) -> None:
        # Not inlined in _tick: the loop variable would keep the last session (and its
        # connection) alive in the sleeping coroutine's frame until the next tick.
        for session in list(self.sessions):
            if session.deadline:
                session.on_tick(now)

    def stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    @property
    def bound_port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def begin_drain(self) -> None:
        """Idle keep-alive connections close now; busy ones after their response."""
        self.draining = True
        for session in list(self.sessions):
            session.on_drain()

    async def wait_drained(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.conn.abort()
        self.stop_ticker()
        return not self.sessions

    # -- session bookkeeping ----------------------------------------------------------------

    def connection_opened(self, session: Connection) -> None:
        self.sessions.add(session)
        self._active.inc()

    def connection_closed(self, session: Connection) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._active.dec()

    def start_h2(self, conn: TLSConnection, domain: Domain, generation: Snapshot,
                 verdict: Verdict, refusal_counted: bool) -> None:
        """ALPN chose h2: the connection's handler becomes an H2Session."""
        conn.handler = H2Session(self, conn, domain, generation, verdict, refusal_counted)

    def start_tcp(self, conn: TLSConnection, domain: Domain, verdict: Verdict,
                  refusal_counted: bool) -> None:
        """TCP mode (listeners[].tcp): admission, then a tunnel (proxy/tcp.py)."""
        TcpSession(self, conn, domain, verdict, refusal_counted)

    def count_tcp(self, received: int, sent: int, duration: float) -> None:
        m = self.metrics
        m.tcp_connections.labels(self.name).inc()
        m.tcp_bytes.labels(self.name, "received").inc(received)
        m.tcp_bytes.labels(self.name, "sent").inc(sent)
        m.tcp_duration.labels(self.name).observe(duration)

    def access_tcp(self, session: Connection, received: int, sent: int, duration: float,
                   upstream: str, outcome: str) -> None:
        """A TCP-mode connection's access log line, written when it ends: the fields of
        an HTTP line that mean something without HTTP, and ``outcome``."""
        if self.access_log is None:
            return
        identity = session.verdict.identity if session.verdict is not None else None
        conn = session.conn
        sslobj = conn.sslobj
        cipher = sslobj.cipher() if sslobj is not None else None
        self.access_log.write({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "listener": self.name,
            "client": conn.peername[0],
            "client_cert_subject": identity.subject if identity else None,
            "client_cert_fingerprint": identity.fingerprint_sha256 if identity else None,
            "protocol": "tcp",
            "outcome": outcome,
            "bytes": sent,
            "bytes_received": received,
            "duration_ms": round(duration * 1000, 3),
            "upstream": upstream,
            "resumed": conn.session_reused,
            "tls_version": sslobj.version() if sslobj is not None else None,
            "tls_cipher": cipher[0] if cipher else None,
            "sni": conn.server_name,
        })

    def tunnels_gauge(self, kind: str) -> Any:
        return self.metrics.tunnels_active.labels(self.name, kind)

    def h2_streams_gauge(self) -> Any:
        return self._h2_streams

    def count_h2_error(self, kind: str) -> None:
        self.metrics.h2_protocol_errors.labels(self.name, kind).inc()

    # -- counting -----------------------------------------------------------------------

    def count_handshake(self, resumed: bool) -> None:
        # Children looked up once (labels() hashes and locks on every call).
        (self._handshakes_resumed if resumed else self._handshakes_full).inc()

    def count_handshake_failure(self, reason: str, client: str,
                                exc: BaseException | None,
                                identity: ClientIdentity | None = None,
                                detail: str | None = None, domain: str = "") -> None:
        """A refusal: counted by reason, and logged at INFO (rate-limited, refusals.py)."""
        self.metrics.handshake_failures.labels(self.name, domain, reason).inc()
        self.refusals.refused(self.name, reason, client, identity, detail, domain)
        if exc is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("client %s refused on %s: %s (%s)", client, self.name, reason, exc)

    def count_cache(self, hit: bool) -> None:
        (self._cache_hits if hit else self._cache_misses).inc()

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        self.metrics.upstream_errors.labels(upstream, kind).inc()

    def request_series(self, route: str, protocol: str = "http1") -> RequestSeries | None:
        """The counts a request of ``route`` adds to, for a caller to keep (a session, for
        its connection's requests); None with ``workers: N`` (prometheus-client's)."""
        counts = self.metrics.request_counts
        if counts is None:
            return None
        series = self._series.get((route, protocol))
        if series is None:
            series = self._series[route, protocol] = counts.series(self.name, route, protocol)
        return series

    def count_request(self, route: str, status: int, duration: float,
                      protocol: str = "http1") -> None:
        series = self.request_series(route, protocol)
        if series is not None:
            series.observe(status, duration)
            return
        key = (route, protocol, status)
        counter = self._requests.get(key)
        if counter is None:
            assert self.metrics.requests is not None
            counter = self._requests[key] = self.metrics.requests.labels(
                self.name, route, protocol, str(status))
        counter.inc()
        hist = self._durations.get((route, protocol))
        if hist is None:
            assert self.metrics.request_duration is not None
            hist = self._durations[route, protocol] = self.metrics.request_duration.labels(
                self.name, route, protocol)
        hist.observe(duration)

    def access(self, session: Connection, req: Request, status: int, sent: int,
               duration: float, upstream: str, upstream_status: int | None = None,
               upstream_duration: float | None = None,
               grpc_status: str | None = None) -> None:
        if self.access_log is None:
            return
        identity = session.verdict.identity if session.verdict is not None else None
        conn = session.conn
        user_agent = request_id = None
        for name, value in req.headers:
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")
        if req.request_id:  # none came (or it was dropped): the one the proxy forwarded
            request_id = req.request_id.decode("ascii")
        sslobj = conn.sslobj
        cipher = sslobj.cipher() if sslobj is not None else None
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "listener": self.name,
            "client": conn.peername[0],
            "client_cert_subject": identity.subject if identity else None,
            "client_cert_fingerprint": identity.fingerprint_sha256 if identity else None,
            "method": req.method.decode("latin-1"),
            "host": req.host.decode("latin-1") if req.host else None,
            "path": redact_query(req.target).decode("latin-1"),
            "protocol": "HTTP/" + req.http_version.decode("latin-1"),
            "status": status,
            "bytes": sent,
            # Microseconds: the duration is measured with perf_counter (proxy/session.py).
            "duration_ms": round(duration * 1000, 3),
            "upstream": upstream,
            # What the upstream answered and how long it took (nginx's $upstream_status,
            # $upstream_response_time); null when the proxy answered itself.
            "upstream_status": upstream_status,
            "upstream_duration_ms": (None if upstream_duration is None
                                     else round(upstream_duration * 1000, 3)),
            "user_agent": user_agent,
            "request_id": request_id,
            "resumed": conn.session_reused,
            "tls_version": sslobj.version() if sslobj is not None else None,
            "tls_cipher": cipher[0] if cipher else None,
            "sni": conn.server_name,
            # Bytes read from the client since the previous request's line (head and
            # body: nginx's $request_length); pipelined requests that arrived in one read
            # are counted with the first.
            "bytes_received": session.take_received(),
        }
        if grpc_status is not None:
            record["grpc_status"] = grpc_status  # a gRPC call's, from its trailers
        if self.worker is not None:
            record["worker"] = self.worker
        self.access_log.write(record)
