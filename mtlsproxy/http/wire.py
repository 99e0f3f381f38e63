"""Serialising the messages the proxy sends; pure.

The proxy never copies a client's framing bytes: it writes every head itself from parsed
events, so what reaches the upstream is always one unambiguous message.
"""

from __future__ import annotations

import json
import os
import re

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.checks import BAD_VALUE, TOKEN
from mtlsproxy.http.events import Request, Response
from mtlsproxy.http.header_rules import (
    DEFAULT_RULES,
    DROP,
    EXPECT,
    FORWARDED,
    HOP_BY_HOP,
    HOST,
    XFF,
    HeaderRules,
    forwarded_element,
    valid_forwarded,
)
from mtlsproxy.http.speedups import kept_lines, upstream_head
from mtlsproxy.identity.headers import fold

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


# A header line from its (name, value) pair in one C call: ``name + b": " + value`` makes
# an intermediate object and takes each operand's buffer twice, on every line of every
# proxied head.
_FIELD_JOIN = b": ".join
_SPACE_JOIN = b" ".join

# "HTTP/1.1 200 " and friends, built once (a status line starts every response).
_STATUS_PREFIX = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}

_NO_NAMES: frozenset[bytes] = frozenset()


def replaced_names(extra: tuple[tuple[bytes, bytes], ...],
                   strip: frozenset[bytes] = _NO_NAMES) -> frozenset[bytes]:
    """``upstream_request_head``'s ``replaced``: the folded names of the headers admission
    adds (the authorizer's, a token's claims), and ``strip``, names only the proxy may
    set on the route. A client's headers of these names are dropped, as Envoy's
    ext_authz replaces them: a client must not pre-send X-Tenant beside them."""
    if not extra:
        return strip
    return frozenset(fold(name) for name, _ in extra) | strip


def upstream_request_head(req: Request, target: bytes, client_ip: str,
                          cert_block: bytes, rules: HeaderRules = DEFAULT_RULES,
                          replaced: frozenset[bytes] = _NO_NAMES) -> bytes:
    """The request head sent upstream: hop-by-hop, identity, underscore and the
    operator's headers removed (``rules``: the listener's, see http/header_rules.py),
    X-Forwarded-* set, the certificate headers added (``cert_block``: already rendered,
    see ``identity.headers.header_block``), framing rewritten. ``replaced``: folded names
    that ``cert_block`` sets (the authorizer's headers), so a client's are dropped.

    A request without an X-Request-Id gets one, forwarded and kept in ``req.request_id``
    for the access log: 32 hex digits of randomness, nginx's ``$request_id`` (Envoy
    generates one too, a UUID), at the end of the head."""
    head, request_id_kept = _upstream_head(req, target, client_ip, cert_block, rules,
                                           replaced)
    if request_id_kept:
        return head
    request_id = os.urandom(16).hex().encode()
    req.request_id = request_id
    return b"".join((head[:-2], b"x-request-id: ", request_id, b"\r\n\r\n"))


def _upstream_head(req: Request, target: bytes, client_ip: str, cert_block: bytes,
                   rules: HeaderRules, replaced: frozenset[bytes]) -> tuple[bytes, bool]:
    """The head, and whether it kept the client's X-Request-Id. (Told by whoever wrote the
    lines: a search of the whole head for one costs as much as writing it.)"""
    named = req.connection  # RFC 9110 section 7.6.1: the options name headers to drop
    if named and named <= HOP_BY_HOP:
        named = _NO_NAMES  # usually so ("keep-alive"): dropped as hop-by-hop anyway
    if req.chunked:
        framing = b"transfer-encoding: chunked\r\n"
    elif req.content_length is not None:
        framing = b"content-length: %d\r\n" % req.content_length
    else:
        framing = b""
    head = None
    request_id_kept = False
    if upstream_head is not None and not named and not replaced:
        # The loop below in one compiled call (http/_speedups.pyx), when every header's
        # action is known, none is a counted drop and no Forwarded header came; None
        # otherwise, and the loop runs.
        made_here = upstream_head(req.method, target, req.headers, rules.plain,
                                  rules.actions, req.expect_continue, client_ip.encode(),
                                  cert_block, framing)
        if made_here is not None:
            head, request_id_kept = made_here
    if head is None:
        lines = [_SPACE_JOIN((req.method, target, b"HTTP/1.1"))]
        xff = b""
        forwarded = b""
        host = b""
        plain = rules.plain
        for header in req.headers:
            name = header[0]
            if named and name in named and name != b"host":
                # RFC 9110 section 7.6.1: the client made it hop-by-hop. Never Host: the
                # upstream must see the host that was routed, not a default in its place.
                continue
            if replaced and fold(name) in replaced:
                continue
            if name not in plain:
                action = rules.actions.get(name)
                if action is None:
                    action = rules.action(name)
                if action == DROP:
                    continue
                if action == XFF:
                    xff += header[1] + b", "
                    continue
                if action == FORWARDED:
                    forwarded += header[1] + b", "
                    continue
                if action == EXPECT:
                    if req.expect_continue:
                        continue  # the proxy answered 100 Continue itself (as nginx does)
                elif action == HOST:
                    host = header[1]
                elif action:  # one of the counted drops (header_rules.DROP_REASONS)
                    rules.count(action)
                    continue
            if name == b"x-request-id":
                request_id_kept = True
            lines.append(_FIELD_JOIN(header))
        if not host:
            host = b"localhost"
            lines.append(b"host: localhost")
        # nginx's $proxy_add_x_forwarded_for: keep the chain, append the peer we saw (with
        # forwarded_headers: replace, xff is empty: the client's chain was dropped).
        lines.append(b"x-forwarded-for: " + xff + client_ip.encode())
        if forwarded:
            # RFC 7239 section 4: the proxy appends its element to the client's list; only
            # a list that parses is kept (header_rules.valid_forwarded).
            mine = forwarded_element(client_ip, host)
            chain = forwarded[:-2]
            lines.append(b"forwarded: " + (chain + b", " + mine if valid_forwarded(chain)
                                           else mine))
        lines.append(b"x-forwarded-proto: https")
        lines.append(b"x-forwarded-host: " + host)
        lines.append(b"")
        head = b"".join((b"\r\n".join(lines), cert_block, framing, b"\r\n"))
    return head, request_id_kept


