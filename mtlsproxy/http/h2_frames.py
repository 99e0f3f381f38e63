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
- It decides nothing else: h2 parses the frames, and refuses what is malformed in them.
"""

from __future__ import annotations

from mtlsproxy.errors import RemoteProtocolError

PREFACE_LENGTH = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (RFC 9113 section 3.4)
HEADER_LENGTH = 9

DATA, HEADERS, PRIORITY, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x2, 0x8, 0x9
END_STREAM = 0x1

MAX_CONSECUTIVE_EMPTY_FRAMES = 1
MAX_PRIORITY_FRAMES_PER_STREAM = 100
MAX_WINDOW_UPDATES_PER_DATA_FRAME_SENT = 10


class FrameAbuse(RemoteProtocolError):
    """A frame the connection ends for: ``kind`` is the metric's (``frame_size``,
    ``flood``)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class FrameGuard:
    """Fed the client's bytes (after TLS) before h2; raises FrameAbuse."""

    __slots__ = ("max_frame_size", "data_frames_sent", "_preface", "_head", "_skip",
                 "_empty", "_streams", "_priority", "_window_updates")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self.data_frames_sent = 0  # the session counts its DATA frames here
        self._preface = PREFACE_LENGTH
        self._head = bytearray()  # a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self._empty = 0
        self._streams = 0
        self._priority = 0
        self._window_updates = 0

    def feed(self, data: bytes) -> None:
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
        if kind in (DATA, HEADERS, CONTINUATION):
            if kind == HEADERS:
                self._streams += 1
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
