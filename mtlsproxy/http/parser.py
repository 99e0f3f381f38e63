"""The sans-IO HTTP/1.1 parsing seam: bytes in, events out, no sockets.

Two implementations sit behind it: httptools (llhttp), the fast default, and h11, the
strict reference. The proxy re-serialises every message itself (``http/wire.py``), so a
parser's job ends at events; framing decisions that could differ between parsers are
taken HERE, once, by ``_framing`` and ``_check_head``, so both parsers accept exactly the
same messages (the differential test holds them to that).

Rules of this module:
- Header names are delivered lower-case; values as received, without surrounding spaces.
- A message with both Content-Length and Transfer-Encoding, a Transfer-Encoding other
  than ``chunked``, repeated differing Content-Length, obs-fold, bare LF, or control
  bytes in a header is refused (RFC 9112 sections 6.1, 6.3, 5.2; request smuggling).
- Errors are ``RemoteProtocolError`` with the status to answer (400, 431, 501, 505).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import h11
import httptools

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.memo import Memo

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool = False
    connection: frozenset[bytes] = frozenset()  # Connection tokens, lower-case
    host: bytes = b""  # the Host header's value (there is at most one)
    # The request's exact bytes when it was a memo hit (see "the head memo"): a request
    # seen before, byte for byte, whose derived heads are worth memoising too (wire.py).
    # Empty otherwise, so that traffic that never repeats pays nothing more there.
    raw: bytes = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class Response:
    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    close_delimited: bool = False
    connection: frozenset[bytes] = frozenset()
    raw: bytes = b""  # the head's exact bytes, as Request.raw


@dataclass(slots=True)
class Informational:
    status: int


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    pass


END = EndOfMessage()
Event = Request | Response | Informational | Data | EndOfMessage


class RequestParser(Protocol):
    def feed(self, data: bytes) -> list[Event]: ...
    def close(self) -> None: ...


class ResponseParser(Protocol):
    def expect(self, method: bytes) -> None: ...
    def feed(self, data: bytes) -> list[Event]: ...
    def feed_eof(self) -> list[Event]: ...


# -- shared checks ----------------------------------------------------------------------

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
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
_TOKENS_OF: dict[bytes, frozenset[bytes]] = {}


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    tokens = _TOKENS_OF.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",")) - {b""}
        if len(_TOKENS_OF) < 256:
            _TOKENS_OF[value] = tokens
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
            tokens = _TOKENS_OF.get(value)  # the memo inline: one call fewer per head
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
        if not _TOKEN.match(name):
            raise RemoteProtocolError(f"invalid header name {name[:40]!r}")
        if _BAD_VALUE.search(value):
            raise RemoteProtocolError(f"invalid byte in header {name.decode()!r}")


def _check_raw_head(raw: bytes) -> None:
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


class _HeadBytes:
    """The bytes of a head that h11 has not parsed yet, held to llhttp's line rules
    (``_check_raw_head``) before h11 may parse them: h11 tolerates obs-fold, bare LF and
    repeated identical Content-Length values where llhttp refuses them.

    A head is checked once it is complete (its blank line has come), which is before h11
    can parse it, and not on every feed: checking every partial head cost quadratic time
    for a head sent a byte per read (30 KB: 9.6 s of CPU on the event loop, 0.14 s now).
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
            _check_raw_head(bytes(buf[:found.end()]))
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(str(exc), self._status) from None


_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")

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


def _make_request(method: bytes, target: bytes, version: bytes, headers: Headers,
                  validated: bool = False) -> Request:
    """``validated``: the parser already refused bad header names and values, and
    control bytes and spaces in the target (llhttp, strict)."""
    connection, te, cl, hosts, host, expect = _scan(headers)
    if method == b"CONNECT" or b"upgrade" in connection:
        raise RemoteProtocolError("protocol upgrade and CONNECT are not supported", 501)
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
    if hosts and host not in _GOOD_HOSTS:
        _check_host(host)
    if te and version == b"1.0":
        # RFC 9112 section 6.1: its framing is faulty (nginx: 400).
        raise RemoteProtocolError("Transfer-Encoding in an HTTP/1.0 request")
    chunked, length = _framing(te, cl, True) if te or cl else (False, None)
    keep = b"close" not in connection and (version == b"1.1" or b"keep-alive" in connection)
    return Request(method, target, version, headers, keep, chunked, length, expect,
                   connection, host)


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


