"""The checks both parsers share, so that both accept exactly the same messages.

Framing decisions that could differ between parsers are taken here, once (``_framing``,
``_check_head``); the differential test holds the two parsers to that.

Rules of this module:
- A message with both Content-Length and Transfer-Encoding, a Transfer-Encoding other
  than ``chunked``, repeated differing Content-Length, obs-fold, bare LF, or control
  bytes in a header is refused (RFC 9112 sections 6.1, 6.3, 5.2; request smuggling).
- Errors are ``RemoteProtocolError`` with the status to answer (400, 431, 501, 505).
- Three module-level sets remember values already checked (``TOKENS_OF``, the good hosts,
  the good reason phrases): memos of pure functions, each bounded (256 or 1024) because
  clients and upstreams choose the values; they hold no per-connection state and need no
  owner.
"""

from __future__ import annotations

import re

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.events import Headers, Request, Response

# \Z, not $: "$" also matches before a final newline.
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSIONS = (b"1.1", b"1.0")
# llhttp refuses methods it does not know; h11 takes any token. The proxy takes the common
# ones that both parse (RFC 9110 section 9 plus PATCH and WebDAV).
METHODS = frozenset({
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"SEARCH", b"PURGE",
})


_NO_TOKENS: frozenset[bytes] = frozenset()
_NO_VALUES: tuple[bytes, ...] = ()
# The names _scan looks at; every other header costs one set lookup.
_FRAMING_NAMES = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding",
                            b"expect"})
# Connection header value -> its tokens, lower-case. Peers send a handful of distinct
# values ("keep-alive", "Keep-Alive", "close"); bounded, since clients choose them.
TOKENS_OF: dict[bytes, frozenset[bytes]] = {}


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    tokens = TOKENS_OF.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",")) - {b""}
        if len(TOKENS_OF) < 256:
            TOKENS_OF[value] = tokens
    return tokens


def _scan(headers: Headers) -> tuple[frozenset[bytes], tuple[bytes, ...], tuple[bytes, ...],
                                     int, bytes, bool]:
    """What framing, routing and connection handling need from a head, found in one
    pass: (Connection tokens, Transfer-Encoding values, Content-Length values, Host
    count, the (last) Host value, Expect: 100-continue)."""
    connection = _NO_TOKENS
    te = cl = _NO_VALUES
    hosts = 0
    host = b""
    expect = False
    for name, value in headers:
        if name not in _FRAMING_NAMES:
            continue
        if name == b"host":
            hosts += 1
            host = value
        elif name == b"content-length":
            cl += (value,)
        elif name == b"connection":
            tokens = TOKENS_OF.get(value)  # the memo inline: one call fewer per head
            connection = connection | (tokens if tokens is not None
                                       else _connection_tokens(value))
        elif name == b"transfer-encoding":
            te += (value,)
        else:  # expect
            expect = expect or value.strip().lower() == b"100-continue"
    return connection, te, cl, hosts, host, expect


def _framing(te: tuple[bytes, ...], cl: tuple[bytes, ...], is_request: bool
             ) -> tuple[bool, int | None]:
    """(chunked, content_length) per RFC 9112 section 6, strictly."""
    if te and cl:
        raise RemoteProtocolError("both Transfer-Encoding and Content-Length")
    if te:
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if codings != [b"chunked"]:
            raise RemoteProtocolError("unsupported Transfer-Encoding",
                                      501 if is_request else 502)
        return True, None
    if not cl:
        return False, None
    # Exactly one field of plain digits (values come stripped). RFC 9110 section 8.6 lets a
    # recipient take a list of identical values ("3, 3", or the field twice); llhttp
    # refuses both, as nginx does, so the seam does too.
    value = cl[0]
    if len(cl) != 1:
        raise RemoteProtocolError("more than one Content-Length")
    if not value.isdigit() or len(value) > 18:
        raise RemoteProtocolError("invalid Content-Length")
    return False, int(value)


def _check_head(headers: Headers) -> None:
    for name, value in headers:
        if not TOKEN.match(name):
            raise RemoteProtocolError(f"invalid header name {name[:40]!r}")
        if BAD_VALUE.search(value):
            raise RemoteProtocolError(f"invalid byte in header {name.decode()!r}")


