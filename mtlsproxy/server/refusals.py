"""Refusals in the log: one INFO line each, rate-limited per reason.

Rules of this module:
- A line says what an operator needs to find the client: the listener (and its domain
  when it has domains), the reason (the metric's label), the client address, and when a
  certificate was presented its subject, issuer, serial and SHA-256 fingerprint. The
  message is fixed text; the details are fields of the JSON line (cli.py's formatter
  writes a record's ``fields``).
- At most ``burst`` lines per reason in each ``window`` seconds: a flood of garbage
  handshakes must not flood the log. What was left out is counted, and said in one line
  when the reason is next logged after its window.
- The clock is injected; nothing here sleeps or schedules.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mtlsproxy.identity.peer import ClientIdentity


class RefusalLog:
    __slots__ = ("logger", "clock", "burst", "window", "_windows")

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic,
                 burst: int = 10, window: float = 1.0) -> None:
        self.logger = logger
        self.clock = clock
        self.burst = burst
        self.window = window
        # reason -> [window start, lines logged in it, lines suppressed in it]
        self._windows: dict[str, list[float]] = {}

    def refused(self, listener: str, reason: str, client: str,
                identity: ClientIdentity | None = None, detail: str | None = None,
                domain: str = "") -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        now = self.clock()
        state = self._windows.get(reason)
        if state is None or now - state[0] >= self.window:
            if state is not None and state[2]:
                self.logger.info("refusals suppressed", extra={"fields": {
                    "event": "refusals_suppressed", "reason": reason,
                    "suppressed": int(state[2]), "window_seconds": self.window}})
            state = self._windows[reason] = [now, 0.0, 0.0]
        if state[1] >= self.burst:
            state[2] += 1
            return
        state[1] += 1
        fields: dict[str, object] = {"event": "refused", "listener": listener,
                                     "reason": reason, "client": client}
        if domain:
            fields["domain"] = domain
        if identity is not None:
            fields.update(subject=identity.subject, issuer=identity.issuer,
                          serial=identity.serial_hex,
                          fingerprint_sha256=identity.fingerprint_sha256)
        if detail:
            fields["detail"] = detail
        self.logger.info("client refused", extra={"fields": fields})