def _check_status_line(version: bytes, reason: bytes) -> None:
    """What neither parser checks in a status line (a final or an interim response's): the
    version the proxy speaks upstream, and no control bytes in the reason phrase, which
    goes to the client (RFC 9112 section 4: HTAB, SP, VCHAR, obs-text)."""
    if version not in _VERSIONS:
        raise RemoteProtocolError("unsupported HTTP version in the response", 502)
    if reason not in _GOOD_REASONS:
        if _BAD_VALUE.search(reason):
            raise RemoteProtocolError("invalid byte in the reason phrase", 502)
        if len(_GOOD_REASONS) < 256:  # bounded: upstreams choose them
            _GOOD_REASONS.add(reason)


def _make_response(status: int, reason: bytes, version: bytes, headers: Headers,
                   method: bytes, validated: bool = False) -> Response:
    # RFC 9110 section 15: codes outside 100-599 are invalid (a client treats them as a
    # server error: 502 here). llhttp takes 000-999, h11 100-999; HTTP/0.9 and 2.0 status
    # lines both take. An HTTP/1.1 proxy talks HTTP/1.0 or 1.1 to its upstream.
    if not 100 <= status <= 599:
        raise RemoteProtocolError(f"invalid status code {status}", 502)
    _check_status_line(version, reason)
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


# -- httptools (llhttp) -------------------------------------------------------------------

def _head_size(start_line: bytes, headers: Headers) -> int:
    """A head's bytes, near enough for a limit (a ": " and CRLF per line)."""
    return len(start_line) + sum(len(n) + len(v) + 4 for n, v in headers)


class _LlhttpHead:
    """The llhttp callbacks that collect a head, shared by requests and responses.

    A head in progress is ``_url`` (the request target or the status reason) and
    ``_headers`` (None between heads). Plain attributes, no head object: these callbacks
    run ~20 times per proxied request.

    The header-size limit costs nothing per header: ``feed`` knows how many bytes a head
    can have taken so far (``_bound``: the bytes fed since before it began), and only a
    head that may be over the limit has its exact size summed. A head still unfinished
    after a feed is held to the bytes fed, so one endless line meets the limit too.
    """

    _url = b""
    _headers: Headers | None = None
    max_header_bytes: int
    _bound = 0  # bytes fed since before the current head began (an upper bound)
    # The same, carried from one feed to the next while a head is open (read only then).
    _raw_size = 0
    # Inside a chunk (between on_chunk_header and on_chunk_complete), and the bytes of
    # whole feeds spent there without a byte of data: the last chunk's trailer section.
    _in_chunk = False
    _trailer_size = 0
    # llhttp stands between messages (at the start, or after a message that keeps the
    # connection): where a head-memo hit may stand in for a parse (see "the head memo").
    _between = True

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._between = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # ~9 calls per request: one attribute load, no test (a try costs nothing in 3.11).
        try:
            self._headers.append(  # type: ignore[union-attr]
                (name.lower(), value.strip(b" \t")))
        except AttributeError:
            # No head open: a trailer field after the last chunk (RFC 9112 section 7.1.2).
            # Dropped, as h11's path and nginx do; the last chunk re-frames the body.
            if self._headers is not None:
                raise

    def on_chunk_header(self) -> None:
        self._in_chunk = True
        self._trailer_size = 0

    def on_chunk_complete(self) -> None:
        self._in_chunk = False

    def _trailers_too_large(self, fed: int) -> bool:
        """After a feed that began and ended inside one chunk and carried no data: it was
        all trailer section (data always reaches on_body). Held to the header limit, since
        httptools buffers a trailer line until it ends. (The feed in which the last chunk
        began is not counted: at most one read.)"""
        self._trailer_size += fed
        return self._trailer_size > self.max_header_bytes

    def _take_head(self, status: int) -> Headers:
        """The finished head's headers (RemoteProtocolError ``status`` when over the
        limit); no head is in progress afterwards. Its exact size is summed only when
        ``_bound`` says it could be over."""
        headers, self._headers = self._headers, None
        assert headers is not None
        if (self._bound > self.max_header_bytes
                and _head_size(self._url, headers) > self.max_header_bytes):
            raise RemoteProtocolError(
                f"{'request' if status == 431 else 'response'} header block too large",
                status)
        return headers

    def _open_head_too_large(self, fed: int, head_in_progress: bool) -> bool:
        """After a feed that left a head open: carry its bound; True when over."""
        self._raw_size = (self._raw_size if head_in_progress else 0) + fed
        return self._raw_size > self.max_header_bytes


