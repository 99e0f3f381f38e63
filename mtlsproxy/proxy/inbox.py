"""An event inbox between a protocol (producer) and one coroutine (consumer).

Back-pressure: when the body bytes waiting in the inbox exceed ``high``, the producer's
transport is paused; it resumes once the consumer brings them under ``low``. Memory per
direction is therefore bounded by ``high`` plus one read.

``put_data`` appends body bytes to the last queued ``Data`` when it is still waiting: an
HTTP/2 peer's DATA frames may carry one byte each, and an object per frame would cost
fifty times the bytes the flow-control window bounds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from mtlsproxy.http.parser import Data

E = TypeVar("E")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Pieces smaller than this start a mergeable buffer (a copy); larger ones are queued as
# they are (a full DATA frame, a socket read).
_MERGE_BELOW = 4096


class Inbox(Generic[E]):
    __slots__ = ("events", "_waiter", "failed", "_pause", "_resume", "_high", "_low",
                 "_buffered", "_paused", "__weakref__")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None],
                 high: int = HIGH_WATER, low: int = LOW_WATER) -> None:
        self.events: deque[E] = deque()  # read-only outside: truthy when one is queued
        self._waiter: asyncio.Future[None] | None = None
        # Read-only outside (a plain slot, not a property: _park reads it per request).
        self.failed: BaseException | None = None
        self._pause, self._resume = pause, resume
        self._high, self._low = high, low
        self._buffered = 0
        self._paused = False

    def put(self, events: list[E]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, Data):
                self._buffered += len(ev.data)
        self._check_high()
        self._wake()

    def _check_high(self) -> None:
        if self._buffered > self._high and not self._paused:
            self._paused = True
            self._pause()

    def put_data(self, data: bytes) -> None:
        """``put([Data(data)])``, merged into a queued Data that nobody has taken yet."""
        events = self.events
        if events:
            last = events[-1]
            if isinstance(last, Data) and isinstance(last.data, bytearray):
                last.data += data
                self._buffered += len(data)
                self._check_high()  # no wake: the consumer was woken for this event
                return
        self.put([Data(bytearray(data)) if len(data) < _MERGE_BELOW else Data(data)])  # type: ignore[list-item]

    def fail(self, exc: BaseException) -> None:
        """No more events will come: the consumer gets ``exc`` once the queue is empty."""
        if self.failed is None:
            self.failed = exc
        self._wake()

    def interrupt(self, exc: BaseException) -> bool:
        """Raise ``exc`` in the consumer if it is waiting now (a timeout); True if it was."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
            return True
        return False

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> E | None:
        if not self.events:
            return None
        ev = self.events.popleft()
        if isinstance(ev, Data):
            self._buffered -= len(ev.data)
            if self._paused and self._buffered < self._low:
                self._paused = False
                self._resume()
        return ev

    async def get(self) -> E:
        while not self.events:
            if self.failed is not None:
                raise self.failed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ev = self.get_nowait()
        assert ev is not None
        return ev

    def __repr__(self) -> str:
        return (f"<Inbox events={len(self.events)} buffered={self._buffered} "
                f"paused={self._paused} failed={self.failed is not None}>")
