"""Serialising the messages the proxy sends; pure.

The proxy never copies a client's framing bytes: it writes every head itself from parsed
events, so what reaches the upstream is always one unambiguous message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from mtlsproxy.http.parser import Request, Response
from mtlsproxy.identity.headers import DETAIL_PREFIX, SPOOFABLE

# RFC 9110 section 7.6.1 (Connection) and the de-facto hop-by-hop list proxies strip.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
_FORWARDED = frozenset({b"x-forwarded-proto", b"x-forwarded-host"})

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


def upstream_request_head(req: Request, target: bytes, client_ip: str,
                          cert_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The request head sent upstream: hop-by-hop and spoofable headers removed,
    X-Forwarded-* set, certificate headers added, framing rewritten."""
    named = req.connection
    out = [req.method, b" ", target, b" HTTP/1.1\r\n"]
    xff: list[bytes] = []
    host = b""
    for name, value in req.headers:
        # is_spoofable() inlined: this loop runs for every header of every request.
        if (name in HOP_BY_HOP or name in named or name in SPOOFABLE
                or name.startswith(DETAIL_PREFIX)):
            continue
        if name == b"x-forwarded-for":
            xff.append(value)
            continue
        if name in _FORWARDED or name == b"content-length":
            continue
        if name == b"expect" and req.expect_continue:
            continue  # the proxy answered 100 Continue itself (as nginx does)
        if name == b"host":
            host = value
        out += [name, b": ", value, b"\r\n"]
    if not host:
        host = b"localhost"
        out += [b"host: ", host, b"\r\n"]
    # nginx's $proxy_add_x_forwarded_for: keep the chain, append the peer we saw.
    xff.append(client_ip.encode())
    out += [b"x-forwarded-for: ", b", ".join(xff), b"\r\n",
            b"x-forwarded-proto: https\r\n",
            b"x-forwarded-host: ", host, b"\r\n"]
    for name, value in cert_headers:
        out += [name, b": ", value, b"\r\n"]
    if req.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    elif req.content_length is not None:
        out += [b"content-length: ", str(req.content_length).encode(), b"\r\n"]
    out.append(b"\r\n")
    return b"".join(out)


def client_response_head(resp: Response, chunked: bool, keep_alive: bool,
                         http10_client: bool = False) -> bytes:
    """The response head sent to the client; ``chunked`` re-frames a close-delimited body.

    An HTTP/1.0 client keeps the connection only when told so (RFC 9112 section 9.3).
    """
    named = resp.connection
    reason = resp.reason or REASONS.get(resp.status, "").encode()
    out = [b"HTTP/1.1 ", str(resp.status).encode(), b" ", reason, b"\r\n"]
    for name, value in resp.headers:
        if name in HOP_BY_HOP or name in named:
            continue
        if name == b"content-length" and (chunked or resp.chunked):
            continue
        out += [name, b": ", value, b"\r\n"]
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    elif http10_client:
        out.append(b"connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(status: int, reason: str, keep_alive: bool = False,
                   message: str | None = None) -> bytes:
    """A small JSON error, e.g. ``{"message":"Forbidden","reason":"expired"}``."""
    body = json.dumps({"message": message or REASONS.get(status, "Error"), "reason": reason},
                      separators=(",", ":")).encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + body
