"""The event inbox between a protocol and its consumer (proxy/inbox.py)."""

from __future__ import annotations

from mtlsproxy.http.events import Data, EndOfMessage
from mtlsproxy.proxy.inbox import Inbox


def test_small_body_pieces_queued_together_are_one_event() -> None:
    """An HTTP/2 peer may send one byte per DATA frame: an object per frame would cost
    fifty times the bytes flow control bounds."""
    inbox: Inbox[object] = Inbox(lambda: None, lambda: None)
    for _ in range(1000):
        inbox.put_data(b"x")
    assert len(inbox.events) == 1
    ev = inbox.get_nowait()
    assert isinstance(ev, Data) and bytes(ev.data) == b"x" * 1000


def test_a_piece_taken_is_never_grown_afterwards() -> None:
    inbox: Inbox[object] = Inbox(lambda: None, lambda: None)
    inbox.put_data(b"a")
    first = inbox.get_nowait()
    inbox.put_data(b"b")
    assert isinstance(first, Data) and bytes(first.data) == b"a"
    second = inbox.get_nowait()
    assert isinstance(second, Data) and bytes(second.data) == b"b"


def test_pieces_are_not_merged_across_other_events() -> None:
    inbox: Inbox[object] = Inbox(lambda: None, lambda: None)
    inbox.put_data(b"a")
    inbox.put([EndOfMessage()])
    inbox.put_data(b"b")
    assert len(inbox.events) == 3


def test_merged_bytes_still_pause_the_producer_past_the_high_water_mark() -> None:
    paused = []
    inbox: Inbox[object] = Inbox(lambda: paused.append(True), lambda: None, high=100, low=10)
    for _ in range(101):
        inbox.put_data(b"x")
    assert paused == [True]