def check_raw_head(raw: bytes) -> None:
    """Line-level rules that the two parsers do not agree on by themselves."""
    if b"\n" in raw.replace(b"\r\n", b""):
        raise RemoteProtocolError("bare LF line ending")
    for line in raw.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            raise RemoteProtocolError("obs-fold header continuation")
    if b"\x00" in raw:
        raise RemoteProtocolError("NUL byte in message head")
    # h11 merges identical Content-Length values ("3, 3", or the field twice) before
    # ``_framing`` can see them; llhttp refuses both.
    lower = raw.lower()
    # llhttp takes "chunked" followed by spaces, not by a tab; h11 strips both.
    start = lower.find(b"\r\ntransfer-encoding:")
    while start >= 0:
        end = lower.find(b"\r\n", start + 2)
        line = lower[start + 2:end if end >= 0 else len(lower)]
        if b"\t" in line[len(line.rstrip(b" \t")):]:
            raise RemoteProtocolError("tab after the Transfer-Encoding value")
        start = lower.find(b"\r\ntransfer-encoding:", start + 2)
    start = lower.find(b"\r\ncontent-length:")
    if start >= 0:
        if lower.find(b"\r\ncontent-length:", start + 2) >= 0:
            raise RemoteProtocolError("more than one Content-Length")
        end = lower.find(b"\r\n", start + 2)
        if b"," in lower[start:end if end >= 0 else len(lower)]:
            raise RemoteProtocolError("invalid Content-Length")


# Where h11 ends a head: a blank line, with or without its CR (h11's receive buffer).
_H11_BLANK_LINE = re.compile(rb"\n\r?\n")


class HeadBytes:
    """The bytes of a head that h11 has not parsed yet, held to llhttp's line rules
    (``check_raw_head``) before h11 may parse them: h11 tolerates obs-fold, bare LF and
    repeated identical Content-Length values where llhttp refuses them.

    A head is checked once it is complete (its blank line has come), which is before h11
    can parse it, and not on every feed: checking every partial head cost quadratic time
    for a head sent a byte per read (seconds of CPU on the event loop for a large head).
    A bad head that never completes meets the header-size or time limit instead.
    """

    __slots__ = ("_buf", "_searched", "_status")

    def __init__(self, status: int) -> None:
        self._buf = bytearray()
        self._searched = 0  # no blank line starts before this offset
        self._status = status  # to answer a refused head with: 400, or 502 for responses

    def __bool__(self) -> bool:
        return bool(self._buf)

    def reset(self, data: bytes = b"") -> None:
        """A new head starts (with ``data``, bytes already received: checked now, since
        h11 may parse them before the next feed)."""
        self._buf = bytearray()
        self._searched = 0
        if data:
            self.add(data)

    def add(self, data: bytes) -> None:
        """Append; RemoteProtocolError if that completed a head llhttp would refuse."""
        buf = self._buf
        buf += data
        found = _H11_BLANK_LINE.search(buf, self._searched)
        if found is None:
            self._searched = max(0, len(buf) - 2)  # a blank line may span two reads
            return
        self._searched = len(buf)
        try:
            # The blank line included: its LF, or the last header line's, may be bare.
            check_raw_head(bytes(buf[:found.end()]))
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc), self._status) from None


# RFC 3986 allows no byte over 0x7e in a URI (they are percent-encoded): llhttp and h11
# refuse them, and so must the parsers that come through here (HTTP/2's :path), or one
# protocol would forward what the others refuse.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")

# A Host value: a name, an IPv4 address or a bracketed IPv6 literal, and an optional port.
# nginx's rules (ngx_http_validate_host): no path separators, no spaces or control bytes,
# no empty name and no ".." - a Host that the upstream could read as a path or as two
# names, or would receive twice (an empty one is replaced), never leaves the proxy.
# Stricter than nginx: a name is RFC 3986's unreserved bytes only. Routes match hosts
# byte for byte, while URL parsers read "x@admin.example.com" (userinfo),
# "admin%2eexample.com" (an escape), "admin.example.com?" or "#" (a delimiter) and
# "a,admin.example.com" (a list, in X-Forwarded-Host) as admin.example.com: such a Host
# would miss a host route and reach the upstream as that host.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~]+)(?::[0-9]*)?")
# Host values seen valid: one set test per request instead of a regex. Bounded, since
# clients choose them.
_GOOD_HOSTS: set[bytes] = set()


def _check_host(host: bytes) -> None:
    if not _HOST.fullmatch(host) or b".." in host or host[:1] in (b".", b":"):
        raise RemoteProtocolError("invalid Host header")
    if len(_GOOD_HOSTS) < 1024:
        _GOOD_HOSTS.add(host)


