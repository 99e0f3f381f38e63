"""HTTP/2 frame headers read before h2 parses a byte: limits h2 enforces too late or not
at all. Pure (no sockets).

Rules of this module:
- h2's frame buffer keeps a frame's bytes until the whole frame has arrived and compares
  its length with SETTINGS_MAX_FRAME_SIZE only then: a frame header announcing 16 MiB
  makes it buffer 16 MiB per connection. ``FrameGuard`` reads each frame header (9 bytes,
  RFC 9113 section 4.1) as it arrives and refuses a length over the limit at once
  (FRAME_SIZE_ERROR, section 4.2).
- Frames that cost work and carry nothing are counted with Envoy's flood rules
  (its http2_protocol_options, defaults): more than 1 consecutive DATA, HEADERS or
  CONTINUATION frame with an empty payload and no END_STREAM
  (max_consecutive_inbound_frames_with_empty_payload), more than 100 PRIORITY frames per
  stream opened (max_inbound_priority_frames_per_stream), more WINDOW_UPDATE frames than
  1 + 2 x (streams + 10 x DATA frames sent)
  (max_inbound_window_update_frames_per_data_frame_sent).
- DATA frames on a stream that was reset (by the client, or by the proxy: the session
  says which) count as control frames: h2 answers each with a RST_STREAM of its own and
  tells the session nothing, so each costs a parse and a write and carries nothing.
- It decides nothing else: h2 parses the frames, and refuses what is malformed in them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtlsproxy.errors import RemoteProtocolError

PREFACE_LENGTH = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (RFC 9113 section 3.4)
HEADER_LENGTH = 9

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x6, 0x7, 0x8, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4

MAX_CONSECUTIVE_EMPTY_FRAMES = 1
MAX_PRIORITY_FRAMES_PER_STREAM = 100
MAX_WINDOW_UPDATES_PER_DATA_FRAME_SENT = 10
# Frames that only ask for work or carry nothing (SETTINGS and their ACKs, PING, RST_STREAM,
# GOAWAY, PUSH_PROMISE, and types h2 ignores, RFC 9113 section 5.5) a client may send per
# second, plus one per stream it opened in that second (it may reset each). nginx and
# Envoy bound PING and SETTINGS the same way; types h2 ignores cost it a parse each.
CONTROL_FRAMES_PER_SECOND = 100
# The dynamic table a peer may make the proxy's HPACK encoder keep (RFC 7541 section 4.2):
# the protocol's default, whatever larger SETTINGS_HEADER_TABLE_SIZE it asks for (h2
# copies the setting into its encoder unbounded: memory, and a linear search per field).
MAX_HEADER_TABLE_SIZE = 4096
# Reset streams remembered (most recent first out): DATA on older ones is h2's to refuse.
RESET_STREAMS_KEPT = 1024


class FrameAbuse(RemoteProtocolError):
    """A frame the connection ends for: ``kind`` is the metric's (``frame_size``,
    ``flood``, ``header_size``)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class FrameGuard:
    """Fed the client's bytes (after TLS) before h2; raises FrameAbuse.

    ``max_header_block`` bounds a header block's encoded bytes (HEADERS and its
    CONTINUATION frames): h2 keeps them all until END_HEADERS, and its own bound is 64
    CONTINUATION frames of any size. ``header_block_since`` is when the unfinished block
    began (the session ends a connection that leaves one unfinished too long)."""

    __slots__ = ("max_frame_size", "max_header_block", "data_frames_sent",
                 "header_block_since", "_preface", "_head", "_skip", "_empty", "_streams",
                 "_priority", "_window_updates", "_block", "_control", "_second",
                 "_second_streams", "_now", "_reset")

    def __init__(self, max_frame_size: int, max_header_block: int = 2**31) -> None:
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_block
        self.data_frames_sent = 0  # the session counts its DATA frames here
        self.header_block_since: float | None = None
        self._preface = PREFACE_LENGTH
        self._head = bytearray()  # a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self._empty = 0
        self._streams = 0
        self._priority = 0
        self._window_updates = 0
        self._block = 0  # encoded bytes of the header block being received
        self._control = 0  # control frames in the current second
        self._second = -1.0
        self._second_streams = 0
        self._now = 0.0
        self._reset: dict[int, None] = {}  # an ordered set of reset stream IDs

    def stream_reset(self, stream_id: int) -> None:
        """The proxy reset ``stream_id``: DATA on it from now on is a control frame."""
        self._reset[stream_id] = None
        if len(self._reset) > RESET_STREAMS_KEPT:
            del self._reset[next(iter(self._reset))]

    def feed(self, data: bytes, now: float = 0.0) -> None:
        self._now = now
        n = len(data)
        pos = min(self._preface, n)
        self._preface -= pos
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            if not self._head and n - pos >= HEADER_LENGTH:
                self._frame(data[pos:pos + HEADER_LENGTH])
                pos += HEADER_LENGTH
                continue
            take = min(HEADER_LENGTH - len(self._head), n - pos)
            self._head += data[pos:pos + take]
            pos += take
            if len(self._head) == HEADER_LENGTH:
                head = bytes(self._head)
                self._head.clear()
                self._frame(head)

    def _frame(self, head: bytes) -> None:
        length = int.from_bytes(head[:3], "big")
        kind = head[3]
        if length > self.max_frame_size:
            raise FrameAbuse(f"a frame of {length} bytes (the limit is "
                             f"{self.max_frame_size})", "frame_size")
        self._skip = length
        if kind == DATA and self._reset and \
                int.from_bytes(head[5:9], "big") & 0x7FFFFFFF in self._reset:
            self._control_frame()
        elif kind in (DATA, HEADERS, CONTINUATION):
            if kind == HEADERS:
                self._streams += 1
                self._second_streams += 1
                self._block = 0
            if kind != DATA:
                self._header_block(length, head[4] & END_HEADERS)
            if length or (kind != CONTINUATION and head[4] & END_STREAM):
                self._empty = 0
            else:
                self._empty += 1
                if self._empty > MAX_CONSECUTIVE_EMPTY_FRAMES:
                    raise FrameAbuse("frames with an empty payload", "flood")
        elif kind == PRIORITY:
            self._priority += 1
            if self._priority > MAX_PRIORITY_FRAMES_PER_STREAM * (1 + self._streams):
                raise FrameAbuse("PRIORITY flood", "flood")
        elif kind == WINDOW_UPDATE:
            self._window_updates += 1
            if self._window_updates > 1 + 2 * (
                    self._streams
                    + MAX_WINDOW_UPDATES_PER_DATA_FRAME_SENT * self.data_frames_sent):
                raise FrameAbuse("WINDOW_UPDATE flood", "flood")
        else:
            if kind == RST_STREAM:
                self.stream_reset(int.from_bytes(head[5:9], "big") & 0x7FFFFFFF)
            self._control_frame()

    def _control_frame(self) -> None:
        if self._now - self._second >= 1.0:
            self._second, self._control, self._second_streams = self._now, 0, 0
        self._control += 1
        if self._control > CONTROL_FRAMES_PER_SECOND + self._second_streams:
            raise FrameAbuse("control frame flood", "flood")

    def _header_block(self, length: int, end: int) -> None:
        self._block += length
        if self._block > self.max_header_block:
            raise FrameAbuse(f"a header block of over {self.max_header_block} bytes",
                             "header_size")
        if end:
            self.header_block_since = None
        elif self.header_block_since is None:
            self.header_block_since = self._now


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    error_code: int


