"""httptools (llhttp) behind the parsing seam: the fast default, with the head memo.
"""

from __future__ import annotations

import httptools

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.checks import (
    check_status_line,
    head_size,
    make_request,
    make_response,
    request_from_split,
    response_from_split,
    spoil,
)
from mtlsproxy.http.events import END, Data, Event, Headers, Informational, Request, Response
from mtlsproxy.http.memo import HeadMemos, Memo
from mtlsproxy.http.speedups import split_request_head, split_response_head


class _LlhttpHead:
    """The llhttp callbacks that collect a head, shared by requests and responses.

    A head in progress is ``_url`` (the request target or the status reason) and
    ``_headers`` (None between heads). Plain attributes, no head object: these callbacks
    run many times per proxied request.

    The header-size limit costs nothing per header: ``feed`` knows how many bytes a head
    can have taken so far (``_bound``: the bytes fed since before it began), and only a
    head that may be over the limit has its exact size summed. A head still unfinished
    after a feed is held to the bytes fed, so one endless line meets the limit too.
    """

    # Compiled too (mtlsproxy/compiled.py): the fields are the .pxd's.
    __slots__ = ("_url", "_headers", "max_header_bytes", "_bound", "_raw_size", "_in_chunk",
                 "_trailer_size", "_between", "__weakref__")

    def __init__(self, max_header_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self._url = b""
        self._headers: Headers | None = None
        self._bound = 0  # bytes fed since before the current head began (an upper bound)
        # The same, carried from one feed to the next while a head is open (read only then).
        self._raw_size = 0
        # Inside a chunk (between on_chunk_header and on_chunk_complete), and the bytes of
        # whole feeds spent there without a byte of data: the last chunk's trailer section.
        self._in_chunk = False
        self._trailer_size = 0
        # llhttp stands between messages (at the start, or after a message that keeps the
        # connection): where a head-memo hit may stand in for a parse (see "the head memo").
        self._between = True

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._between = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # Several calls per request: one attribute load, no test (a try is free in 3.11).
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
                and head_size(self._url, headers) > self.max_header_bytes):
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
# - A parser whose last MISS_STREAK look-ups all missed (a connection whose heads do not
#   repeat: a tracing id per request) skips the memo for the next RESTING reads, then looks
#   again: such traffic pays a counter instead of a look-up, a doorkeeper check and the
#   tests around them.
#
# The compiled split (http/_speedups.pyx, when built): where a memo look-up could stand
# in for llhttp, a read that is one whole head of the split's strict subset is split in
# one C call, which also finds what ``make_request`` scans the headers for, and checked
# by ``checks.request_from_split`` (make_request for that subset); a request after which
# llhttp would stop (Connection: close) takes llhttp's path, so llhttp is left between
# messages, as after a memo hit. The errors raised are the ones llhttp's path raises for
# the same bytes. Responses likewise (``checks.response_from_split``): a first read that is
# one whole response with a Content-Length body, not a HEAD answer, where the head memo
# could have stood in for llhttp. Without the module, llhttp
# parses everything (tests/unit/test_compiled_head.py holds the two to one behaviour).
MEMO_HEAD_BYTES = 2048
MISS_STREAK = 8
RESTING = 256
_RequestFields = tuple[bytes, bytes, bytes, Headers, bool, bool, "int | None", bool,
                       frozenset[bytes], bytes]
# The Response's fields (keep_alive True, Content-Length framed): status, reason, version,
# headers, keep, length, connection.
_ResponseFields = tuple[int, bytes, bytes, Headers, bool, int, frozenset[bytes]]


