"""Server certificate and key hot reload (cert-manager renewals, kubelet ``..data`` swaps).

Every ``tls.reload_interval`` the listener's certificate and key files are hashed; when
they changed, the listener's generation owner (server/generation.py) builds new contexts
off the event loop around the truststore in use, and swaps them in as a new generation. A
broken or mismatched pair (a renewal caught half written) keeps the old contexts, is
counted (``result="failed"``) and logged once per distinct content; the next check tries
again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Protocol

from cryptography import x509

from mtlsproxy.config import ListenerConfig
from mtlsproxy.errors import TruststoreError
from mtlsproxy.metrics import ServerCertMetrics
from mtlsproxy.runtime.periodic import Periodic

log = logging.getLogger("mtlsproxy.tls")


class Owner(Protocol):
    """The listener's generation owner (server/generation.py): the one writer."""

    @property
    def config(self) -> ListenerConfig: ...
    async def server_certs_changed(self) -> None: ...


def files_digest(config: ListenerConfig) -> str:
    """Blocking: SHA-256 over every certificate and key file (OSError if unreadable)."""
    h = hashlib.sha256()
    for c in config.tls.certificates:
        h.update(c.cert_file.read_bytes())
        h.update(c.key_file.read_bytes())
    return h.hexdigest()


def earliest_not_after(config: ListenerConfig) -> float:
    times = [x509.load_pem_x509_certificate(c.cert_file.read_bytes()).not_valid_after_utc
             for c in config.tls.certificates]
    return min(times).timestamp()


class ServerCertWatcher(Periodic):
    def __init__(self, owner: Owner, metrics: ServerCertMetrics) -> None:
        self.owner = owner
        self.name = owner.config.label  # logs: the listener, or listener/domain
        self.labels = (owner.config.name, owner.config.domain)  # metrics
        self.metrics = metrics
        self.digest = files_digest(owner.config)
        self._failed_digest: str | None = None
        metrics.reloads.labels(*self.labels, "applied")
        metrics.reloads.labels(*self.labels, "failed")
        metrics.not_after.labels(*self.labels).set(earliest_not_after(owner.config))

    def __repr__(self) -> str:
        return f"<ServerCertWatcher {self.name} digest={self.digest[:12]}>"

    def next_wait(self) -> float:
        return self.owner.config.tls.reload_interval

    async def refresh(self) -> str | None:
        """One check: ``applied``, ``failed`` or None (unchanged)."""
        loop = asyncio.get_running_loop()
        config = self.owner.config
        try:
            digest = await loop.run_in_executor(None, files_digest, config)
        except OSError as exc:
            return self._failed(f"unreadable: {exc}", None)
        if digest == self.digest:
            return None
        try:
            await self.owner.server_certs_changed()
            not_after = await loop.run_in_executor(None, earliest_not_after, config)
        except (TruststoreError, ValueError, OSError) as exc:
            return self._failed(str(exc), digest)
        self.digest = digest
        self.metrics.reloads.labels(*self.labels, "applied").inc()
        self.metrics.not_after.labels(*self.labels).set(not_after)
        log.info("server certificates of %s reloaded", self.name)
        return "applied"

    def _failed(self, message: str, digest: str | None) -> str:
        self.metrics.reloads.labels(*self.labels, "failed").inc()
        if digest is None or digest != self._failed_digest:
            log.warning("server certificates of %s not reloaded, the old ones keep serving: "
                        "%s", self.name, message)
        self._failed_digest = digest
        return "failed"
