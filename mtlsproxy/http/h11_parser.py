"""h11 behind the parsing seam: the strict reference the differential test compares with.
"""

from __future__ import annotations

import re

import h11

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.checks import (
    BAD_VALUE,
    TOKEN,
    HeadBytes,
    check_status_line,
    head_size,
    make_request,
    make_response,
    spoil,
)
from mtlsproxy.http.events import END, Data, Event, Headers, Informational, Response


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
            if not colon or not TOKEN.fullmatch(name) or BAD_VALUE.search(value):
                raise RemoteProtocolError("invalid trailer field", self._status)


class H11RequestParser:
    """h11 behind the seam; the strict reference implementation."""

    def __init__(self, max_header_bytes: int = 32768) -> None:
        self.max_header_bytes = max_header_bytes
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._raw_head = HeadBytes(400)
        self._in_body = False
        self._chunks: _ChunkLines | None = None
        self._keep_alive = False  # the current request's
        self._closing = False  # a request that closes the connection has ended
        self._upgrade = False  # the current request asks for an upgrade
        # After an upgrade request, the bytes that follow, unparsed (as llhttp stops).
        self._held: bytearray | None = None

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
        if self._closing:
            self._after_close(data)
            return []
        if not self._in_body:
            if not self._raw_head:  # before a request line: see _finish_cycle
                data = data.lstrip(b"\r\n")
                if not data:
                    return []
            self._raw_head.add(data)  # llhttp's line rules (see HeadBytes)
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
                request = make_request(ev.method, ev.target, ev.http_version, headers)
                self._keep_alive = request.keep_alive
                # llhttp's rule for an upgrade request (checks._upgrade), whether or not
                # the seam takes up the protocol: nothing after it is parsed.
                self._upgrade = b"upgrade" in request.connection and any(
                    n == b"upgrade" for n, _ in headers)
                if self._upgrade and not request.upgrade:
                    # Held but not tunnelled (an empty or unusable Upgrade): as llhttp,
                    # the connection ends after this request.
                    request.keep_alive = False
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
                if self._upgrade:
                    self._held = bytearray(self._conn.trailing_data[0])
                    break
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
        self._raw_head = HeadBytes(502)  # llhttp's line rules, as for requests
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
                check_status_line(ev.http_version, bytes(ev.reason))
                events.append(Informational(ev.status_code))
                # The next head starts in what h11 holds: checked before it is parsed.
                self._raw_head.reset(bytes(self._conn.trailing_data[0]))
            elif isinstance(ev, h11.Response):
                self._raw_head.reset()
                self._in_body = True
                headers = _h11_headers(ev.headers)
                # h11 limits heads still incomplete only; a whole one in one read is held
                # to the limit here (as HttptoolsResponseParser does).
                if head_size(bytes(ev.reason), headers) > self.max_header_bytes:
                    raise RemoteProtocolError("response header block too large", 502)
                try:
                    response = make_response(ev.status_code, bytes(ev.reason),
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
                    spoil(self._response)
                return events  # whatever follows is not parsed (h11 would refuse it)

    def feed(self, data: bytes) -> list[Event]:
        if self._ended:  # bytes after the complete response (h11: DONE or MUST_CLOSE)
            spoil(self._response)
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