# -- the head memo -------------------------------------------------------------------------
#
# Rules of the memo (both llhttp parsers):
# - A read that is exactly one whole message head (requests: a bodyless request; responses:
#   a head and its whole Content-Length body), arriving where llhttp stands between
#   messages, is looked up by its bytes. A hit stands for what llhttp and the checks of
#   this module made of the same bytes from the same state (with the same header limit):
#   the events are rebuilt from it and llhttp is not fed, so it stays between messages,
#   where it would be after parsing them.
# - Only what parsed cleanly is stored, after the full parse; anything else (a partial
#   head, a body, pipelined bytes, a HEAD answer, an error) takes the full parse.
# - Hits get fresh Request/Response objects and header lists, never the stored ones, with
#   ``raw`` set to the bytes (the key of the memos in wire.py; empty on a full parse).
# - A head is stored the second time it parses, and only the heads and sizes below are
#   kept (``memo.Memo``: a doorkeeper, bounded, emptied when full; a Date header makes a
#   new response head every second and the memo refills with current ones).
# - A parser whose last _MISS_STREAK look-ups all missed (a connection whose heads do not
#   repeat: a tracing id per request) skips the memo for the next _RESTING reads, then looks
#   again: such traffic pays a counter instead of a look-up, a doorkeeper check and the
#   tests around them (~300 bytecodes per request with both sides missing).
_MEMO_HEAD_BYTES = 2048
_MISS_STREAK = 8
_RESTING = 256
_RequestFields = tuple[bytes, bytes, bytes, Headers, bool, bool, "int | None", bool,
                       frozenset[bytes], bytes]
# max_header_bytes -> request bytes -> the Request's fields.
_REQUEST_MEMOS: dict[int, Memo[bytes, _RequestFields]] = {}
_ResponseFields = tuple[int, bytes, bytes, Headers, bool, int, frozenset[bytes]]
# max_header_bytes -> response head bytes -> the Response's fields (keep_alive True,
# Content-Length framed: status, reason, version, headers, keep, length, connection).
_RESPONSE_MEMOS: dict[int, Memo[bytes, _ResponseFields]] = {}


class HttptoolsRequestParser(_LlhttpHead):
    """llhttp behind the seam; the default fast path."""

    def __init__(self, max_header_bytes: int = 32768) -> None:
        self.max_header_bytes = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._memo = _REQUEST_MEMOS.setdefault(max_header_bytes, Memo())
        self._misses = 0  # look-ups in a row that missed (see _MISS_STREAK)
        self._keep = True  # the current request's keep_alive

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        headers = self._take_head(431)
        p = self._parser
        # llhttp (strict) already refused invalid header names and control bytes.
        req = _make_request(p.get_method(), self._url, p.get_http_version().encode(),
                            headers, validated=True)
        self._keep = req.keep_alive
        self._events.append(req)

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._events.append(END)
        # After a request that closes the connection llhttp refuses more bytes: not a
        # place where a memo hit may stand in for it (by our reading or llhttp's).
        self._between = self._keep and self._parser.should_keep_alive()

    def close(self) -> None:
        """The connection is gone: drop llhttp's parser. It holds this object's bound
        methods (a reference cycle), so without this the parser, and everything the
        connection hangs on it, waits for the cyclic GC instead of going at once.
        ``feed`` must not be called afterwards."""
        vars(self).pop("_parser", None)

    def feed(self, data: bytes) -> list[Event]:
        # "The head memo" above: a read where llhttp stands between messages may be one.
        memoisable = False
        misses = self._misses
        if misses >= _MISS_STREAK:
            self._misses = misses + 1 if misses < _MISS_STREAK + _RESTING - 1 else 0
        elif self._between and len(data) <= _MEMO_HEAD_BYTES:
            hit = self._memo.entries.get(data)
            if hit is not None:
                self._misses = 0
                m, t, v, h, keep, chunked, length, expect, connection, host = hit
                return [Request(m, t, v, list(h), keep, chunked, length, expect, connection,
                                host, data), END]
            self._misses = misses + 1
            memoisable = True
        # llhttp buffers a header line until it ends: count the bytes of a head in
        # progress here, so one endless header line meets the limit too.
        head_in_progress = self._headers is not None
        in_chunk = self._in_chunk
        self._bound = (self._raw_size if head_in_progress else 0) + len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: the proxy does not tunnel; refuse rather than forward bytes
            # that llhttp stopped parsing.
            raise RemoteProtocolError("protocol upgrade is not supported", 501) from None
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RemoteProtocolError):
                raise cause from None
            raise RemoteProtocolError(f"malformed request: {exc}") from None
        except httptools.HttpParserError as exc:
            raise RemoteProtocolError(f"malformed request: {exc}") from None
        if self._headers is not None and self._open_head_too_large(len(data),
                                                                   head_in_progress):
            raise RemoteProtocolError("request header block too large", 431)
        if in_chunk and self._in_chunk and not self._events and self._trailers_too_large(
                len(data)):
            raise RemoteProtocolError("request trailer section too large", 431)
        events, self._events = self._events, []
        if memoisable and self._between and len(events) == 2 and events[1] is END:
            req = events[0]
            if (type(req) is Request and req.content_length is None and not req.chunked
                    and self._memo.admit(data)):
                self._memo.store(data, (req.method, req.target, req.http_version,
                                        list(req.headers), req.keep_alive, False, None,
                                        req.expect_continue, req.connection, req.host))
        return events


