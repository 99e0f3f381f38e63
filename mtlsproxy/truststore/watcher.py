"""poll -> fetch -> hand to the owner -> publish, one watcher per mutual-TLS listener.

Rules of this module (ghostunnel's reload): the fetch runs off the event loop, and the new
generation is built completely off the loop by the listener's generation owner
(server/generation.py), then swapped in with one assignment. A failed refresh keeps the old
generation serving, is counted (``result="failed"``) and logged once per distinct error;
the next refresh tries again. Unchanged sources cost one HEAD (S3) or one read + hash
(file) and re-evaluate the expiry warnings of the truststore in use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from mtlsproxy.config import ListenerConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.metrics import TruststoreMetrics
from mtlsproxy.runtime.background import run_build
from mtlsproxy.runtime.periodic import Periodic
from mtlsproxy.truststore.bundle import CertWarning, TrustBundle, analyse, next_change
from mtlsproxy.truststore.sources import Source

log = logging.getLogger("mtlsproxy.truststore")


class Installed(Protocol):
    """A generation as this module sees it."""

    @property
    def number(self) -> int: ...
    @property
    def uri(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def bundle(self) -> TrustBundle | None: ...


class Owner(Protocol):
    """The listener's generation owner (server/generation.py): the one writer."""

    @property
    def config(self) -> ListenerConfig: ...
    @property
    def current(self) -> Installed: ...
    async def truststore_changed(self, data: bytes, version: str) -> Installed: ...


class TruststoreWatcher(Periodic):
    def __init__(self, owner: Owner, source: Source, metrics: TruststoreMetrics,
                 data: bytes, clock: Callable[[], dt.datetime],
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.owner = owner
        self.name = owner.config.label  # logs: the listener, or listener/domain
        self.labels = (owner.config.name, owner.config.domain)  # metrics
        self.clock = clock  # the policy's clock: expiry warnings
        self.source = source
        self.metrics = metrics
        self.wall_clock = wall_clock
        self._data = data  # bytes of the truststore in use, for re-analysis
        self.version = owner.current.version
        self.warnings: tuple[CertWarning, ...] = ()
        self.last_error: str | None = None
        self.last_checked_at: float | None = None
        metrics.declare_listener(*self.labels)
        self._publish(owner.current, self._bundle_warnings(owner.current))
        self._next_change = self._change_after(owner.current)

    def _change_after(self, gen: Installed) -> dt.datetime | None:
        return next_change(gen.bundle, self.clock()) if gen.bundle is not None else None

    def __repr__(self) -> str:
        return (f"<TruststoreWatcher {self.name} {self.source!r} version={self.version!r} "
                f"failing={self.last_error is not None}>")

    @staticmethod
    def _bundle_warnings(gen: Installed) -> tuple[CertWarning, ...]:
        return gen.bundle.warnings if gen.bundle is not None else ()

    def _publish(self, gen: Installed, warnings: tuple[CertWarning, ...]) -> None:
        self.warnings = warnings
        if gen.bundle is None:
            return
        # The usable CAs only: the expiry alert is about CAs that admit clients, and one
        # left out (expired, not a CA, a weak algorithm) would fire it for ever; its
        # warning (mtlsproxy_truststore_warnings, /truststore, the log) says why it is out.
        cas = [(c.subject, c.fingerprint_sha256, c.cert.not_valid_after_utc.timestamp())
               for c in gen.bundle.certs]
        self.metrics.publish(self.labels[0], gen.uri, gen.version, gen.bundle.sha256, cas,
                             len(gen.bundle.certs), len(warnings), self.wall_clock(),
                             self.labels[1])

    def next_wait(self) -> float:
        return self.owner.config.mutual_tls.refresh_interval

    async def refresh(self) -> str:
        """One check; returns the result label (applied, unchanged, failed)."""
        loop = asyncio.get_running_loop()
        config = self.owner.config
        try:
            fetched = await loop.run_in_executor(None, self.source.check, self.version)
            if fetched is None:
                # Same bytes: only the clock moved. Re-evaluate the expiry warnings, but
                # only once the clock has reached an instant where they can change.
                now = self.clock()
                if self._next_change is not None and now >= self._next_change:
                    bundle = await run_build(analyse, self._data,
                                             config.mutual_tls.max_chain_length, now)
                    await run_build(self._publish, self.owner.current, bundle.warnings)
                    self._next_change = await run_build(next_change, bundle, now)
                else:
                    self.metrics.last_success.labels(*self.labels).set(self.wall_clock())
                result = "unchanged"
            else:
                gen = await self.owner.truststore_changed(fetched.data, fetched.version)
                self.version, self._data = fetched.version, fetched.data
                # Off the loop too: a series per CA and the dates of every CA.
                await run_build(self._publish, gen, self._bundle_warnings(gen))
                self._next_change = await run_build(self._change_after, gen)
                result = "applied"
                for warning in self.warnings:
                    log.warning("truststore of %s: WARNING %s", self.name, warning)
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - a refresh must never kill the watcher
            result = "failed"
            message = str(exc) if isinstance(exc, TruststoreError) else f"unexpected: {exc!r}"
            if message != self.last_error:
                log.warning("truststore of %s not updated, generation %d keeps serving: %s",
                            self.name, self.owner.current.number, message)
            self.last_error = message
        self.last_checked_at = self.wall_clock()
        self.metrics.reloads.labels(*self.labels, result).inc()
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "warnings": [{"subject": w.subject, "problem": w.problem} for w in self.warnings],
            "last_error": self.last_error,
            "last_checked_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                              time.gmtime(self.last_checked_at))
                                if self.last_checked_at is not None else None),
        }