_CONTENT_LENGTH = frozenset({b"content-length"})


def client_response_head(req: Request, resp: Response, draining: bool
                         ) -> tuple[bytes, bool, bool]:
    """(response head for the client, re-chunk the body, keep the connection): one framing
    decision for the fast and the general path, and the head that states it.

    HTTP/1.1 clients get unframed (chunked or close-delimited) bodies re-chunked; HTTP/1.0
    clients cannot read chunked, so their body ends when the connection does. An HTTP/1.0
    client keeps the connection only when told so (RFC 9112 section 9.3).
    """
    head_request = req.method == b"HEAD"
    http10_client = req.http_version == b"1.0"
    bodyless = head_request or resp.status in (204, 304)
    unframed = not bodyless and (resp.chunked or resp.close_delimited)
    chunked = unframed and not http10_client
    keep_alive = req.keep_alive and not draining and not (unframed and http10_client)
    reason = resp.reason or REASONS.get(resp.status, "").encode()
    status_line = (_STATUS_PREFIX.get(resp.status) or b"HTTP/1.1 %d " % resp.status) + reason
    # One set for every name dropped, so each header costs one set test: usually the
    # hop-by-hop names themselves (an upstream's "Connection: keep-alive" adds nothing).
    drop = HOP_BY_HOP
    if resp.connection and not resp.connection <= HOP_BY_HOP:
        drop = drop | resp.connection
    if chunked or resp.chunked:
        drop = drop | _CONTENT_LENGTH
    # The kept lines in one compiled call (http/_speedups.pyx) when it is built.
    block = kept_lines(resp.headers, drop) if kept_lines is not None else None
    if block is None:
        lines = [_FIELD_JOIN(header) for header in resp.headers if header[0] not in drop]
        lines.append(b"")
        block = b"\r\n".join(lines)
    return b"".join((status_line, b"\r\n", block,
                     b"transfer-encoding: chunked\r\n" if chunked else b"",
                     b"connection: close\r\n" if not keep_alive
                     else b"connection: keep-alive\r\n" if http10_client else b"",
                     b"\r\n")), chunked, keep_alive


def h2_response_headers(resp: Response) -> list[tuple[bytes, bytes]]:
    """An upstream's HTTP/1.1 response head as an HTTP/2 header list: ``:status`` first,
    names lower-case, and no connection-specific field (RFC 9113 section 8.2.2: those
    of ``HOP_BY_HOP``, and those the upstream's Connection names); a chunked body's
    length is the DATA frames'."""
    drop = HOP_BY_HOP
    if resp.connection and not resp.connection <= HOP_BY_HOP:
        drop = drop | resp.connection
    if resp.chunked:
        drop = drop | _CONTENT_LENGTH
    headers = [(b":status", b"%d" % resp.status)]
    headers.extend((name.lower(), value) for name, value in resp.headers
                   if name.lower() not in drop)
    return headers


