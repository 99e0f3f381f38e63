"""TCP mode (``listeners[].tcp``): ghostunnel's shape, mTLS in front of a service that
does not speak HTTP (Postgres, Redis, MQTT, a protocol of one's own).

Rules of this module:
- Who may pass is decided by the same step as every HTTP request and stream
  (``Admission.admit``, admission/admit.py), with the listener's ``tcp`` block standing
  for the route (``TcpConfig.route``: its ``allow`` rules). Nothing reaches the upstream
  before that step said yes: the upstream is not even connected to.
- A client refused after the handshake (its certificate expired since the cache saw it,
  revoked, or ``allow`` says no) gets close_notify and a closed connection: there is no
  HTTP status to say why, so the reason is in the refusal count and log, as for HTTP.
- Bytes the client sends while the decision and the connect are under way wait, up to
  ``HOLD_LIMIT`` (then reading pauses), and go first once the tunnel is up, after the
  PROXY v2 header when ``proxy_protocol_upstream: v2``.
- After that the connection is a ``Tunnel`` (proxy/tunnel.py) of kind ``tcp``: back-
  pressure, half-close, ``timeouts.idle``, and admission asked again every second, so a
  revocation, a truststore swap or an expiry ends it.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

from cryptography.x509.oid import NameOID

from mtlsproxy.admission.admit import Refusal
from mtlsproxy.errors import UpstreamError
from mtlsproxy.proxy.connect import connect
from mtlsproxy.proxy.tunnel import Tunnel
from mtlsproxy.tls.bio import OPEN, HandshakeOver, TLSConnection
from mtlsproxy.tls.proxy_protocol import build_v2

log = logging.getLogger("mtlsproxy.tcp")

if TYPE_CHECKING:
    from mtlsproxy.admission.cache import Verdict
    from mtlsproxy.config.model import RouteConfig, TcpConfig
    from mtlsproxy.proxy.session import Domain

HOLD_LIMIT = 64 * 1024


class _Holding(asyncio.Protocol):
    """The upstream connection's protocol until the tunnel takes it: keeps what comes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self.lost = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > HOLD_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # the tunnel resumes it

    def eof_received(self) -> bool | None:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class TcpSession(HandshakeOver):
    """The TLS handler of a TCP-mode connection from its handshake until its tunnel is up
    (or it is refused)."""

    def __init__(self, rt: Any, conn: TLSConnection, domain: Domain, verdict: Verdict,
                 refusal_counted: bool) -> None:
        self.rt = rt
        self.conn = conn
        self.domain = domain
        self.verdict: Verdict | None = verdict
        self._refusal_counted = refusal_counted
        self.held = bytearray()
        self.client_eof = False
        self.deadline = 0.0  # the connect's own timeout bounds this stage
        self._start = perf_counter()
        conn.handler = self
        rt.connection_opened(self)
        self.task: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._open())

    def __repr__(self) -> str:
        return f"<TcpSession {self.rt.name} {self.conn!r}>"

    # -- what the listener and TLSConnection call ------------------------------------------

    def take_received(self) -> int:
        return len(self.held)

    def plaintext_received(self, data: bytes) -> None:
        self.held += data
        if len(self.held) > HOLD_LIMIT:
            self.conn.pause_reading()  # resumed once the tunnel is up

    def eof_received(self) -> None:
        self.client_eof = True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.rt.connection_closed(self)

    def on_tick(self, now: float) -> None:
        pass

    def on_drain(self) -> None:
        """A connection not yet relayed is not started during a drain."""
        if self.task is not None:
            self.task.cancel()
            self._close()

    # -- the decision, the connect, the switch ------------------------------------------

    async def _open(self) -> None:
        try:
            await self._open_tunnel()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not leave the client hanging nor the upstream socket open.
            log.exception("TCP connection from %s failed", self.conn.peername[0])
            self._close()

    async def _open_tunnel(self) -> None:
        rt = self.rt
        tcp: TcpConfig = rt.config.tcp
        assert self.verdict is not None
        self.verdict, outcome = await self.domain.admission.admit(self.verdict, tcp.route,
                                                                  None)
        if isinstance(outcome, Refusal):
            self._refuse(outcome)
            return
        upstream = tcp.upstream
        try:
            transport, holding = await connect(upstream, _Holding,
                                               rt.config.timeouts.upstream_connect,
                                               rt.pool.tls)
        except UpstreamError as exc:
            rt.count_upstream_error(upstream.key, exc.kind)
            rt.access_tcp(self, 0, 0, perf_counter() - self._start, upstream.key,
                          "upstream_unavailable")
            self._close()
            return
        self.task = None
        if self.conn.state is not OPEN:  # the client left meanwhile
            transport.close()
            return
        if tcp.proxy_protocol_upstream == "v2":
            try:
                header = self._proxy_header()
            except Exception:
                transport.close()
                raise
            transport.write(header)
        rt.connection_closed(self)  # the tunnel is the listener's connection from here
        def route_now() -> RouteConfig | None:
            """The tcp block as the current config has it (a reload may change allow)."""
            now = rt.config.tcp
            return now.route if now is not None else None
        tunnel = Tunnel(rt, self.conn, transport, "tcp", self.verdict,
                        self.domain.admission, tcp.route, None, upstream.key, self._start,
                        on_end=self._ended, route_now=route_now)
        held, self.held = bytes(self.held), bytearray()
        tunnel.start(held, bytes(holding.buf), holding.eof)
        self.conn.resume_reading()
        if holding.transport is not None and not holding.transport.is_closing():
            holding.transport.resume_reading()
        if self.client_eof:
            tunnel.eof_received()
        if holding.lost:
            tunnel.upstream_lost()

    def _proxy_header(self) -> bytes:
        conn = self.conn
        identity = self.verdict.identity if self.verdict is not None else None
        common_name = None
        if identity is not None:
            names = identity.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            common_name = str(names[0].value) if names else None
        sslobj = conn.sslobj
        cipher = sslobj.cipher() if sslobj is not None else None
        return build_v2(conn.peername, conn.sockname,
                        tls_version=sslobj.version() if sslobj is not None else "TLS",
                        cipher=cipher[0] if cipher else None,
                        common_name=common_name, verified=identity is not None,
                        cert_on_connection=not conn.session_reused,
                        authority=conn.server_name)

    def _refuse(self, refusal: Refusal) -> None:
        identity = self.verdict.identity if self.verdict is not None else None
        if not self._refusal_counted:
            self._refusal_counted = True
            self.rt.count_handshake_failure(refusal.reason, self.conn.peername[0], None,
                                            identity, refusal.detail or "tcp",
                                            self.domain.label)
        self._close()

    def _close(self) -> None:
        self.task = None
        if self.conn.state is OPEN:
            self.conn.close()

    def _ended(self, tunnel: Tunnel, sent: int) -> None:
        duration = perf_counter() - self._start
        self.rt.count_tcp(tunnel.received, sent, duration)
        self.rt.access_tcp(tunnel, tunnel.received, sent, duration, tunnel.upstream_key,
                           "relayed")
