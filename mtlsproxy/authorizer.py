"""The external authorizer hook (``routes[].authorizer``): the analogue of a gateway's
authorizer function.

Contract: a POST of a JSON document describing the client certificate and the request; a
2xx answer ``{"allow": true|false, "ttl": seconds, "headers": {...}}`` decides, and the
returned headers go upstream. Decisions are cached per (leaf fingerprint, route, truststore
generation) for ``ttl`` (capped by ``max_ttl``); concurrent identical misses share one
call. Timeouts, refused connections, non-2xx answers and bad JSON are failures, handled by
``failure_mode``: ``closed`` (default) refuses, ``open`` admits without extra headers.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtlsproxy.coalesce import CoalescingCache
from mtlsproxy.errors import ProtocolError
from mtlsproxy.http.client import post
from mtlsproxy.http.parser import Request
from mtlsproxy.identity.headers import is_spoofable, safe_value
from mtlsproxy.identity.peer import ClientIdentity

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers an authorizer may never set upstream: framing, routing and identity stay ours.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "te",
                       "upgrade", "keep-alive", "trailer", "x-forwarded-for",
                       "x-forwarded-proto", "x-forwarded-host"})


@dataclass(frozen=True)
class AuthorizerConfig:
    url: str
    timeout: float = 1.0
    failure_mode: str = "closed"  # closed | open
    forward_headers: tuple[str, ...] = ()
    max_ttl: float = 300.0


@dataclass(frozen=True)
class Decision:
    allow: bool
    headers: tuple[tuple[bytes, bytes], ...]
    result: str  # allow, deny, timeout, error (the metric label)


def _pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def request_document(identity: ClientIdentity, req: Request, route: str, listener: str,
                     forward_headers: tuple[str, ...]) -> dict[str, Any]:
    wanted = {h.lower().encode() for h in forward_headers}
    headers: dict[str, str] = {}
    for name, value in req.headers:
        if name in wanted:
            key = name.decode("latin-1")
            headers[key] = (headers[key] + ", " if key in headers else "") + \
                value.decode("latin-1")
    host = next((v for n, v in req.headers if n == b"host"), b"").decode("latin-1")
    return {
        "listener": listener,
        "route": route,
        "client_certificate": {
            "pem": _pem(identity.leaf_der),
            "subject": identity.subject,
            "issuer": identity.issuer,
            "serial": identity.serial_hex,
            "not_before": identity.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_after": identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "san_dns": list(identity.san_dns),
            "san_uri": list(identity.san_uri),
            "fingerprint_sha256": identity.fingerprint_sha256,
            "chain": [_pem(d) for d in identity.chain_der],
        },
        "request": {"method": req.method.decode("latin-1"),
                    "path": req.target.decode("latin-1"), "host": host, "headers": headers},
    }


Headers = tuple[tuple[bytes, bytes], ...]


def parse_answer(status: int, body: bytes) -> tuple[bool, float, Headers]:
    """(allow, ttl, headers) from the authorizer's answer; ValueError when malformed."""
    if not 200 <= status < 300:
        raise ValueError(f"authorizer answered {status}")
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("allow"), bool):
        raise ValueError('the answer needs "allow": true|false')
    ttl = doc.get("ttl", 0)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 0:
        raise ValueError('"ttl" must be a number of seconds')
    headers: list[tuple[bytes, bytes]] = []
    raw_headers = doc.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise ValueError('"headers" must be an object')
    for name, value in raw_headers.items():
        if not isinstance(name, str) or not _TOKEN.match(name) or not isinstance(value, str):
            raise ValueError(f"invalid header {name!r}")
        lname = name.lower()
        if lname in _RESERVED or is_spoofable(lname.encode()):
            continue  # never let the authorizer forge framing or certificate headers
        headers.append((name.encode(), safe_value(value)))
    return doc["allow"], float(ttl), tuple(headers)


class AuthorizerClient:
    """Calls, caches and coalesces authorizer decisions for one listener."""

    def __init__(self, count: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.cache: CoalescingCache[tuple[str, str, int], Decision] = CoalescingCache(clock)

    def __repr__(self) -> str:
        return f"<AuthorizerClient {self.cache!r}>"

    async def decide(self, config: AuthorizerConfig, identity: ClientIdentity, req: Request,
                     route: str, listener: str, generation: int) -> Decision:
        async def call() -> tuple[Decision, float]:
            decision, ttl = await self._call(config, identity, req, route, listener)
            return decision, min(ttl, config.max_ttl)
        return await self.cache.get((identity.fingerprint_sha256, route, generation), call)

    async def _call(self, config: AuthorizerConfig, identity: ClientIdentity, req: Request,
                    route: str, listener: str) -> tuple[Decision, float]:
        body = json.dumps(request_document(identity, req, route, listener,
                                           config.forward_headers)).encode()
        try:
            status, answer = await post(config.url, body, config.timeout)
            allow, ttl, headers = parse_answer(status, answer)
        except TimeoutError:
            return self._failure(config, route, "timeout"), 0.0
        except (OSError, ValueError, ProtocolError):
            return self._failure(config, route, "error"), 0.0
        result = "allow" if allow else "deny"
        self.count(route, result)
        return Decision(allow, headers if allow else (), result), ttl

    def _failure(self, config: AuthorizerConfig, route: str, result: str) -> Decision:
        self.count(route, result)
        return Decision(config.failure_mode == "open", (), result)