class HttptoolsRequestParser(_LlhttpHead):
    """llhttp behind the seam; the default fast path."""

    __slots__ = ("_parser", "_events", "_memo", "_misses", "_keep", "_held")

    def __init__(self, max_header_bytes: int = 32768, memos: HeadMemos | None = None) -> None:
        super().__init__(max_header_bytes)
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._memo: Memo[bytes, _RequestFields] = (memos or HeadMemos()).requests(
            max_header_bytes)
        self._misses = 0  # look-ups in a row that missed (see MISS_STREAK)
        self._keep = True  # the current request's keep_alive
        # After an upgrade request llhttp parses nothing more: the bytes that follow are
        # the tunnel's, held unparsed (None: no upgrade yet).
        self._held: bytearray | None = None

    # llhttp callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        headers = self._take_head(431)
        p = self._parser
        # llhttp (strict) already refused invalid header names and control bytes.
        req = make_request(p.get_method(), self._url, p.get_http_version().encode(),
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
        self._parser = None  # type: ignore[assignment]

    @property
    def held(self) -> int:
        return -1 if self._held is None else len(self._held)

    def take_held(self) -> bytes:
        held = bytes(self._held or b"")
        if self._held is not None:
            self._held.clear()
        return held

    def feed(self, data: bytes) -> list[Event]:
        if self._held is not None:
            self._held += data
            return []
        # "The head memo" above: a read where llhttp stands between messages may be one.
        memoisable = False
        misses = self._misses
        if misses >= MISS_STREAK:
            self._misses = misses + 1 if misses < MISS_STREAK + RESTING - 1 else 0
        elif self._between and len(data) <= MEMO_HEAD_BYTES:
            hit = self._memo.entries.get(data)
            if hit is not None:
                self._misses = 0
                m, t, v, h, keep, chunked, length, expect, connection, host = hit
                return [Request(m, t, v, list(h), keep, chunked, length, expect, connection,
                                host, data), END]
            self._misses = misses + 1
            memoisable = True
        # "The compiled split" below: a read that is one whole common head.
        split = split_request_head
        if split is not None and self._between and len(data) <= self.max_header_bytes:
            parts = split(data)
            if parts is not None:
                try:
                    method, target, headers, host, connection_values, expect = parts
                    split_req = request_from_split(method, target, headers, host,
                                                   connection_values, expect)
                except RemoteProtocolError:
                    # llhttp's path below raises the same error for these bytes, and is
                    # then left where it stops after one (refusing what follows).
                    split_req = None
                if split_req is not None:
                    if memoisable:
                        self._remember(data, split_req)
                    return [split_req, END]
        # llhttp buffers a header line until it ends: count the bytes of a head in
        # progress here, so one endless header line meets the limit too.
        head_in_progress = self._headers is not None
        in_chunk = self._in_chunk
        self._bound = (self._raw_size if head_in_progress else 0) + len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # An upgrade request (CONNECT never gets here: make_request refuses it): llhttp
            # stops after its head; what follows is held for the tunnel, never parsed.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._held = bytearray(data[offset:])
            for ev in self._events:
                if type(ev) is Request and not ev.upgrade:
                    ev.keep_alive = False  # llhttp's reading of an Upgrade the seam ignores
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
            if type(req) is Request and req.content_length is None and not req.chunked:
                self._remember(data, req)
        return events

    def _remember(self, data: bytes, req: Request) -> None:
        """Offer the bodyless request that ``data`` was, whole, to the memo (stored on its
        second sighting: see "the head memo")."""
        if self._memo.admit(data):
            self._memo.store(data, (req.method, req.target, req.http_version,
                                    list(req.headers), req.keep_alive, False, None,
                                    req.expect_continue, req.connection, req.host))


class HttptoolsResponseParser(_LlhttpHead):
    __slots__ = ("_method", "_events", "_parser", "_stale_parser", "_response", "_done",
                 "_first", "_memo", "_misses")

    def __init__(self, max_header_bytes: int = 65536, memos: HeadMemos | None = None) -> None:
        super().__init__(max_header_bytes)
        self._method = b"GET"
        self._events: list[Event] = []
        self._parser = httptools.HttpResponseParser(self)
        self._stale_parser = False
        self._response: Response | None = None
        self._done = False
        self._first = True  # the next feed starts a response
        self._memo: Memo[bytes, _ResponseFields] = (memos or HeadMemos()).responses(
            max_header_bytes)
        self._misses = 0  # look-ups in a row that missed (see MISS_STREAK)

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
            spoil(self._response)
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
            check_status_line(p.get_http_version().encode(), self._url)
            self._events.append(Informational(status))
            return
        self._response = make_response(status, self._url, p.get_http_version().encode(),
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
            spoil(self._response)

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
        whole = self._first and self._between and self._method != b"HEAD"
        if misses >= MISS_STREAK:
            self._misses = misses + 1 if misses < MISS_STREAK + RESTING - 1 else 0
        elif whole:
            end = data.find(b"\r\n\r\n", 0, MEMO_HEAD_BYTES) + 4
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
        # "The compiled split" above, for a response: one whole response of its subset.
        split = split_response_head
        events: list[Event] | None = None
        if split is not None and whole and len(data) <= self.max_header_bytes:
            parts = split(data)
            if parts is not None:
                status, reason, headers, connection_values, length, end = parts
                split_resp = response_from_split(status, reason, headers, connection_values,
                                                 length)
                if split_resp is not None:
                    self._first = False
                    self._done = True
                    self._response = split_resp
                    events = ([split_resp, Data(data[end:]), END] if length
                              else [split_resp, END])
        if events is None:
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
            spoil(self._response)
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
            spoil(self._response)  # garbage after the response
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
