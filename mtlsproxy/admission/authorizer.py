"""The external authorizer hook (``routes[].authorizer``): the analogue of a gateway's
authorizer function.

Contract: a POST of a JSON document describing the client certificate and the request; a
2xx answer ``{"allow": true|false, "ttl": seconds, "headers": {...}}`` decides, and the
returned headers go upstream. A decision is cached for ``ttl`` (capped by ``max_ttl``) per
(leaf fingerprint, route, truststore generation, method, path without the query): one
request's answer must not admit another (a gateway caches a policy evaluated per request
for the same reason). ``"scope": "route"`` widens it to every request of the client on the
route; ``"allow": [statements]`` is a policy, cached per route and evaluated per request.
A route-scoped entry is looked up first, then the request's; concurrent identical misses
share one call. Timeouts, refused connections, non-2xx answers and bad or malformed
answers are failures, handled by ``failure_mode``: ``closed`` (default) refuses, ``open``
admits without extra headers.

``format: apigateway`` speaks the AWS API Gateway REQUEST authorizer's event and policy
answer instead (admission/apigateway.py): the policy is cached per route for the
configured ``ttl`` and evaluated per request, as a ``Policy`` with deny statements.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from mtlsproxy.admission import apigateway
from mtlsproxy.admission.answers import HEADER_TOKEN, loads_answer
from mtlsproxy.config.model import AuthorizerConfig
from mtlsproxy.errors import ProtocolError
from mtlsproxy.http.client import post
from mtlsproxy.http.normalize import routing_view, under_prefix
from mtlsproxy.http.parser import Request
from mtlsproxy.identity.headers import fold, is_identity_header, safe_value
from mtlsproxy.identity.peer import ClientIdentity
from mtlsproxy.runtime.coalesce import CoalescingCache

log = logging.getLogger("mtlsproxy")
# Headers an authorizer may never set upstream: framing, routing and identity stay ours.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "te",
                       "upgrade", "keep-alive", "trailer", "x-forwarded-for",
                       "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip",
                       "true-client-ip", "x-client-ip", "x-original-url", "x-rewrite-url",
                       "x-http-method-override"})


@dataclass(frozen=True)
class Decision:
    allow: bool
    headers: tuple[tuple[bytes, bytes], ...]
    result: str  # allow, deny, timeout, error (the metric label)




def forwarded_headers(req: Request, forward_headers: tuple[str, ...]) -> dict[str, str]:
    """The request headers an authorizer is given (``forward_headers``), joined by name."""
    wanted = {h.lower().encode() for h in forward_headers}
    headers: dict[str, str] = {}
    for name, value in req.headers:
        # A client's identity headers (any spelling) are forgeries: the document carries
        # the certificate itself.
        if name in wanted and b"_" not in name and not is_identity_header(name):
            key = name.decode("latin-1")
            headers[key] = (headers[key] + ", " if key in headers else "") + \
                value.decode("latin-1")
    return headers


def request_document(identity: ClientIdentity, req: Request, route: str, listener: str,
                     forward_headers: tuple[str, ...]) -> dict[str, Any]:
    headers = forwarded_headers(req, forward_headers)
    host = next((v for n, v in req.headers if n == b"host"), b"").decode("latin-1")
    return {
        "listener": listener,
        "route": route,
        "client_certificate": {
            "pem": ssl.DER_cert_to_PEM_cert(identity.leaf_der),
            "subject": identity.subject,
            "issuer": identity.issuer,
            "serial": identity.serial_hex,
            "not_before": identity.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_after": identity.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "san_dns": list(identity.san_dns),
            "san_uri": list(identity.san_uri),
            "fingerprint_sha256": identity.fingerprint_sha256,
            "chain": [ssl.DER_cert_to_PEM_cert(d) for d in identity.chain_der],
        },
        "request": {"method": req.method.decode("latin-1"),
                    "path": req.target.decode("latin-1"), "host": host, "headers": headers},
    }


Headers = tuple[tuple[bytes, bytes], ...]
_STATEMENT_KEYS = frozenset({"methods", "path_prefix"})


@dataclass(frozen=True)
class Statement:
    """One statement of a policy answer: every key it gives must match; none matches all."""

    methods: frozenset[bytes] | None = None
    path_prefix: bytes | None = None

    def matches(self, method: bytes, path: bytes) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        prefix = self.path_prefix
        # As routes match (http/routing.py): on a path-segment boundary (/r/read admits
        # /r/read/x, never /r/readme), and on the path as the most lenient upstream reads
        # it (/r/read/x%2F..%2F..%2Fadmin is /r/admin to some).
        return prefix is None or under_prefix(routing_view(path), prefix.lower())


class Matcher(Protocol):
    def matches(self, method: bytes, path: bytes) -> bool: ...


@dataclass(frozen=True)
class Policy:
    """An answer that decides later requests too: any statement matching admits, unless a
    deny statement matches (the gateway's format: an explicit Deny wins, as in IAM)."""

    statements: tuple[Matcher, ...]
    headers: Headers
    denies: tuple[Matcher, ...] = ()

    def decide(self, method: bytes, path: bytes) -> Decision:
        if any(d.matches(method, path) for d in self.denies):
            return Decision(False, (), "deny")
        if any(s.matches(method, path) for s in self.statements):
            return Decision(True, self.headers, "allow")
        return Decision(False, (), "deny")


def decision_for(entry: Decision | Policy, method: bytes, path: bytes) -> Decision:
    """What a cached (or just received) answer says about one request."""
    return entry.decide(method, path) if isinstance(entry, Policy) else entry


@dataclass(frozen=True)
class Answer:
    entry: Decision | Policy
    ttl: float
    route_scoped: bool  # cached for every request of the client on the route


def parse_statement(raw: Any, where: str) -> Statement:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a statement must be an object")
    unknown = sorted(str(k) for k in raw if k not in _STATEMENT_KEYS)
    if unknown:
        # An unknown key could be a condition we would silently drop: refuse the policy.
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    methods: frozenset[bytes] | None = None
    if "methods" in raw:
        names = raw["methods"]
        if not isinstance(names, list) or not all(
                isinstance(m, str) and HEADER_TOKEN.match(m) for m in names):
            raise ValueError(f"{where}.methods: must be a list of method names")
        # Compared exactly: methods are case-sensitive (RFC 9110 section 9.1).
        methods = frozenset(m.encode() for m in names)
    prefix: bytes | None = None
    if "path_prefix" in raw:
        text = raw["path_prefix"]
        if not isinstance(text, str) or not text.startswith("/"):
            raise ValueError(f"{where}.path_prefix: must be a path starting with /")
        try:
            # Trailing slashes dropped as for routes' path_prefix; latin-1 as the target
            # arrives (and as the request document's path was decoded).
            prefix = (text.rstrip("/") or "/").encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{where}.path_prefix: not a latin-1 path") from None
    return Statement(methods, prefix)


def parse_answer(status: int, body: bytes) -> Answer:
    """The authorizer's answer; ValueError when malformed."""
    if not 200 <= status < 300:
        raise ValueError(f"authorizer answered {status}")
    doc = loads_answer(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("allow"), bool | list):
        raise ValueError('the answer needs "allow": true|false or a list of statements')
    ttl = doc.get("ttl", 0)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or ttl < 0:
        raise ValueError('"ttl" must be a number of seconds')
    scope = doc.get("scope", "request")
    if scope not in ("request", "route"):
        raise ValueError('"scope" must be "request" or "route"')
    headers: list[tuple[bytes, bytes]] = []
    raw_headers = doc.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise ValueError('"headers" must be an object')
    for name, value in raw_headers.items():
        if not isinstance(name, str) or not HEADER_TOKEN.match(name) or not isinstance(value, str):
            raise ValueError(f"invalid header {name!r}")
        lname = name.lower()
        # Folded (identity.headers.fold): "X_Forwarded_For" is X-Forwarded-For to a backend.
        if fold(lname.encode()).decode() in _RESERVED or is_identity_header(lname.encode()):
            continue  # never let the authorizer forge framing or certificate headers
        headers.append((name.encode(), safe_value(value)))
    allow = doc["allow"]
    if isinstance(allow, list):
        if "scope" in doc and scope != "route":
            raise ValueError('a policy decides the whole route: "scope" must be "route"')
        statements = tuple(parse_statement(raw, f"allow[{i}]") for i, raw in enumerate(allow))
        return Answer(Policy(statements, tuple(headers)), float(ttl), True)
    decision = Decision(allow, tuple(headers) if allow else (), "allow" if allow else "deny")
    return Answer(decision, float(ttl), scope == "route")


# (leaf fingerprint, route (its RouteConfig), truststore generation) for route-scoped
# entries; with (method, path, host, forwarded headers) appended for request-scoped ones.
_Key = (tuple[str, Hashable, int]
        | tuple[str, Hashable, int, bytes, bytes, bytes, tuple[tuple[str, str], ...]])


class AuthorizerClient:
    """Calls, caches and coalesces authorizer decisions for one listener."""

    def __init__(self, count: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.cache: CoalescingCache[_Key, Decision | Policy] = CoalescingCache(clock)

    def __repr__(self) -> str:
        return f"<AuthorizerClient {self.cache!r}>"

    async def decide(self, config: AuthorizerConfig, identity: ClientIdentity, req: Request,
                     route: str, listener: str, generation: int,
                     route_id: Hashable = None) -> Decision:
        """``route``: the route's name (the document's); ``route_id``: the route itself
        (its RouteConfig), which keys the cache: two routes may share a name ("api.test/"
        for a host route and a domain's catch-all), and a reload that changes a route's
        authorizer makes a new RouteConfig, so no answer of the old one is used again."""
        method = req.method
        # The query is not part of the key: the same resource with other parameters is
        # the same request to authorize (docs/configuration.md: the cache key).
        path = req.target.partition(b"?")[0]
        route_key = (identity.fingerprint_sha256, route if route_id is None else route_id,
                     generation)
        held = self.cache.peek(route_key)
        if held is not None:
            return decision_for(held, method, path)

        async def call() -> tuple[Decision | Policy, float]:
            answer = await self._call(config, identity, req, route, listener)
            ttl = min(answer.ttl, config.max_ttl)
            if answer.route_scoped:
                self.cache.put(route_key, answer.entry, ttl)
                return answer.entry, 0.0  # coalesced waiters share it; nothing per request
            return answer.entry, ttl
        # Everything else the document shows the authorizer is in the key too: the host
        # and the forwarded headers (an answer about X-Tenant: acme is not one about
        # X-Tenant: evil). The query is not.
        forwarded = tuple(sorted(forwarded_headers(req, config.forward_headers).items())) \
            if config.forward_headers else ()
        entry = await self.cache.get((*route_key, method, path, req.host.lower(), forwarded),
                                     call)
        return decision_for(entry, method, path)

    async def _call(self, config: AuthorizerConfig, identity: ClientIdentity, req: Request,
                    route: str, listener: str) -> Answer:
        gateway = config.format == "apigateway"
        if gateway:
            body = json.dumps(apigateway.request_event(
                identity, req, config.arn_prefix, forwarded_headers(req, config.forward_headers),
                ssl.DER_cert_to_PEM_cert(identity.leaf_der)))
        else:
            body = json.dumps(request_document(identity, req, route, listener,
                                               config.forward_headers))
        try:
            status, raw = await post(config.url, body.encode(), config.timeout)
            if gateway:
                # Always a policy for the whole route, cached for the configured ttl (the
                # gateway's authorizerResultTtlInSeconds; the answer carries none).
                gp = apigateway.parse_policy(status, raw, config.arn_prefix)
                answer = Answer(Policy((gp.allow,), gp.headers, (gp.deny,)), config.ttl, True)
            else:
                answer = parse_answer(status, raw)
        except TimeoutError:
            return Answer(self._failure(config, route, "timeout"), 0.0, False)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            log.warning("authorizer for route %s failed: %s", route, exc)
            return Answer(self._failure(config, route, "error"), 0.0, False)
        except (OSError, ProtocolError):
            return Answer(self._failure(config, route, "error"), 0.0, False)
        # A call's result is what it said about the request that made it.
        self.count(route, decision_for(answer.entry, req.method,
                                       req.target.partition(b"?")[0]).result)
        return answer

    def _failure(self, config: AuthorizerConfig, route: str, result: str) -> Decision:
        self.count(route, result)
        return Decision(config.failure_mode == "open", (), result)
