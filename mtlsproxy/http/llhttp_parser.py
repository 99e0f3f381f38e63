"""httptools (llhttp) behind the parsing seam: the fast default, with the compiled split.
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
        # connection): where the compiled split may stand in for a parse (see "the compiled
        # split").
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


# -- the compiled split ----------------------------------------------------------------
#
# (http/_speedups.pyx, when built.) A read that arrives where llhttp stands between
# messages and is one whole head of the split's strict subset is split in one C call,
# which also finds what ``make_request`` scans the headers for, and checked by
# ``checks.request_from_split`` (make_request for that subset); llhttp is not fed, so it
# stays between messages, where it would be after parsing them. A request after which
# llhttp would stop (Connection: close) takes llhttp's path. The errors raised are the ones
# llhttp's path raises for the same bytes. Responses likewise
# (``checks.response_from_split``): a first read that is one whole response with a
# Content-Length body, not a HEAD answer. Without the module, llhttp parses everything
# (tests/unit/test_compiled_head.py holds the two to one behaviour).
#
# (A memo of whole heads, looked up by their bytes, stood here before the split; it saved
# nothing measurable with heads like real traffic, which never repeat, and was removed:
# docs/performance.md.)


class HttptoolsRequestParser(_LlhttpHead):
    """llhttp behind the seam; the default fast path."""

    __slots__ = ("_parser", "_events", "_keep", "_held")

    def __init__(self, max_header_bytes: int = 32768) -> None:
        super().__init__(max_header_bytes)
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
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
        # place where the split may stand in for it (by our reading or llhttp's).
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
        # "The compiled split" above: a read that is one whole common head.
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
        return events


class HttptoolsResponseParser(_LlhttpHead):
    __slots__ = ("_method", "_events", "_parser", "_stale_parser", "_response", "_done",
                 "_first")

    def __init__(self, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._method = b"GET"
        self._events: list[Event] = []
        self._parser = httptools.HttpResponseParser(self)
        self._stale_parser = False
        self._response: Response | None = None
        self._done = False
        self._first = True  # the next feed starts a response

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
        # "The compiled split" above, for a response: one whole response of its subset, as
        # the first read of a response (not a HEAD answer) where llhttp stands between
        # messages.
        split = split_response_head
        if (split is not None and self._first and self._between and self._method != b"HEAD"
                and len(data) <= self.max_header_bytes):
            parts = split(data)
            if parts is not None:
                status, reason, headers, connection_values, length, end = parts
                split_resp = response_from_split(status, reason, headers, connection_values,
                                                 length)
                if split_resp is not None:
                    self._first = False
                    self._done = True
                    self._response = split_resp
                    return ([split_resp, Data(data[end:]), END] if length
                            else [split_resp, END])
        return self._feed(data)

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
