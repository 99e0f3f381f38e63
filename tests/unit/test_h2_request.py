"""HTTP/2's sans-IO pieces without sockets: a stream's header list as a Request
(http/h2_request.py) and the frame-header guard (http/h2_frames.py)."""

from __future__ import annotations

import pytest

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.h2_frames import FrameAbuse, FrameGuard
from mtlsproxy.http.h2_request import request_from_h2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def fields(path: bytes = b"/", method: bytes = b"GET",
           *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"https"), (b":authority", b"a.test"),
            (b":path", path), *extra]


def test_a_request_becomes_the_http11_request_a_client_would_have_sent() -> None:
    req = request_from_h2(fields(b"/x?y=1", b"GET", (b"cookie", b"a=1"),
                                 (b"cookie", b"b=2")), True)
    assert (req.method, req.target, req.host) == (b"GET", b"/x?y=1", b"a.test")
    assert (b"cookie", b"a=1; b=2") in req.headers


@pytest.mark.parametrize("path", [b"/caf\xc3\xa9", b"/\x80", b"/a\xff", b"/a b", b"/\x7f"])
def test_a_path_with_bytes_a_uri_cannot_hold_is_refused(path: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        request_from_h2(fields(path), True)


@pytest.mark.parametrize("length", [b"1", b"40"])
def test_a_content_length_on_a_stream_that_headers_end_is_malformed(length: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        request_from_h2(fields(b"/", b"POST", (b"content-length", length)), True)


def test_content_length_zero_on_a_stream_that_headers_end_is_fine() -> None:
    req = request_from_h2(fields(b"/", b"POST", (b"content-length", b"0")), True)
    assert req.content_length == 0


def test_a_body_of_unknown_length_goes_up_chunked() -> None:
    assert request_from_h2(fields(b"/", b"POST"), False).chunked


def frame(length: int, kind: int, flags: int = 0, stream_id: int = 1) -> bytes:
    return length.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")


def test_the_guard_reads_frame_headers_split_anywhere() -> None:
    data = PREFACE + frame(4, 0x0) + b"abcd" + frame(16384, 0x0) + b"x" * 16384
    for cut in range(len(data)):
        guard = FrameGuard(16384)
        guard.feed(data[:cut])
        guard.feed(data[cut:])  # never reads payload bytes as a header


def test_the_guard_refuses_a_frame_over_the_limit_from_its_header_alone() -> None:
    guard = FrameGuard(16384)
    with pytest.raises(FrameAbuse) as err:
        guard.feed(PREFACE + frame(16385, 0x0))
    assert err.value.kind == "frame_size"


def test_one_empty_frame_is_allowed_two_in_a_row_are_a_flood() -> None:
    guard = FrameGuard(16384)
    guard.feed(PREFACE + frame(0, 0x0) + frame(1, 0x0) + b"x" + frame(0, 0x0))
    guard.feed(frame(0, 0x0, flags=0x1))  # END_STREAM: not empty of meaning
    with pytest.raises(FrameAbuse) as err:
        guard.feed(frame(0, 0x0) + frame(0, 0x9))
    assert err.value.kind == "flood"


def test_priority_frames_are_bounded_per_stream_opened() -> None:
    guard = FrameGuard(16384)
    guard.feed(PREFACE + (frame(5, 0x2) + b"\x00" * 5) * 100)
    guard.feed(frame(3, 0x1, flags=0x4) + b"abc")  # a stream: 100 more allowed
    guard.feed((frame(5, 0x2) + b"\x00" * 5) * 100)
    with pytest.raises(FrameAbuse):
        guard.feed(frame(5, 0x2) + b"\x00" * 5)


def test_window_updates_are_bounded_by_the_data_frames_sent() -> None:
    guard = FrameGuard(16384)
    update = frame(4, 0x8, stream_id=0) + b"\x00\x00\x00\x01"
    guard.feed(PREFACE + update)
    with pytest.raises(FrameAbuse):
        guard.feed(update)
    guard = FrameGuard(16384)
    guard.data_frames_sent = 5
    guard.feed(PREFACE + update * 101)
    with pytest.raises(FrameAbuse):
        guard.feed(update)