class GoAwayFilter:
    """Takes the GOAWAY frames out of an upstream's bytes (frame-aligned from the first
    byte: a server's preface is a SETTINGS frame, RFC 9113 section 3.4).

    Why: h2's connection state machine closes on a received GOAWAY and refuses every
    frame after it, but a graceful GOAWAY (RFC 9113 section 6.8) lets the streams up to
    its last stream ID finish, and a server draining for a restart sends one. The
    connection code handles GOAWAY itself, so h2 never sees it. A GOAWAY too short to
    read (a FRAME_SIZE_ERROR) or on a stream is passed on, for h2 to refuse."""

    __slots__ = ("_head", "_skip", "_goaway")

    def __init__(self) -> None:
        self._head = bytearray()  # a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self._goaway: bytearray | None = None  # the payload of a GOAWAY being dropped

    def feed(self, data: bytes) -> list[bytes | GoAway]:
        """``data`` in order, GOAWAY frames replaced by what they say."""
        out: list[bytes | GoAway] = []
        n = len(data)
        pos = seg = 0  # data[seg:pos] passes through
        while pos < n:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                if self._goaway is None:
                    pos += take
                    continue
                if len(self._goaway) < 8:
                    self._goaway += data[pos:pos + min(take, 8 - len(self._goaway))]
                pos += take
                seg = pos
                if not self._skip:
                    out.append(GoAway(int.from_bytes(self._goaway[:4], "big") & 0x7FFFFFFF,
                                      int.from_bytes(self._goaway[4:8], "big")))
                    self._goaway = None
                continue
            if not self._head and n - pos >= HEADER_LENGTH:
                head = data[pos:pos + HEADER_LENGTH]
                if self._dropped(head):
                    if pos > seg:
                        out.append(data[seg:pos])
                    seg = pos + HEADER_LENGTH
                pos += HEADER_LENGTH
                continue
            # A header split across reads: held until whole, then passed on or dropped.
            if pos > seg:
                out.append(data[seg:pos])
            take = min(HEADER_LENGTH - len(self._head), n - pos)
            self._head += data[pos:pos + take]
            pos += take
            seg = pos
            if len(self._head) == HEADER_LENGTH:
                head = bytes(self._head)
                self._head.clear()
                if not self._dropped(head):
                    out.append(head)
        if pos > seg:
            out.append(data[seg:pos])
        return out

    def _dropped(self, head: bytes) -> bool:
        length = int.from_bytes(head[:3], "big")
        self._skip = length
        if (head[3] == GOAWAY and length >= 8
                and not int.from_bytes(head[5:9], "big") & 0x7FFFFFFF):
            self._goaway = bytearray()
            return True
        return False


def goaway_frame(last_stream_id: int, error_code: int) -> bytes:
    """A GOAWAY frame (RFC 9113 section 6.8) with no debug data."""
    return (b"\x00\x00\x08" + bytes((GOAWAY, 0)) + b"\x00\x00\x00\x00"
            + (last_stream_id & 0x7FFFFFFF).to_bytes(4, "big") + error_code.to_bytes(4, "big"))


def bound_header_table(encoder: Any) -> None:
    """After the peer's SETTINGS: the encoder's table no larger than
    ``MAX_HEADER_TABLE_SIZE`` (an ``hpack.Encoder``; RFC 7541 lets the encoder use less)."""
    if encoder.header_table_size > MAX_HEADER_TABLE_SIZE:
        encoder.header_table_size = MAX_HEADER_TABLE_SIZE
