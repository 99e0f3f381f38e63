"""The current truststore generation of one listener; a swap is one assignment.

Everything a generation needs (bundle, contexts) is built completely before ``swap``;
readers take ``holder.current`` once per connection and keep that snapshot, so a swap can
never leave a connection with half of an old and half of a new truststore.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

from mtlsproxy.config import ListenerConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.revocation.crl import RevocationState
from mtlsproxy.tls.contexts import ServerContexts, build_server_contexts
from mtlsproxy.truststore.bundle import TrustBundle, parse_bundle
from mtlsproxy.truststore.sources import Source, make_source

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
    contexts = build_server_contexts(listener.tls, bundle, listener.name)
    return Generation(next(_generations), listener.mutual_tls.truststore_uri, bundle, contexts,
                      time.time() if now is None else now, version)


def load_generation(listener: ListenerConfig, source: Source | None = None) -> Generation:
    """Fetch the listener's truststore (if mutual TLS is on) and build a generation."""
    return fetch_generation(listener, source)[0]


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
