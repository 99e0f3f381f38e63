"""Fetch a listener's CRLs every refresh and re-decide when they change; I/O at the edge.

A changed CRL (or a CRL turning stale) makes the listener's generation owner
(server/generation.py) install a new generation number with the same TLS contexts: tickets
stay valid, every cached verdict is re-decided, and kept-alive connections are re-checked on
their next request. A truststore swap re-verifies the current CRLs against the new bundle
(``attach_state``). The owner serialises these with every other change of the generation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Gauge

from mtlsproxy.config import ListenerConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.revocation.crl import RevocationState, build_state
from mtlsproxy.runtime.periodic import Periodic
from mtlsproxy.truststore.bundle import TrustBundle
from mtlsproxy.truststore.sources import Source, make_source

log = logging.getLogger("mtlsproxy.revocation")

# Seconds between fetches while a CRL is due or stale: short, since hard mode refuses
# clients until a fresh CRL arrives, and capped so a dead publisher is not hammered.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


class Installed(Protocol):
    """A generation as this module sees it."""

    @property
    def bundle(self) -> TrustBundle | None: ...
    @property
    def revocation(self) -> RevocationState | None: ...


class Owner(Protocol):
    """The listener's generation owner (server/generation.py): the one writer."""

    @property
    def config(self) -> ListenerConfig: ...
    @property
    def current(self) -> Installed: ...
    async def revocation_changed(self) -> None: ...