def _spoil(response: Response | None) -> None:
    """Bytes came after ``response`` was complete: a second response, a body where none
    may be, or garbage. They are dropped, and the connection is not used again: pooled,
    it would hand them to the next request as (the start of) its answer (nginx: "upstream
    sent more data than specified", and it closes the connection). Both parsers."""
    if response is not None:
        response.keep_alive = False


class HttptoolsResponseParser(_LlhttpHead):
    def __init__(self, max_header_bytes: int = 65536) -> None:
        self.max_header_bytes = max_header_bytes
        self._method = b"GET"
        self._events: list[Event] = []
        self._parser = httptools.HttpResponseParser(self)
        self._stale_parser = False
        self._response: Response | None = None
        self._done = False
        self._first = True  # the next feed starts a response
        self._memo = _RESPONSE_MEMOS.setdefault(max_header_bytes, Memo())
        self._misses = 0  # look-ups in a row that missed (see _MISS_STREAK)

    def expect(self, method: bytes) -> None:
        """Ready for the response to a ``method`` request (one at a time, no pipelining)."""
        self._method = method
        self._first = True
        if self._done:
            if self._stale_parser:
                # After a HEAD answer llhttp still waits for a body: start afresh.
                self._parser = httptools.HttpResponseParser(self)
                self._stale_parser = False
                self._between = True
            self._headers = None
            self._response = None
            self._done = False

    def on_status(self, status: bytes) -> None:
        self._url += status

    def on_message_begin(self) -> None:
        if self._done:  # a second message in the read that ended the response
            _spoil(self._response)
        self._url = b""  # as _LlhttpHead's, without a second call per response
        self._headers = []
        self._between = False

    def on_headers_complete(self) -> None:
        if self._done:
            return
        headers = self._take_head(502)
        p = self._parser
        status = p.get_status_code()
        if 100 <= status < 200:
            _check_status_line(p.get_http_version().encode(), self._url)
            self._events.append(Informational(status))
            return
        self._response = _make_response(status, self._url, p.get_http_version().encode(),
                                        headers, self._method, validated=True)
        self._events.append(self._response)
        if self._method == b"HEAD":
            # llhttp cannot be told that this answers a HEAD: end the message here and use
            # a fresh parser for the next response.
            self._events.append(END)
            self._done = True
            self._stale_parser = True

    def on_body(self, body: bytes) -> None:
        if not self._done:
            self._events.append(Data(body))
        else:  # e.g. a body after the head that answers a HEAD
            _spoil(self._response)

    def on_message_complete(self) -> None:
        if self._response is not None and not self._done:
            self._events.append(END)
            self._done = True
            self._between = self._response.keep_alive and self._parser.should_keep_alive()

    def feed(self, data: bytes) -> list[Event]:
        # "The head memo" above: the first read of a response (not a HEAD answer) where
        # llhttp stands between messages may be a head seen before and its whole body.
        head = b""
        misses = self._misses
        if misses >= _MISS_STREAK:
            self._misses = misses + 1 if misses < _MISS_STREAK + _RESTING - 1 else 0
        elif self._first and self._between and self._method != b"HEAD":
            end = data.find(b"\r\n\r\n", 0, _MEMO_HEAD_BYTES) + 4
            self._misses = misses + 1
            if end > 4:
                head = data[:end]
                hit = self._memo.entries.get(head)
                if hit is not None and len(data) - end == hit[5]:
                    self._misses = 0
                    status, reason, version, headers, keep, length, connection = hit
                    self._first = False
                    self._done = True
                    resp = self._response = Response(status, reason, version, list(headers),
                                                     keep, False, length, False, connection,
                                                     head)
                    return [resp, Data(data[end:]), END] if length else [resp, END]
        events = self._feed(data)
        if head and self._between and 2 <= len(events) <= 3 and events[-1] is END:
            first = events[0]
            if (isinstance(first, Response) and first.keep_alive and not first.chunked
                    and first.content_length == len(data) - len(head)
                    and first.status not in (204, 304) and self._memo.admit(head)):
                self._memo.store(head, (first.status, first.reason, first.http_version,
                                        list(first.headers), True, first.content_length,
                                        first.connection))
        return events

    def _feed(self, data: bytes) -> list[Event]:
        if self._done:
            _spoil(self._response)
            return []
        if self._first:
            self._first = False
            if data[:1] in (b"\r", b"\n"):
                # llhttp skips empty lines before a status line; h11 refuses them, and RFC
                # 9112 section 2.2 forgives them only before a request line.
                raise RemoteProtocolError("empty line before the status line", 502)
        head_in_progress = self._headers is not None
        in_chunk = self._in_chunk
        self._bound = (self._raw_size if head_in_progress else 0) + len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RemoteProtocolError):
                raise RemoteProtocolError(str(cause), 502) from None
            raise RemoteProtocolError(f"malformed response: {exc}", 502) from None
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._done:
                raise RemoteProtocolError(f"malformed response: {exc}", 502) from None
            _spoil(self._response)  # garbage after the response
        if self._headers is not None and self._open_head_too_large(len(data),
                                                                   head_in_progress):
            raise RemoteProtocolError("response header block too large", 502)
        if in_chunk and self._in_chunk and not self._events and self._trailers_too_large(
                len(data)):
            raise RemoteProtocolError("response trailer section too large", 502)
        events, self._events = self._events, []
        return events

    def feed_eof(self) -> list[Event]:
        r = self._response
        if r is not None and not self._done and r.close_delimited:
            self._done = True
            return [END]
        if self._done:
            return []
        raise RemoteProtocolError("upstream closed the connection mid-response", 502)