def make_request(method: bytes, target: bytes, version: bytes, headers: Headers,
                  validated: bool = False) -> Request:
    """``validated``: the parser already refused bad header names and values, and
    control bytes and spaces in the target (llhttp, strict)."""
    connection, te, cl, hosts, host, expect = _scan(headers)
    if method == b"CONNECT":
        raise RemoteProtocolError("CONNECT is not supported", 501)
    upgrade = _upgrade(headers) if b"upgrade" in connection else b""
    if method not in METHODS:
        raise RemoteProtocolError("unknown method", 501)
    if version not in _VERSIONS:
        raise RemoteProtocolError("unsupported HTTP version", 505)
    if not validated:
        _check_head(headers)
    if not validated and _BAD_TARGET.search(target):
        raise RemoteProtocolError("invalid byte in request target")
    if target[:1] != b"/":
        if target.startswith((b"http://", b"https://")):
            target, host, headers = _to_origin_form(target, headers)
        elif target != b"*":
            raise RemoteProtocolError("invalid request target")
    if hosts > 1 or (version == b"1.1" and not hosts):
        raise RemoteProtocolError("a HTTP/1.1 request needs exactly one Host header")
    # The absolute form's authority counts as a Host even when none came (HTTP/1.0): it is
    # the Host forwarded, and routes and domains are chosen by it.
    if (hosts or host) and host not in _GOOD_HOSTS:
        _check_host(host)
    if te and version == b"1.0":
        # RFC 9112 section 6.1: its framing is faulty (nginx: 400).
        raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
    chunked, length = _framing(te, cl, True) if te or cl else (False, None)
    keep = b"close" not in connection and (version == b"1.1" or b"keep-alive" in connection)
    if upgrade:
        if chunked or length:
            # What follows the head would be body or tunnel, depending on the upstream's
            # answer: the upstream and the proxy could read it differently (smuggling).
            raise RemoteProtocolError("an upgrade request with a body")
        keep = False  # after it, the connection is the tunnel's or ends
    return Request(method, target, version, headers, keep, chunked, length, expect,
                   connection, host, upgrade=upgrade)


def _tokens_of(values: list[bytes]) -> frozenset[bytes]:
    """The Connection tokens of the values a compiled split found, as ``_scan`` unites
    them (it does so inline, one header at a time)."""
    connection = _NO_TOKENS
    for value in values:
        tokens = TOKENS_OF.get(value)
        connection = connection | (tokens if tokens is not None else _connection_tokens(value))
    return connection


def request_from_split(method: bytes, target: bytes, headers: Headers, host: bytes,
                       connection_values: list[bytes] | None, expect: bool) -> Request | None:
    """``make_request`` for a head the compiled split accepted (http/_speedups.pyx: HTTP/1.1,
    an origin-form target, exactly one Host, none of Content-Length, Transfer-Encoding,
    Upgrade), from what the split found while it read the headers: the same Request, or
    the same error, without another pass over them. None: a request the caller gives to
    llhttp's path instead (an unknown method, or one that closes the connection)."""
    if method not in METHODS:
        return None
    if host not in _GOOD_HOSTS:
        _check_host(host)  # make_request's first check that can fail on such a head
    connection = _NO_TOKENS if connection_values is None else _tokens_of(connection_values)
    if b"close" in connection:
        return None
    # No Upgrade header came, so no upgrade ("upgrade" in Connection alone is none).
    return Request(method, target, b"1.1", headers, True, False, None, expect, connection,
                   host)


def _upgrade(headers: Headers) -> bytes:
    """The first protocol an Upgrade header offers (RFC 9110 section 7.8: "name/version",
    in order of preference), lower-case and without its version; b"" when there is none.
    llhttp takes a request as an upgrade when Connection names "upgrade" and an Upgrade
    header is present; both parsers stop there."""
    for name, value in headers:
        if name == b"upgrade":
            first = value.split(b",", 1)[0].strip()
            protocol = first.split(b"/", 1)[0].strip().lower()
            if protocol:
                if not TOKEN.match(protocol):
                    raise RemoteProtocolError("invalid Upgrade header")
                return protocol
    return b""


# An absolute-form target's authority: a name of RFC 3986's unreserved bytes (not its
# sub-delims or escapes: see _HOST) and a port, or an IP literal. Neither userinfo ("@",
# RFC 9110 section 4.2.4) nor a fragment ("#") nor '"<>^`{|}'.
_AUTHORITY = re.compile(rb"(?:[A-Za-z0-9\-._~]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")


