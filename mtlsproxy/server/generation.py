"""A listener's generation (bundle, contexts, revocation state) and its one owner.

Rules of this module:
- Everything a generation needs is built completely before ``swap``; readers take
  ``holder.current`` once per connection and keep that snapshot, so a swap can never leave
  a connection with half of an old and half of a new truststore (ghostunnel's reload).
- ``GenerationOwner`` is the only writer. Its changes (a truststore version, CRLs, the
  server certificate files, a SIGHUP reload) run one at a time under its lock, and each
  builds from the generation current once it holds the lock: a change that awaited a build
  can never install contexts made from a generation that another change replaced meanwhile.
- The watchers (truststore/, revocation/, tls/) only notice changes and call the owner;
  they sit below this layer and know it through the small protocols they declare.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtlsproxy.config import ListenerConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.revocation.crl import RevocationState
from mtlsproxy.runtime.background import dispose, run_build
from mtlsproxy.tls.contexts import ServerContexts, build_server_contexts
from mtlsproxy.truststore.bundle import TrustBundle, parse_bundle
from mtlsproxy.truststore.sources import Source, make_source

if TYPE_CHECKING:
    from mtlsproxy.revocation.watcher import RevocationWatcher

log = logging.getLogger("mtlsproxy.truststore")

_generations = itertools.count(1)


def next_generation_number() -> int:
    return next(_generations)


@dataclass(frozen=True)
class Generation:
    number: int
    uri: str
    bundle: TrustBundle | None  # None: mutual TLS is off
    contexts: ServerContexts
    loaded_at: float
    version: str = ""  # the source's version: S3 VersionId, or the file's SHA-256
    revocation: RevocationState | None = None  # CRLs verified against this bundle

    def with_revocation(self, state: RevocationState | None) -> Generation:
        """The same contexts (session tickets stay valid) under a new number, so every
        cached verdict is re-decided against the new revocation state."""
        return dataclasses.replace(self, number=next_generation_number(), revocation=state)

    def renumbered(self) -> Generation:
        """The same contexts and revocation state under a new number: a listener policy that
        shapes verdicts changed (``client_intermediates``), so every cached one, and every
        keep-alive connection's, is decided again."""
        return dataclasses.replace(self, number=next_generation_number())

    @property
    def mutual_tls(self) -> bool:
        return self.bundle is not None

    def describe(self) -> dict[str, object]:
        if self.bundle is None:
            return {"uri": self.uri, "mutual_tls": False, "generation": self.number}
        return {
            "uri": self.uri,
            "mutual_tls": True,
            "generation": self.number,
            "sha256": self.bundle.sha256,
            "version": self.version,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "certificates": [c.describe() for c in self.bundle.all_certs],
            "warnings": [{"subject": w.subject, "problem": w.problem}
                         for w in self.bundle.warnings],
        }


def truststore_report(listener: str, gen: Generation) -> tuple[str, list[str]]:
    """What loading ``gen`` says to an operator: one summary line and a WARNING line per
    warning (the gateway returns its warnings on every create and update; so do ``run``,
    ``check-config`` and a SIGHUP reload)."""
    if gen.bundle is None:
        return f"listener {listener}: mutual TLS off", []
    bundle = gen.bundle
    summary = (f"truststore of {listener}: {gen.uri} version {gen.version or '-'} "
               f"(generation {gen.number}): {len(bundle.certs)} usable CAs, "
               f"{len(bundle.warnings)} warnings")
    return summary, [f"truststore of {listener}: WARNING {w}" for w in bundle.warnings]


def build_generation(listener: ListenerConfig, data: bytes | None,
                     now: float | None = None, version: str = "") -> Generation:
    """Parse and build everything; raises TruststoreError and leaves nothing half-built."""
    bundle = None
    if data is not None:
        try:
            bundle = parse_bundle(data, listener.mutual_tls.max_chain_length)
        except TruststoreError as exc:
            raise TruststoreError(f"{listener.mutual_tls.truststore_uri}: {exc}",
                                  key="mutual_tls.truststore_uri") from exc
    # Labelled listener/domain: session tickets and cached sessions never cross domains
    # (tls/native.py derives the ticket keys and the session id context from the label).
    contexts = build_server_contexts(listener.tls, bundle, listener.label,
                                     listener.mutual_tls.send_ca_names)
    return Generation(next(_generations), listener.mutual_tls.truststore_uri, bundle, contexts,
                      time.time() if now is None else now, version)