# -- h11 ------------------------------------------------------------------------------

def _h11_headers(headers: h11._headers.Headers) -> Headers:
    return [(bytes(n), bytes(v)) for n, v in headers]


# A chunk-size line as llhttp (strict) takes it: hex digits, no spaces; then extensions,
# each ";" name ["=" value], the value token characters and then perhaps one quoted
# string (llhttp takes 'a"b"'), names and values possibly empty, no spaces,
# not ending in a bare ";" (RFC 9112 section 7.1.1 allows BWS around them; llhttp does not,
# so neither does the seam).
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
_T = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_CHUNK_EXT = re.compile(rb"(?:;" + _T + rb"*(?:=" + _T + rb"*(?:\"(?:[\t \x21\x23-\x5b\x5d-\x7e"
                        rb"\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\")?)?)*")


class _ChunkLines:
    """Checks the line endings of a chunked body, which h11 reads leniently (bare LF).

    Only framing lines are looked at (size lines, the CRLF after data, trailers); chunk
    data passes through uncounted. llhttp refuses a bare LF there, so h11 must too.
    """

    def __init__(self, status: int = 400) -> None:
        self._status = status  # to answer bad framing with: 400, or 502 for responses
        self._line = bytearray()
        self._remaining = 0
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer -> done

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self._state != "done":
            if self._state == "data":
                take = min(self._remaining, n - i)
                i += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "crlf"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > 4096:
                    raise RemoteProtocolError("chunk line too long", self._status)
                return
            line = bytes(self._line) + data[i:j + 1]
            self._line.clear()
            i = j + 1
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                raise RemoteProtocolError("bare LF in chunked framing", self._status)
            self._line_done(line[:-2])

    def _line_done(self, line: bytes) -> None:
        if self._state == "crlf":
            if line:
                raise RemoteProtocolError("chunk data longer than its size", self._status)
            self._state = "size"
        elif self._state == "size":
            size, semicolon, ext = line.partition(b";")
            if not _CHUNK_SIZE.fullmatch(size):
                raise RemoteProtocolError("invalid chunk size", self._status)
            if semicolon and (line.endswith(b";") or not _CHUNK_EXT.fullmatch(b";" + ext)):
                raise RemoteProtocolError("invalid chunk extension", self._status)
            self._remaining = int(size, 16)
            self._state = "data" if self._remaining else "trailer"
        elif self._state == "trailer":
            if not line:
                self._state = "done"
                return
            # A trailer field, held to the rules of a header field (llhttp's are the same).
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise RemoteProtocolError("invalid trailer field", self._status)