def _to_origin_form(target: bytes, headers: Headers) -> tuple[bytes, bytes, Headers]:
    """An absolute-form target (``http://host/path``), which RFC 9112 section 3.2.2 says a
    server MUST accept: (origin-form target, host, headers). The URI's authority replaces
    the Host header's value (a proxy MUST ignore the received one), as nginx and Envoy do;
    routing and forwarding then see an ordinary request."""
    rest = target.split(b"://", 1)[1]
    end = len(rest)
    for delimiter in (b"/", b"?"):
        i = rest.find(delimiter)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    # RFC 9110 section 4.2.4: no userinfo; RFC 3986: a fragment cannot follow the
    # authority here ("http://h#x": llhttp refuses it, h11 would take "h#x" as the host).
    # llhttp refuses the bytes _AUTHORITY refuses; h11 takes them.
    if not _AUTHORITY.fullmatch(authority):
        raise RemoteProtocolError("invalid authority in the request target")
    if not path.startswith(b"/"):
        path = b"/" + path  # "http://h?q" -> "/?q"
    replaced = [(n, authority) if n == b"host" else (n, v) for n, v in headers]
    if all(n != b"host" for n, _ in headers):  # HTTP/1.0 may come without one
        replaced.append((b"host", authority))
    return path, authority, replaced


# Reason phrases seen valid ("OK", "Not Found", ...): a set test instead of a regex.
_GOOD_REASONS: set[bytes] = set()


def check_status_line(version: bytes, reason: bytes) -> None:
    """What neither parser checks in a status line (a final or an interim response's): the
    version the proxy speaks upstream, and no control bytes in the reason phrase, which
    goes to the client (RFC 9112 section 4: HTAB, SP, VCHAR, obs-text)."""
    if version not in _VERSIONS:
        raise RemoteProtocolError("unsupported HTTP version in the response", 502)
    if reason not in _GOOD_REASONS:
        if BAD_VALUE.search(reason):
            raise RemoteProtocolError("invalid byte in the reason phrase", 502)
        if len(_GOOD_REASONS) < 256:  # bounded: upstreams choose them
            _GOOD_REASONS.add(reason)


def make_response(status: int, reason: bytes, version: bytes, headers: Headers,
                   method: bytes, validated: bool = False) -> Response:
    # RFC 9110 section 15: codes outside 100-599 are invalid (a client treats them as a
    # server error: 502 here). llhttp takes 000-999, h11 100-999; HTTP/0.9 and 2.0 status
    # lines both take. An HTTP/1.1 proxy talks HTTP/1.0 or 1.1 to its upstream.
    if not 100 <= status <= 599:
        raise RemoteProtocolError(f"invalid status code {status}", 502)
    check_status_line(version, reason)
    if not validated:
        _check_head(headers)
    connection, te, cl, _, _, _ = _scan(headers)
    no_body = method == b"HEAD" or status in (204, 304) or 100 <= status < 200
    chunked, length = _framing(te, cl, False) if te or cl else (False, None)
    if no_body:
        chunked = False
    close_delimited = not no_body and not chunked and length is None
    keep = (not close_delimited and b"close" not in connection
            and (version == b"1.1" or b"keep-alive" in connection))
    return Response(status, reason, version, headers, keep, chunked, length, close_delimited,
                    connection)



def response_from_split(status: int, reason: bytes, headers: Headers,
                        connection_values: list[bytes] | None, length: int
                        ) -> Response | None:
    """``make_response`` for a response the compiled split accepted (http/_speedups.pyx:
    HTTP/1.1, a status of 200-599 other than 204 and 304, one Content-Length, none of
    Transfer-Encoding, Upgrade, Proxy-Connection; not the answer to a HEAD), from what
    the split found while it read the headers: the same Response without another pass
    over them. None: one that closes the connection, which the caller gives to llhttp
    (which then stops between messages, as it would have)."""
    check_status_line(b"1.1", reason)
    connection = _NO_TOKENS if connection_values is None else _tokens_of(connection_values)
    if b"close" in connection:
        return None
    return Response(status, reason, b"1.1", headers, True, False, length, False, connection)


def head_size(start_line: bytes, headers: Headers) -> int:
    """A head's bytes, near enough for a limit (a ": " and CRLF per line)."""
    return len(start_line) + sum(len(n) + len(v) + 4 for n, v in headers)



def spoil(response: Response | None) -> None:
    """Bytes came after ``response`` was complete: a second response, a body where none
    may be, or garbage. They are dropped, and the connection is not used again: pooled,
    it would hand them to the next request as (the start of) its answer (nginx: "upstream
    sent more data than specified", and it closes the connection). Both parsers."""
    if response is not None:
        response.keep_alive = False
