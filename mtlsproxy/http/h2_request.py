"""An HTTP/2 request's header list as the proxy's ``Request``; pure (no sockets).

Rules of this module:
- An HTTP/2 stream becomes exactly the request an HTTP/1.1 client would have sent, and
  then goes through ``checks.make_request``: the same Host, method, header-name and value
  checks, the same limits, the same refusals (CONNECT and upgrades: 501). Nothing about a
  request is decided here that HTTP/1.1 decides elsewhere.
- ``:authority`` is the Host (RFC 9113 section 8.3.1); a ``host`` field that differs from
  it makes the request malformed (400): routes, domains and rules must see one host.
- Cookie fields split across several lines are joined with "; " before they go to an
  HTTP/1.1 upstream (RFC 9113 section 8.2.3).
- A header list over ``limits.max_header_bytes`` (decoded, RFC 9113 section 6.5.2's
  size) is answered 431 on its stream, as HTTP/1.1 answers 431; the connection goes on.
  HPACK decoding itself stops at a hard ceiling above it (H2Session), where the only
  answer is GOAWAY (the decoder's state is lost, section 4.3).
- The body must add up to the Content-Length: here when HEADERS end the stream, in
  the session (``H2Session._pump``) when DATA does; h2 checks only DATA frames.
- h2 itself has already refused what RFC 9113 calls malformed (upper-case names,
  connection-specific fields, pseudo-fields out of place, a ``te`` other than
  "trailers"): it validates inbound headers.
"""

from __future__ import annotations

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.checks import make_request
from mtlsproxy.http.events import Request

Headers = list[tuple[bytes, bytes]]


def header_list_size(headers: Headers) -> int:
    """RFC 9113 section 6.5.2's size of a header list: each field's name and value
    (decoded) plus 32."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


def request_from_h2(headers: Headers, end_stream: bool,
                    max_header_bytes: int | None = None) -> Request:
    """The ``Request`` of a stream's HEADERS; raises RemoteProtocolError (its status hint
    is the answer: 400, 431 over ``max_header_bytes``, or 501 for CONNECT)."""
    if max_header_bytes is not None and header_list_size(headers) > max_header_bytes:
        raise RemoteProtocolError("request header block too large", 431)
    method = path = authority = None
    host: bytes | None = None
    cookies: list[bytes] = []
    regular: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":  # RFC 8441 extended CONNECT (WebSocket over h2)
                raise RemoteProtocolError("extended CONNECT is not supported", 501)
            elif name != b":scheme":
                raise RemoteProtocolError("unknown pseudo-header field")
        elif name == b"cookie":
            cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise RemoteProtocolError("more than one Host field")
            host = value
        else:
            regular.append((name, value))
    if method == b"CONNECT":
        raise RemoteProtocolError("CONNECT is not supported", 501)
    if method is None or path is None:
        raise RemoteProtocolError("a request needs :method and :path")
    if not path.startswith(b"/") and not (path == b"*" and method == b"OPTIONS"):
        # RFC 9113 section 8.3.1: the absolute-path (and query) of the target; an
        # absolute URI here would name a host of its own beside :authority.
        raise RemoteProtocolError(":path must be an absolute path")
    if authority is not None and host is not None and authority != host:
        raise RemoteProtocolError(":authority and Host differ")
    named = authority if authority is not None else host
    if not named:
        raise RemoteProtocolError("a request needs :authority or Host")
    if cookies:
        regular.append((b"cookie", b"; ".join(cookies)))
    req = make_request(method, path, b"1.1", [(b"host", named), *regular])
    if end_stream and req.content_length:
        # RFC 9113 section 8.1.1: a Content-Length that the DATA frames do not add up to
        # makes the request malformed. Forwarded, it would announce a body the upstream
        # then reads from the next request on its connection (smuggling).
        raise RemoteProtocolError("Content-Length with no body")
    if not end_stream and req.content_length is None:
        # A body of unknown length: chunked to an HTTP/1.1 upstream.
        req.chunked = True
    req.http_version = b"2"
    return req