class H11RequestParser:
    """h11 behind the seam; the strict reference implementation."""

    def __init__(self, max_header_bytes: int = 32768) -> None:
        self.max_header_bytes = max_header_bytes
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._raw_head = _HeadBytes(400)
        self._in_body = False
        self._chunks: _ChunkLines | None = None
        self._keep_alive = False  # the current request's
        self._closing = False  # a request that closes the connection has ended

    def close(self) -> None:
        """Nothing to release: h11's connection holds no reference back to this object."""

    @staticmethod
    def _after_close(data: bytes) -> None:
        """Bytes after a request that closes the connection: llhttp skips empty lines and
        refuses anything else (the whole read), so the seam does on both parsers."""
        if data.strip(b"\r\n"):
            raise RemoteProtocolError("data after a request that closes the connection")

    def _finish_cycle(self) -> None:
        # h11 parses the next request only after a response was sent; the proxy writes
        # its own responses, so tell h11 a minimal one went out.
        c = self._conn
        if c.our_state is h11.SEND_RESPONSE:
            c.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            c.send(h11.EndOfMessage())
        data = bytes(c.trailing_data[0])
        if (c.our_state is h11.DONE and c.their_state is h11.DONE
                and not data.startswith((b"\r", b"\n"))):
            c.start_next_cycle()
        elif c.their_state is h11.DONE or (self._keep_alive
                                           and c.their_state is h11.MUST_CLOSE):
            # Two things llhttp does and h11 does not: keep a connection after an
            # HTTP/1.0 request with "Connection: keep-alive" (RFC 9112 section 9.3; ab -k
            # sends these), and skip CR and LF bytes before a request line (RFC 9112
            # section 2.2: "SHOULD ignore at least one empty line"). Either way the next
            # request goes to a fresh h11 connection, with the bytes after this one.
            self._conn = h11.Connection(h11.SERVER,
                                        max_incomplete_event_size=self.max_header_bytes)
            data = data.lstrip(b"\r\n")
            if data:  # (receive_data(b"") means EOF to h11)
                self._conn.receive_data(data)

    def feed(self, data: bytes) -> list[Event]:
        if self._closing:
            self._after_close(data)
            return []
        if not self._in_body:
            if not self._raw_head:  # before a request line: see _finish_cycle
                data = data.lstrip(b"\r\n")
                if not data:
                    return []
            self._raw_head.add(data)  # llhttp's line rules (see _HeadBytes)
        elif self._chunks is not None:
            self._chunks.feed(data)
        self._conn.receive_data(data)
        events: list[Event] = []
        while True:
            try:
                ev = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise RemoteProtocolError(f"malformed request: {exc}", status) from None
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                break
            if isinstance(ev, h11.Request):
                self._raw_head.reset()
                self._in_body = True
                headers = _h11_headers(ev.headers)
                # h11 bounds only an INCOMPLETE head; a complete one in one read can be larger.
                size = len(ev.target) + sum(len(n) + len(v) + 4 for n, v in headers)
                if size > self.max_header_bytes:
                    raise RemoteProtocolError("request header block too large", 431)
                request = _make_request(ev.method, ev.target, ev.http_version, headers)
                self._keep_alive = request.keep_alive
                events.append(request)
                if request.chunked:
                    self._chunks = _ChunkLines()
                    self._chunks.feed(self._conn.trailing_data[0])
            elif isinstance(ev, h11.Data):
                events.append(Data(bytes(ev.data)))
            elif isinstance(ev, h11.EndOfMessage):
                events.append(END)
                self._in_body = False
                self._chunks = None
                if not self._keep_alive:
                    self._closing = True
                    self._after_close(bytes(self._conn.trailing_data[0]))
                    break
                self._finish_cycle()
                # What h11 holds beyond this message starts the next head: checked now,
                # before the next turn of this loop can parse it (pipelining).
                self._raw_head.reset(bytes(self._conn.trailing_data[0]))
        return events


