"""poll -> fetch -> analyse -> build -> swap, one watcher per mutual-TLS listener.

Rules of this module (ghostunnel's reload): everything is built completely off the event
loop (S3 calls, parsing, the new SSLContext), then swapped in with one assignment. A failed
refresh keeps the old generation serving, is counted (``result="failed"``) and logged once
per distinct error; the next refresh tries again. Unchanged sources cost one HEAD (S3) or
one read + hash (file) and re-evaluate the expiry warnings of the truststore in use.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mtlsproxy.errors import TruststoreError
from mtlsproxy.metrics import TruststoreMetrics
from mtlsproxy.runtime.background import dispose, run_build
from mtlsproxy.runtime.periodic import Periodic
from mtlsproxy.server.generation import Generation, build_generation
from mtlsproxy.truststore.bundle import CertWarning, analyse, next_change
from mtlsproxy.truststore.sources import Source

if TYPE_CHECKING:
    from mtlsproxy.server.listener import ListenerRuntime

log = logging.getLogger("mtlsproxy.truststore")


class TruststoreWatcher(Periodic):
    def __init__(self, rt: ListenerRuntime, source: Source, metrics: TruststoreMetrics,
                 data: bytes, wall_clock: Callable[[], float] = time.time) -> None:
        self.rt = rt
        self.source = source
        self.metrics = metrics
        self.wall_clock = wall_clock
        self._data = data  # bytes of the truststore in use, for re-analysis
        self.version = rt.holder.current.version
        self.warnings: tuple[CertWarning, ...] = ()
        self.last_error: str | None = None
        self.last_checked_at: float | None = None
        metrics.declare_listener(rt.name)
        self._publish(rt.holder.current, self._bundle_warnings(rt.holder.current))
        self._next_change = self._change_after(rt.holder.current)

    def _change_after(self, gen: Generation) -> dt.datetime | None:
        return next_change(gen.bundle, self.rt.clock()) if gen.bundle is not None else None

    def __repr__(self) -> str:
        return (f"<TruststoreWatcher {self.rt.name} {self.source!r} version={self.version!r} "
                f"failing={self.last_error is not None}>")

    @staticmethod
    def _bundle_warnings(gen: Generation) -> tuple[CertWarning, ...]:
        return gen.bundle.warnings if gen.bundle is not None else ()

    def _publish(self, gen: Generation, warnings: tuple[CertWarning, ...]) -> None:
        self.warnings = warnings
        if gen.bundle is None:
            return
        # Every certificate of the bundle, used or not: an alert must see an expired CA too.
        cas = [(c.subject, c.fingerprint_sha256, c.cert.not_valid_after_utc.timestamp())
               for c in gen.bundle.all_certs]
        self.metrics.publish(self.rt.name, gen.uri, gen.version, gen.bundle.sha256, cas,
                             len(gen.bundle.certs), len(warnings), self.wall_clock())

    def next_wait(self) -> float:
        return self.rt.config.mutual_tls.refresh_interval

    async def refresh(self) -> str:
        """One check; returns the result label (applied, unchanged, failed)."""
        loop = asyncio.get_running_loop()
        config = self.rt.config
        try:
            fetched = await loop.run_in_executor(None, self.source.check, self.version)
            if fetched is None:
                # Same bytes: only the clock moved. Re-evaluate the expiry warnings, but
                # only once the clock has reached an instant where they can change.
                now = self.rt.clock()
                if self._next_change is not None and now >= self._next_change:
                    bundle = await run_build(analyse, self._data,
                                             config.mutual_tls.max_chain_length, now)
                    await run_build(self._publish, self.rt.holder.current, bundle.warnings)
                    self._next_change = await run_build(next_change, bundle, now)
                else:
                    self.metrics.last_success.labels(self.rt.name).set(self.wall_clock())
                result = "unchanged"
            else:
                gen = await run_build(_build, config, fetched.data, fetched.version)
                if self.rt.revocation is not None:
                    # Off the loop: a CRL of 100,000 entries takes ~70 ms to load and index.
                    gen = await run_build(self.rt.revocation.attach, gen)
                old = self.rt.holder.swap(gen)
                old_number = old.number
                dispose(old)
                del old
                self.version, self._data = fetched.version, fetched.data
                # Off the loop too: a series per CA (1,000 CAs: ~18 ms of labels) and the
                # dates of every CA.
                await run_build(self._publish, gen, self._bundle_warnings(gen))
                self._next_change = await run_build(self._change_after, gen)
                result = "applied"
                log.info("truststore of %s: generation %d -> %d (version %s, %d CAs, "
                         "%d warnings)", self.rt.name, old_number, gen.number, gen.version,
                         len(gen.bundle.certs) if gen.bundle else 0, len(self.warnings))
                for warning in self.warnings:
                    log.warning("truststore of %s: WARNING %s", self.rt.name, warning)
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - a refresh must never kill the watcher
            result = "failed"
            message = str(exc) if isinstance(exc, TruststoreError) else f"unexpected: {exc!r}"
            if message != self.last_error:
                log.warning("truststore of %s not updated, generation %d keeps serving: %s",
                            self.rt.name, self.rt.holder.current.number, message)
            self.last_error = message
        self.last_checked_at = self.wall_clock()
        self.metrics.reloads.labels(self.rt.name, result).inc()
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "warnings": [{"subject": w.subject, "problem": w.problem} for w in self.warnings],
            "last_error": self.last_error,
            "last_checked_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                              time.gmtime(self.last_checked_at))
                                if self.last_checked_at is not None else None),
        }


def _build(config: Any, data: bytes, version: str) -> Generation:
    return build_generation(config, data, version=version)