def fetch_generation(listener: ListenerConfig, source: Source | None = None
                     ) -> tuple[Generation, bytes | None]:
    """(generation, the truststore bytes); blocking: start-up and CLI only."""
    if not listener.mutual_tls.enabled:
        return build_generation(listener, None), None
    mtls = listener.mutual_tls
    source = source or make_source(mtls.truststore_uri, mtls.truststore_version)
    try:
        fetched = source.check(None)
    except TruststoreError as exc:
        raise TruststoreError(str(exc), key="mutual_tls.truststore_uri") from exc
    assert fetched is not None  # check(None) always fetches
    return build_generation(listener, fetched.data, version=fetched.version), fetched.data


class TruststoreHolder:
    """Holds one listener's current generation."""

    def __init__(self, initial: Generation) -> None:
        self.current = initial

    def swap(self, new: Generation) -> Generation:
        old, self.current = self.current, new
        return old

    def __repr__(self) -> str:
        g = self.current
        sha = g.bundle.sha256[:12] if g.bundle else "-"
        return f"<TruststoreHolder generation={g.number} uri={g.uri!r} sha256={sha}>"


class GenerationOwner:
    """The one writer of a listener's generation; see the rules at the top."""

    def __init__(self, config: ListenerConfig, initial: Generation) -> None:
        self.config = config  # the inputs the next build reads (a reload replaces them)
        self.holder = TruststoreHolder(initial)
        self.revocation: RevocationWatcher | None = None
        self.lock = asyncio.Lock()  # held by every change, and by a reload across listeners

    @property
    def name(self) -> str:
        """The listener, or ``listener/domain`` for a domain's owner (logs)."""
        return self.config.label

    @property
    def current(self) -> Generation:
        return self.holder.current

    def __repr__(self) -> str:
        return f"<GenerationOwner {self.name} {self.holder!r} locked={self.lock.locked()}>"

    def attach_revocation(self, watcher: RevocationWatcher | None) -> None:
        """Start-up and reload (the lock held or not yet needed): the CRLs ``watcher``
        has fetched, verified against the current bundle, or none."""
        self.revocation = watcher
        state = watcher.attach_state(self.current.bundle) if watcher is not None else None
        self.holder.swap(self.current.with_revocation(state))

    async def truststore_changed(self, data: bytes, version: str) -> Generation:
        """A new truststore version: a new generation built from it; raises TruststoreError
        and leaves the current one serving."""
        async with self.lock:
            gen = await run_build(build_generation, self.config, data, None, version)
            if self.revocation is not None:
                state = await run_build(self.revocation.attach_state, gen.bundle)
                gen = gen.with_revocation(state)
            old = self.holder.swap(gen)
            log.info("truststore of %s: generation %d -> %d (version %s, %d CAs)", self.name,
                     old.number, gen.number, version,
                     len(gen.bundle.certs) if gen.bundle else 0)
            dispose(old)
            del old
            return gen

    async def revocation_changed(self) -> None:
        """The CRLs changed (or one turned stale): the same contexts under a new number."""
        async with self.lock:
            watcher = self.revocation
            if watcher is None:
                return
            state = await run_build(watcher.attach_state, self.current.bundle)
            self.holder.swap(self.current.with_revocation(state))
            log.info("revocation state of %s updated (generation %d)", self.name,
                     self.current.number)

    async def server_certs_changed(self) -> None:
        """New server certificate files: contexts rebuilt around the bundle in use; raises
        (TruststoreError, ValueError, OSError) and leaves the current one serving."""
        async with self.lock:
            current = self.current
            contexts = await run_build(build_server_contexts, self.config.tls, current.bundle,
                                       self.name, self.config.mutual_tls.send_ca_names)
            # The replaced contexts hold the truststore's X509_STORE: freed off the loop.
            dispose(self.holder.swap(dataclasses.replace(
                current, number=next_generation_number(), contexts=contexts)))
