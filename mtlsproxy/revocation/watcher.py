"""Fetch a listener's CRLs every refresh and re-decide when they change; I/O at the edge.

A changed CRL (or a CRL turning stale) gives the listener a new generation number with the
same TLS contexts (``Generation.with_revocation``): tickets stay valid, every cached verdict
is re-decided, and kept-alive connections are re-checked on their next request. A truststore
swap re-verifies the current CRLs against the new bundle (``attach``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge

from mtlsproxy.errors import TruststoreError
from mtlsproxy.revocation.crl import RevocationState, build_state
from mtlsproxy.runtime.background import run_build
from mtlsproxy.runtime.periodic import Periodic
from mtlsproxy.server.generation import Generation
from mtlsproxy.truststore.bundle import TrustBundle
from mtlsproxy.truststore.sources import Source, make_source

if TYPE_CHECKING:
    from mtlsproxy.server.listener import ListenerRuntime

log = logging.getLogger("mtlsproxy.revocation")


class RevocationWatcher(Periodic):
    def __init__(self, rt: ListenerRuntime, stale_gauge: Gauge) -> None:
        self.rt = rt
        cfg = rt.config.mutual_tls.revocation
        self.mode = cfg.mode
        self.sources: dict[str, Source] = {u: make_source(u) for u in cfg.crl_uris}
        self.data: dict[str, bytes | None] = {u: None for u in cfg.crl_uris}
        self.versions: dict[str, str | None] = {u: None for u in cfg.crl_uris}
        self.stale_gauge = stale_gauge
        self._stale: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"<RevocationWatcher {self.rt.name} crls={len(self.sources)} mode={self.mode}>"

    def fetch_all(self) -> bool:
        """Blocking: fetch every CRL that changed; True when any did."""
        changed = False
        for uri, source in self.sources.items():
            try:
                fetched = source.check(self.versions[uri])
            except TruststoreError as exc:
                if self.data[uri] is not None or self.versions[uri] is None:
                    log.warning("CRL %s of %s not updated: %s", uri, self.rt.name, exc)
                if self.versions[uri] is None:
                    self.versions[uri] = ""  # tried once; keep data None (missing)
                continue
            if fetched is not None:
                self.data[uri], self.versions[uri] = fetched.data, fetched.version
                changed = True
        return changed

    def prepare(self, bundle: TrustBundle | None) -> Prepared:
        """Blocking (the build thread): the current CRLs verified against ``bundle``.
        Their problems are logged here, where they are found."""
        data = dict(self.data)
        state = build_state(self.mode, data, bundle)
        for problem in state.problems:
            log.warning("revocation of %s: %s", self.rt.name, problem)
        return Prepared(bundle, data, state)

    def attach(self, gen: Generation, prepared: Prepared | None = None) -> Generation:
        """``gen`` carrying the current CRLs, verified against its own bundle: by
        ``prepared`` when it was made for that bundle from the CRLs still current, else
        here (a fetch landed in between: rare, and what ``refresh`` may not redo)."""
        # (The URIs are fixed for a watcher's life; a fetch replaces a CRL's bytes object.)
        if (prepared is None or prepared.bundle is not gen.bundle
                or any(self.data[u] is not d for u, d in prepared.data.items())):
            prepared = self.prepare(gen.bundle)
        self._publish(prepared.state)
        return gen.with_revocation(prepared.state)

    def _publish(self, state: RevocationState) -> frozenset[str]:
        now = self.rt.clock()
        stale = frozenset(c.issuer for c in state.stale(now))
        for crl in state.crls.values():
            self.stale_gauge.labels(self.rt.name, crl.issuer).set(1 if crl.issuer in stale
                                                                  else 0)
        self._stale = stale
        return stale

    def next_wait(self) -> float:
        """Seconds to the next refresh: the interval, or sooner when a CRL's nextUpdate
        comes first (re-fetch as soon as the issuer publishes the next one)."""
        wait = self.rt.config.mutual_tls.refresh_interval
        state = self.rt.holder.current.revocation
        if state is not None:
            now = self.rt.clock()
            for crl in state.crls.values():
                if crl.next_update is not None and crl.next_update > now:
                    wait = min(wait, max(1.0, (crl.next_update - now).total_seconds()))
        return wait

    async def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        changed = await loop.run_in_executor(None, self.fetch_all)
        current = self.rt.holder.current
        before = self._stale
        if current.revocation is not None and not changed:
            # Only the clock moved: a CRL past its nextUpdate changes decisions (hard mode).
            if self._publish(current.revocation) == before:
                return
        # On the build thread: loading and indexing a CRL costs ~0.7 us per entry (70 ms
        # for 100,000), a stall if it ran on the event loop.
        # Why the retry is enough: the build thread is ONE thread (background.executor), so
        # builds finish in the order they were queued. A truststore swap whose attach read
        # the CRLs from before this fetch was queued before this attach, so it lands
        # first, and the check below sees it and attaches again. With two build threads
        # that attach could land after this one and put the old CRLs back.
        while True:
            attached = await run_build(self.attach, current)
            if self.rt.holder.current is current:
                break
            # A truststore swap landed meanwhile; its CRLs may predate this fetch.
            current = self.rt.holder.current
        self.rt.holder.swap(attached)
        log.info("revocation state of %s updated (generation %d)", self.rt.name,
                 self.rt.holder.current.number)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A revocation state built ahead of its swap (a config reload builds every new
    truststore before it applies any), with the inputs it was built from."""

    bundle: TrustBundle | None
    data: dict[str, bytes | None]
    state: RevocationState


def crl_stale_gauge(registry: CollectorRegistry) -> Gauge:
    return Gauge("mtlsproxy_crl_stale",
                 "1 when a CRL in use is past its nextUpdate (soft mode admits anyway).",
                 ["listener", "issuer"], registry=registry,
                 multiprocess_mode="livemax")

