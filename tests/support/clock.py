"""The injectable clock the proxy's policy reads."""

from __future__ import annotations

import datetime as dt

UTC = dt.UTC


class FakeClock:
    """Injected into the proxy: the policy's notion of now, moved by tests."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(UTC) + self.offset

    def advance(self, delta: dt.timedelta) -> None:
        self.offset += delta