class RevocationWatcher(Periodic):
    def __init__(self, owner: Owner, stale_gauge: Gauge,
                 clock: Callable[[], dt.datetime]) -> None:
        self.owner = owner
        self.name = owner.config.label  # logs: the listener, or listener/domain
        self.labels = (owner.config.name, owner.config.domain)  # metrics
        self.clock = clock
        cfg = owner.config.mutual_tls.revocation
        self.mode = cfg.mode
        self.sources: dict[str, Source] = {u: make_source(u) for u in cfg.crl_uris}
        self.data: dict[str, bytes | None] = {u: None for u in cfg.crl_uris}
        self.versions: dict[str, str | None] = {u: None for u in cfg.crl_uris}
        self.stale_gauge = stale_gauge
        self._stale: frozenset[str] = frozenset()
        self._retry = RETRY_FIRST  # the next backoff while a CRL is due (next_wait)
        # One fetch at a time: the first one may outlive start-up's bounded wait
        # (``fetch_first``) while the refresh loop already runs.
        self._fetching = threading.Lock()
        # Guards ``data`` and ``_unattached`` between a fetch and a state's snapshot
        # (held for a dict copy, never across a download).
        self._data_lock = threading.Lock()
        self._unattached = False  # a fetch stored CRLs no revocation state holds yet

    def __repr__(self) -> str:
        return f"<RevocationWatcher {self.name} crls={len(self.sources)} mode={self.mode}>"

    def fetch_first(self, wait: float) -> bool:
        """Start-up: fetch every CRL, waiting at most ``wait`` seconds (a slow CRL server
        must not hold start-up, nor the event loop, for its timeouts). True when all came
        in time; else the fetch goes on in the background, the refresh loop attaches what
        it brings, and meanwhile a missing CRL counts as missing (hard mode: refused, and
        /readyz says not ready)."""
        thread = threading.Thread(target=self.fetch_all, name=f"crl-first-{self.name}",
                                  daemon=True)
        thread.start()
        thread.join(wait)
        if thread.is_alive():
            log.warning("CRLs of %s not fetched within %.1fs: starting without them, the "
                        "fetch goes on (%s mode: %s)", self.name, wait, self.mode,
                        "clients refused and /readyz not ready until they arrive"
                        if self.mode == "hard" else "clients admitted and counted")
            return False
        return True

    def fetch_all(self) -> bool:
        """Blocking: fetch every CRL that changed; True when any did."""
        with self._fetching:
            return self._fetch_all()

    def _fetch_all(self) -> bool:
        changed = False
        for uri, source in self.sources.items():
            try:
                fetched = source.check(self.versions[uri])
            except TruststoreError as exc:
                if self.data[uri] is not None or self.versions[uri] is None:
                    log.warning("CRL %s of %s not updated: %s", uri, self.name, exc)
                if self.versions[uri] is None:
                    self.versions[uri] = ""  # tried once; keep data None (missing)
                continue
            if fetched is not None:
                with self._data_lock:
                    self.data[uri], self.versions[uri] = fetched.data, fetched.version
                    self._unattached = changed = True
        return changed

    def prepare(self, bundle: TrustBundle | None) -> Prepared:
        """Blocking (the build thread): the current CRLs verified against ``bundle``.
        Their problems are logged here, where they are found."""
        with self._data_lock:
            data = dict(self.data)
            self._unattached = False
        state = build_state(self.mode, data, bundle)
        for problem in state.problems:
            log.warning("revocation of %s: %s", self.name, problem)
        return Prepared(bundle, data, state)

    def attach_state(self, bundle: TrustBundle | None,
                     prepared: Prepared | None = None) -> RevocationState:
        """The current CRLs verified against ``bundle``: ``prepared`` when it was made for
        that bundle from the CRLs still current, else built here (a fetch landed in
        between). Blocking when it builds: the owner calls it on the build thread, or with
        a ``prepared`` state on the loop."""
        # (The URIs are fixed for a watcher's life; a fetch replaces a CRL's bytes object.)
        if (prepared is None or prepared.bundle is not bundle
                or any(self.data[u] is not d for u, d in prepared.data.items())):
            prepared = self.prepare(bundle)
        self._publish(prepared.state)
        return prepared.state

    def _publish(self, state: RevocationState) -> frozenset[str]:
        now = self.clock()
        stale = frozenset(c.issuer for c in state.stale(now))
        for crl in state.crls.values():
            self.stale_gauge.labels(*self.labels, crl.issuer).set(1 if crl.issuer in stale
                                                                  else 0)
        self._stale = stale
        return stale

    def next_wait(self) -> float:
        """Seconds to the next fetch. A newer CRL is wanted ahead of its nextUpdate: at
        ``refresh_fraction`` of its validity window, and never later than nextUpdate minus
        the refresh interval, so a publisher a little late never leaves a hard-mode listener
        with a stale CRL. Once a CRL is due (or stale, or missing), fetches retry with a
        short backoff (RETRY_FIRST doubling up to RETRY_MAX, never over the interval)
        instead of waiting a whole interval; a newer CRL resets it."""
        mtls = self.owner.config.mutual_tls
        interval = mtls.refresh_interval
        fraction = mtls.revocation.refresh_fraction
        wait = interval
        due = False
        state = self.owner.current.revocation
        if state is not None:
            now = self.clock()
            if state.missing:
                due = True
            for crl in state.crls.values():
                if crl.next_update is None:
                    continue
                ahead = crl.this_update + (crl.next_update - crl.this_update) * fraction
                when = min(ahead, crl.next_update - dt.timedelta(seconds=interval))
                if when > now:
                    wait = min(wait, (when - now).total_seconds())
                else:
                    due = True
        if not due:
            self._retry = RETRY_FIRST
            return max(wait, RETRY_FIRST)
        retry, self._retry = self._retry, min(self._retry * 2, RETRY_MAX, interval)
        return max(min(wait, retry), 0.1)

    async def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        changed = await loop.run_in_executor(None, self.fetch_all)
        # Also CRLs a fetch stored without a state built from them (the first fetch that
        # outlived start-up's wait ends inside a later fetch's conditional GET).
        changed = changed or self._unattached
        current = self.owner.current.revocation
        if current is not None and not changed:
            # Only the clock moved: a CRL past its nextUpdate changes decisions (hard mode).
            before = self._stale
            if self._publish(current) == before:
                return
        # The owner verifies the CRLs on the build thread (a CRL of many entries would
        # stall the loop) and installs them after any change queued before this one.
        await self.owner.revocation_changed()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A revocation state built ahead of its swap (a config reload builds every new
    truststore before it applies any), with the inputs it was built from."""

    bundle: TrustBundle | None
    data: dict[str, bytes | None]
    state: RevocationState

