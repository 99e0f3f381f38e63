"""Server certificate and key hot reload (cert-manager renewals, kubelet ``..data`` swaps).

Every ``tls.reload_interval`` the listener's certificate and key files are hashed; when
they changed, new contexts are built off the event loop with the truststore in use and
swapped in as a new generation. A broken or mismatched pair (a renewal caught half
written) keeps the old contexts, is counted (``result="failed"``) and logged once per
distinct content; the next check tries again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from mtlsproxy.errors import TruststoreError
from mtlsproxy.runtime.background import dispose, run_build
from mtlsproxy.runtime.periodic import Periodic
from mtlsproxy.server.generation import next_generation_number
from mtlsproxy.tls.contexts import build_server_contexts

if TYPE_CHECKING:
    from mtlsproxy.config import ListenerConfig
    from mtlsproxy.server.listener import ListenerRuntime

log = logging.getLogger("mtlsproxy.tls")


class ServerCertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter("mtlsproxy_server_cert_reloads",
                               "Server certificate reloads by result: applied, failed.",
                               ["listener", "result"], registry=registry)
        self.not_after = Gauge("mtlsproxy_server_cert_not_after_timestamp_seconds",
                               "The earliest expiry among a listener's server certificates.",
                               ["listener"], registry=registry, multiprocess_mode="livemin")


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
    def __init__(self, rt: ListenerRuntime, metrics: ServerCertMetrics) -> None:
        self.rt = rt
        self.metrics = metrics
        self.digest = files_digest(rt.config)
        self._failed_digest: str | None = None
        metrics.reloads.labels(rt.name, "applied")
        metrics.reloads.labels(rt.name, "failed")
        metrics.not_after.labels(rt.name).set(earliest_not_after(rt.config))

    def __repr__(self) -> str:
        return f"<ServerCertWatcher {self.rt.name} digest={self.digest[:12]}>"

    def next_wait(self) -> float:
        return self.rt.config.tls.reload_interval

    async def refresh(self) -> str | None:
        """One check: ``applied``, ``failed`` or None (unchanged)."""
        loop = asyncio.get_running_loop()
        config = self.rt.config
        try:
            digest = await loop.run_in_executor(None, files_digest, config)
        except OSError as exc:
            return self._failed(f"unreadable: {exc}", None)
        if digest == self.digest:
            return None
        current = self.rt.holder.current
        try:
            contexts = await run_build(build_server_contexts, config.tls, current.bundle,
                                       config.name)
            not_after = await loop.run_in_executor(None, earliest_not_after, config)
        except (TruststoreError, ValueError, OSError) as exc:
            return self._failed(str(exc), digest)
        # The replaced contexts hold the truststore's X509_STORE: freed off the loop too.
        dispose(self.rt.holder.swap(dataclasses.replace(self.rt.holder.current,
                                                        number=next_generation_number(),
                                                        contexts=contexts)))
        self.digest = digest
        self.metrics.reloads.labels(self.rt.name, "applied").inc()
        self.metrics.not_after.labels(self.rt.name).set(not_after)
        log.info("server certificates of %s reloaded", self.rt.name)
        return "applied"

    def _failed(self, message: str, digest: str | None) -> str:
        self.metrics.reloads.labels(self.rt.name, "failed").inc()
        if digest is None or digest != self._failed_digest:
            log.warning("server certificates of %s not reloaded, the old ones keep serving: "
                        "%s", self.rt.name, message)
        self._failed_digest = digest
        return "failed"
