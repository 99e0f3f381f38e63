"""Opening a connection to an upstream, whatever its address: TCP (``http://``), TLS over
TCP (``https://``, tls/upstream.py) or a unix socket (``unix:/path``). The one place the
proxy connects from, so every pool, HTTP/2 and tunnel alike, maps the same failures to
the same ``UpstreamError`` kinds: ``connect_timeout`` (504), ``connect_refused`` and
``tls`` (502)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar, cast

from mtlsproxy.config import Upstream
from mtlsproxy.errors import UpstreamError
from mtlsproxy.tls.upstream import TLSUpstream, UpstreamTLSContexts, UpstreamTLSError

P = TypeVar("P", bound=asyncio.Protocol)


async def connect(upstream: Upstream, factory: Callable[[], P], timeout: float,
                  contexts: UpstreamTLSContexts) -> tuple[asyncio.Transport, P]:
    """(transport, protocol), the protocol made by ``factory`` once the connection (and
    its TLS handshake) is up; raises UpstreamError."""
    loop = asyncio.get_running_loop()
    key = upstream.key
    tls_layer: TLSUpstream | None = None
    try:
        async with asyncio.timeout(timeout):
            if upstream.unix_path is not None:
                transport, proto = await loop.create_unix_connection(factory,
                                                                     upstream.unix_path)
                return transport, proto
            if upstream.tls is None:
                transport, proto = await loop.create_connection(factory, upstream.host,
                                                                upstream.port)
                return transport, proto
            tls = upstream.tls
            alpn = "h2" if upstream.protocol == "h2" else "http/1.1"
            entry = contexts.entry(tls, alpn, upstream.pool_key)
            done: asyncio.Future[asyncio.Protocol] = loop.create_future()
            layer = TLSUpstream(entry, tls.server_name or upstream.host, factory, alpn, done)
            tls_layer = layer
            await loop.create_connection(lambda: layer, upstream.host, upstream.port)
            return layer, cast(P, await done)
    except TimeoutError:
        if tls_layer is not None:
            tls_layer.abort()
        raise UpstreamError(f"connect to {key} timed out", "connect_timeout", 504) from None
    except UpstreamTLSError as exc:
        raise UpstreamError(f"TLS to {key}: {exc}", "tls", 502) from None
    except OSError as exc:
        raise UpstreamError(f"connect to {key} failed: {exc.strerror or exc}",
                            "connect_refused", 502) from None
    except BaseException:
        if tls_layer is not None:
            tls_layer.abort()
        raise