class H11ResponseParser:
    def __init__(self, max_header_bytes: int = 65536) -> None:
        self.max_header_bytes = max_header_bytes
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self._method = b"GET"
        self._raw_head = _HeadBytes(502)  # llhttp's line rules, as for requests
        self._in_body = False
        self._response: Response | None = None
        self._chunks: _ChunkLines | None = None  # llhttp's line rules for a chunked body
        self._ended = False  # the response is complete

    def expect(self, method: bytes) -> None:
        c = self._conn
        if c.our_state is h11.DONE and c.their_state is h11.DONE:
            c.start_next_cycle()
        self._method = method
        self._raw_head.reset()
        self._in_body = False
        self._response = None
        self._chunks = None
        self._ended = False
        # h11 frames a response by the request it answers: describe that request to it.
        c.send(h11.Request(method=method, target="/", headers=[("host", "upstream")]))
        c.send(h11.EndOfMessage())

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                ev = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise RemoteProtocolError(f"malformed response: {exc}", 502) from None
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return events
            if isinstance(ev, h11.InformationalResponse):
                _check_status_line(ev.http_version, bytes(ev.reason))
                events.append(Informational(ev.status_code))
                # The next head starts in what h11 holds: checked before it is parsed.
                self._raw_head.reset(bytes(self._conn.trailing_data[0]))
            elif isinstance(ev, h11.Response):
                self._raw_head.reset()
                self._in_body = True
                headers = _h11_headers(ev.headers)
                # h11 limits heads still incomplete only; a whole one in one read is held
                # to the limit here (as HttptoolsResponseParser does).
                if _head_size(bytes(ev.reason), headers) > self.max_header_bytes:
                    raise RemoteProtocolError("response header block too large", 502)
                try:
                    response = _make_response(ev.status_code, bytes(ev.reason),
                                              ev.http_version, headers, self._method)
                except RemoteProtocolError as exc:  # framing: the upstream's fault
                    raise RemoteProtocolError(str(exc), 502) from None
                self._response = response
                events.append(response)
                if response.chunked:
                    self._chunks = _ChunkLines(502)
                    self._chunks.feed(bytes(self._conn.trailing_data[0]))
            elif isinstance(ev, h11.Data):
                events.append(Data(bytes(ev.data)))
            elif isinstance(ev, h11.EndOfMessage):
                events.append(END)
                self._chunks = None
                self._ended = True
                if self._conn.trailing_data[0]:  # more bytes in the read that ended it
                    _spoil(self._response)
                return events  # whatever follows is not parsed (h11 would refuse it)

    def feed(self, data: bytes) -> list[Event]:
        if self._ended:  # bytes after the complete response (h11: DONE or MUST_CLOSE)
            _spoil(self._response)
            return []
        if not self._in_body:
            self._raw_head.add(data)
        elif self._chunks is not None:
            self._chunks.feed(data)
        self._conn.receive_data(data)
        return self._drain()

    def feed_eof(self) -> list[Event]:
        if self._ended:  # the upstream closed after a complete response: nothing to add
            return []
        self._conn.receive_data(b"")
        events = self._drain()
        if not any(e is END for e in events) and self._conn.their_state is not h11.DONE:
            raise RemoteProtocolError("upstream closed the connection mid-response", 502)
        return events


PARSERS = ("httptools", "h11")


def request_parser(kind: str, max_header_bytes: int) -> RequestParser:
    if kind == "h11":
        return H11RequestParser(max_header_bytes)
    return HttptoolsRequestParser(max_header_bytes)


def response_parser(kind: str) -> ResponseParser:
    if kind == "h11":
        return H11ResponseParser()
    return HttptoolsResponseParser()
