"""Keep-alive connections per upstream.

Bookkeeping (which idle connection to hand out, which to drop) is plain code over deques;
only ``_connect`` does I/O. Idle connections are handed out last-in first-out, so the
warmest socket is reused and the coldest ages out (``idle_timeout``, below the 60 s
keep-alive timeout of nginx and most application servers, so we drop first).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import cast

from mtlsproxy.config import Upstream
from mtlsproxy.http.parser import response_parser
from mtlsproxy.proxy.connect import connect
from mtlsproxy.proxy.h2upstream import H2UpstreamPool, H2UpstreamStream
from mtlsproxy.proxy.upstream import ACTIVE, IDLE, Exchange, UpstreamConnection
from mtlsproxy.runtime.writes import WriteBatch
from mtlsproxy.tls.upstream import UpstreamTLSContexts


def _new_connection(key: str, parser_kind: str, writes: WriteBatch | None,
                    pool_key: str) -> asyncio.Protocol:
    # UpstreamConnection has asyncio.Protocol's methods, not that base (see its class):
    # typed as one for the loop (``_connect`` casts it back).
    return cast(asyncio.Protocol, UpstreamConnection(
        key, response_parser(parser_kind), writes, pool_key))


class UpstreamPool:
    __slots__ = ("parser_kind", "writes", "connect_timeout", "max_idle",
                 "idle_timeout", "clock", "_idle", "opened", "tls", "h2")

    def __init__(self, parser_kind: str = "httptools", connect_timeout: float = 5.0,
                 max_idle_per_upstream: int = 64, idle_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 writes: WriteBatch | None = None) -> None:
        self.parser_kind = parser_kind
        self.writes = writes  # given to every connection (runtime/writes.py)
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_upstream
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self.opened = 0
        # The TLS contexts and sessions of https:// upstreams (tls/upstream.py), shared by
        # the HTTP/1.1 and HTTP/2 pools and tunnels: one owner.
        self.tls = UpstreamTLSContexts(clock)
        self.h2 = H2UpstreamPool(self.tls, writes)  # upstream_protocol: h2

    def __repr__(self) -> str:
        idle = {k: len(v) for k, v in self._idle.items() if v}
        return f"<UpstreamPool opened={self.opened} idle={idle}>"

    def take_idle(self, key: str) -> UpstreamConnection | None:
        """Pop the newest usable idle connection; drop dead or stale ones on the way."""
        idle = self._idle.get(key)
        now = self.clock()
        while idle:
            conn = idle.pop()
            if conn.state is IDLE and now - conn.idle_since < self.idle_timeout:
                conn.state = ACTIVE  # IDLE -> ACTIVE, checked on the line above
                return conn
            conn.close()
        return None

    async def acquire(self, upstream: Upstream,
                      connect_timeout: float | None = None) -> tuple[Exchange, bool]:
        """(connection, reused): an HTTP/1.1 connection of its own, or a stream on a
        shared HTTP/2 connection (``upstream_protocol: h2``; never "reused": a failed
        stream is not retried)."""
        if upstream.protocol == "h2":
            return await self.h2.acquire(upstream, connect_timeout or self.connect_timeout), \
                False
        conn = self.take_idle(upstream.pool_key)
        if conn is not None:
            return conn, True
        return await self._connect(upstream, connect_timeout or self.connect_timeout), False

    async def _connect(self, upstream: Upstream, timeout: float) -> UpstreamConnection:
        # A function given its values, not a lambda: compiled, a lambda's scope would be
        # this coroutine's, which an https:// connection's TLS layer (keeping the factory)
        # would keep, with the connection, in a cycle of its own.
        _, proto = await connect(
            upstream, partial(_new_connection, upstream.key, self.parser_kind, self.writes,
                              upstream.pool_key),
            timeout, self.tls)
        conn = cast(UpstreamConnection, proto)
        self.opened += 1
        conn.set_state(ACTIVE)
        return conn

    def release(self, conn: Exchange, reusable: bool) -> None:
        if isinstance(conn, H2UpstreamStream):
            self.h2.release(conn, reusable)
            return
        assert isinstance(conn, UpstreamConnection)
        conn.requests += 1
        if not reusable or conn.state is not ACTIVE or conn.inbox.events:
            conn.close()
            return
        idle = self._idle.get(conn.pool_key)
        if idle is None:
            idle = self._idle[conn.pool_key] = deque()
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.state = IDLE  # ACTIVE -> IDLE: not ACTIVE was closed above
        conn.idle_since = self.clock()
        idle.append(conn)

    def close_all(self) -> None:
        self.h2.close_all()
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