# gRPC status codes for the answers the proxy gives itself (grpc/doc/statuscodes.md and
# http-grpc-status-mapping.md): a gRPC client reads grpc-status, not the HTTP status.
GRPC_UNAUTHENTICATED = 16
_GRPC_CODES = {
    400: 13,  # INTERNAL (the mapping's answer to a 400)
    401: 16,  # UNAUTHENTICATED: the call's access token was refused
    403: 7,  # PERMISSION_DENIED: rules or the authorizer refused this call
    404: 12,  # UNIMPLEMENTED: no route, as for a method the server does not have
    408: 4,  # DEADLINE_EXCEEDED
    421: 14,  # UNAVAILABLE: to be retried on another connection
    431: 8,  # RESOURCE_EXHAUSTED
    501: 12,  # UNIMPLEMENTED
    502: 14,  # UNAVAILABLE: upstream unreachable
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED: upstream timeout, or grpc-timeout passed
}


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    """A gRPC request: content-type application/grpc, +proto, +json... (gRPC over HTTP/2)."""
    return any(name == b"content-type" and value.lower().startswith(b"application/grpc")
               for name, value in headers)


def grpc_error_response(status: int, reason: str, code: int | None = None
                        ) -> list[tuple[bytes, bytes]]:
    """The proxy's own answer to a gRPC request, in trailers-only form: HTTP 200 with
    grpc-status and grpc-message (the reason) in the one header block."""
    grpc = code if code is not None else _GRPC_CODES.get(status, 2)  # 2: UNKNOWN
    return [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % grpc), (b"grpc-message", reason.encode())]


_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6,
                       b"n": 1e-9}


def grpc_timeout(headers: list[tuple[bytes, bytes]]) -> float | None:
    """The grpc-timeout header in seconds ("100m": 100 ms; PROTOCOL-HTTP2.md: at most 8
    digits and a unit), or None when absent or malformed."""
    for name, value in headers:
        if name == b"grpc-timeout":
            unit = _GRPC_TIMEOUT_UNITS.get(value[-1:])
            digits = value[:-1]
            if unit is None or not digits.isdigit() or len(digits) > 8:
                return None
            return int(digits) * unit
    return None


def h2_trailers(trailers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """An upstream's trailer fields for an HTTP/2 client: no pseudo-field and no
    connection-specific field (RFC 9113 section 8.1)."""
    return [(name, value) for name, value in trailers
            if name[:1] != b":" and name.lower() not in HOP_BY_HOP]


def h2_error_response(status: int, reason: str, message: str | None = None,
                      headers: tuple[tuple[bytes, bytes], ...] = ()
                      ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """``error_response`` for an HTTP/2 stream: (header list, body)."""
    body = json.dumps({"message": message or REASONS.get(status, "Error"), "reason": reason},
                      separators=(",", ":")).encode()
    return [(b":status", b"%d" % status), (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)), *headers], body


def chunk(data: bytes | bytearray) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def frame(data: bytes | bytearray, chunked: bool) -> bytes:
    """A body piece as it goes out: chunked when the head said so (``client_response_head``
    decides it for responses, the request's own framing for request bodies)."""
    if chunked:
        return chunk(data)
    return data if type(data) is bytes else bytes(data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(status: int, reason: str, keep_alive: bool = False,
                   message: str | None = None,
                   headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A small JSON error, e.g. ``{"message":"Forbidden","reason":"expired"}``;
    ``headers``: more response headers (WWW-Authenticate), values already safe."""
    body = json.dumps({"message": message or REASONS.get(status, "Error"), "reason": reason},
                      separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n").encode()
    return b"".join((head, *(_FIELD_JOIN(h) + b"\r\n" for h in headers), b"\r\n", body))


# -- upgrades (proxy/tunnel.py) ---------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [\t !-~\x80-\xff]*)?")


def upgrade_request_head(head: bytes, protocol: bytes) -> bytes:
    """An upgrade request's head for the upstream: the head ``upstream_request_head``
    built (which drops Connection and Upgrade, hop-by-hop) with the one protocol the route
    allows asked for again."""
    return b"".join((head[:-2], b"connection: upgrade\r\nupgrade: ", protocol, b"\r\n\r\n"))


def switching_response(head: bytes, protocol: bytes) -> bytes | None:
    """The client's 101 head when the upstream's answer ``head`` (up to its blank line) is
    a 101 to ``protocol``; None when it is another status (an ordinary response). A 101
    that is malformed or switches to another protocol raises RemoteProtocolError (502)."""
    lines = head[:-4].split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise RemoteProtocolError("malformed status line", 502)
    if status.group(1) != b"101":
        return None
    out = [b"HTTP/1.1 101 Switching Protocols"]
    upgrade = b""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not TOKEN.match(name) or BAD_VALUE.search(value):
            raise RemoteProtocolError("malformed header in a 101 response", 502)
        name = name.lower()
        if name == b"upgrade":
            upgrade = value
        elif name not in HOP_BY_HOP:
            out.append(name + b": " + value)
    if upgrade.split(b"/", 1)[0].strip().lower() != protocol:
        raise RemoteProtocolError("a 101 to another protocol than the one asked for", 502)
    out += [b"connection: upgrade", b"upgrade: " + upgrade, b"", b""]
    return b"\r\n".join(out)
