"""Composition root: builds every part from a ``Config``, starts them, drains on SIGTERM.

Start order: truststores and contexts are built first (a bad one stops start-up before
anything listens), then the admin listener, then the proxy listeners; ``ready`` turns
true only when all are bound. Stop order is the reverse, with a bounded drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from prometheus_client import CollectorRegistry

from mtlsproxy import __version__
from mtlsproxy.admission.cache import ValidationCache
from mtlsproxy.config import Config, ListenerConfig, load_config
from mtlsproxy.errors import ConfigError, TruststoreError
from mtlsproxy.metrics import (
    Metrics,
    ServerCertMetrics,
    ServerMetrics,
    TruststoreMetrics,
    crl_stale_gauge,
    process_metrics,
)
from mtlsproxy.proxy.pool import UpstreamPool
from mtlsproxy.revocation.watcher import Prepared, RevocationWatcher
from mtlsproxy.runtime.background import run_build
from mtlsproxy.runtime.periodic import Periodic
from mtlsproxy.runtime.writes import WriteBatch
from mtlsproxy.server.admin import AdminServer
from mtlsproxy.server.config_watch import ConfigWatcher
from mtlsproxy.server.generation import (
    Generation,
    GenerationOwner,
    fetch_generation,
    truststore_report,
)
from mtlsproxy.server.listener import AccessLog, DomainRuntime, ListenerRuntime, utc_now
from mtlsproxy.server.workers import WorkerSettings
from mtlsproxy.tls.server_certs import ServerCertWatcher
from mtlsproxy.truststore.sources import default_s3_client, make_source
from mtlsproxy.truststore.watcher import TruststoreWatcher

log = logging.getLogger("mtlsproxy")


def warn_open_proxy_protocol(config: Config) -> None:
    """``proxy_protocol: true`` believes a PROXY header from whoever reaches the port (kept
    for compatibility): say so at start-up and on every reload that applies it. The peers
    restrict it too: nginx's set_real_ip_from, an ACL before HAProxy's accept-proxy."""
    for lc in config.listeners:
        if lc.proxy_protocol and lc.proxy_protocol_sources is None:
            log.warning("listener %s: proxy_protocol: true takes the client address from a "
                        "PROXY header sent by any peer that reaches the port; set "
                        "proxy_protocol.trusted_sources to the load balancer's CIDRs",
                        lc.name)


def _hard_crl_missing(lr: ListenerRuntime) -> bool:
    for domain in lr.domains:
        state = domain.holder.current.revocation
        if state is not None and state.mode == "hard" and state.missing:
            return True
    return False


def log_truststore(listener: str, gen: Generation) -> None:
    """The truststore's version and every warning, at start-up and at each reload."""
    summary, warnings = truststore_report(listener, gen)
    log.info("%s", summary)
    for line in warnings:
        log.warning("%s", line)


@dataclass(frozen=True, slots=True)
class _Built:
    """A listener's new truststore, built by a config reload before any is applied."""

    generation: Generation
    data: bytes | None
    source: Any
    prepared: Prepared | None  # its revocation state, when the listener keeps its CRLs


class ProxyServer:
    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 clock: Callable[[], dt.datetime] = utc_now,
                 access_stream: IO[str] | None = None,
                 s3_client_factory: Callable[[], Any] = default_s3_client,
                 worker: WorkerSettings | None = None) -> None:
        """Builds everything that can fail (raises TruststoreError) without listening.

        ``worker``: this process is one of ``workers: N`` (workers.py): ports are shared
        with SO_REUSEPORT and /metrics aggregates every worker's files."""
        self.worker = worker
        if worker is not None:
            config = worker.apply(config)
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, multiprocess=worker is not None)
        self.cache = ValidationCache()
        # One batch for every connection of this process: a pass's sends all go after
        # its reads (runtime/writes.py).
        self.writes = WriteBatch()
        self.pool = UpstreamPool(config.parser, writes=self.writes)
        self.access_log = AccessLog(access_stream) if config.access_log else None
        self.truststore_metrics = TruststoreMetrics(self.registry)
        self.s3_client_factory = s3_client_factory
        self.crl_stale = crl_stale_gauge(self.registry)
        self.server_cert_metrics = ServerCertMetrics(self.registry)
        process_metrics(self.registry, __version__, multiprocess=worker is not None)
        server_metrics = ServerMetrics(self.registry)
        self.ready_gauge = server_metrics.ready
        self.ready_gauge.set(0)
        self.cert_watchers: list[ServerCertWatcher] = []
        self.config_reloads = server_metrics.config_reloads
        # The config file followed without SIGHUP (a ConfigMap's ..data swap).
        self.config_watcher: ConfigWatcher | None = (
            ConfigWatcher(config.source, config.config_watch_interval, self.reload_from_file)
            if config.source is not None and config.config_watch_interval > 0 else None)
        self.clock = clock
        self.listeners: list[ListenerRuntime] = []
        # By (listener, domain): one per truststore (a listener's domains have their own).
        self.watchers: dict[tuple[str, str], TruststoreWatcher] = {}
        for i, lc in enumerate(config.listeners):
            owners: list[GenerationOwner] = []
            sources: list[tuple[Any, bytes | None]] = []
            for view in lc.domain_views():
                mtls = view.mutual_tls
                source = (make_source(mtls.truststore_uri, mtls.truststore_version,
                                      s3_client_factory) if mtls.enabled else None)
                try:
                    generation, data = fetch_generation(view, source)
                except TruststoreError as exc:
                    raise TruststoreError(
                        str(exc), f"listeners[{i}].{view.key(exc.key or 'tls')}") from exc
                owners.append(GenerationOwner(view, generation))
                sources.append((source, data))
            runtime = ListenerRuntime(lc, owners, self.metrics, self.pool,
                                      self.cache, config.parser, clock, self.access_log,
                                      worker=None if worker is None else worker.index,
                                      writes=self.writes)
            for owner, (source, data) in zip(owners, sources, strict=True):
                self._setup_revocation(owner)
                self.cert_watchers.append(ServerCertWatcher(owner, self.server_cert_metrics))
                if source is not None and data is not None:
                    self.watchers[lc.name, owner.config.domain] = TruststoreWatcher(
                        owner, source, self.truststore_metrics, data, clock)
            self.listeners.append(runtime)
        self.admin: AdminServer | None = None
        if config.admin is not None:
            self.admin = AdminServer(config.admin.host, config.admin.port,
                                     self._exposition_registry(), self._probe_ready,
                                     self.describe_truststores,
                                     reuse_port=worker is not None)
        self.started = False
        self.draining = False
        self._stop = asyncio.Event()

    def _exposition_registry(self) -> CollectorRegistry:
        """What /metrics shows: this registry, or with workers every worker's files."""
        if self.worker is None:
            return self.registry
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, self.worker.metrics_dir)
        return registry

    def _setup_revocation(self, owner: GenerationOwner) -> None:
        """Fetch the CRLs (blocking: start-up and reload only) and attach them."""
        if not owner.config.mutual_tls.revocation.crl_uris:
            return
        watcher = RevocationWatcher(owner, self.crl_stale, self.clock)
        watcher.fetch_first(owner.config.mutual_tls.revocation.first_fetch_timeout)
        owner.attach_revocation(watcher)

    def __repr__(self) -> str:
        names = [lr.name for lr in self.listeners]
        return f"<ProxyServer listeners={names} ready={self.is_ready()}>"

    def is_ready(self) -> bool:
        """Bound, serving, not draining, and no hard-mode listener without one of its CRLs
        (it would refuse every client: a load balancer should send them elsewhere)."""
        return self.started and not self.draining and all(
            lr.server is not None and lr.server.is_serving() and not _hard_crl_missing(lr)
            for lr in self.listeners)

    def _probe_ready(self) -> bool:
        """/readyz: the live answer, also kept in ``mtlsproxy_ready`` (readiness can change
        between start and drain: a hard-mode CRL that arrives or goes missing)."""
        ready = self.is_ready()
        self.ready_gauge.set(1 if ready else 0)
        return ready

    def describe_truststores(self) -> dict[str, Any]:
        """/truststore: by listener; a listener with domains lists each under
        ``domains``, by its label (the first of its names), the default first."""
        out: dict[str, Any] = {}
        for lr in self.listeners:
            entries = {}
            for domain in lr.domains:
                entry = domain.holder.current.describe()
                watcher = self.watchers.get((lr.name, domain.label))
                if watcher is not None:
                    entry.update(watcher.describe())
                entries[domain.label] = entry
            if lr.config.domains:
                out[lr.name] = {"domains": entries}
            else:
                out[lr.name] = entries[""]
        return out

    def listener(self, name: str) -> ListenerRuntime:
        return next(lr for lr in self.listeners if lr.name == name)

    async def start(self) -> None:
        if self.started:
            raise RuntimeError("ProxyServer.start() called twice")
        if self.admin is not None:
            await self.admin.start()
            log.info("admin on %s:%d", self.admin.host, self.admin.bound_port)
        warn_open_proxy_protocol(self.config)
        for lr in self.listeners:
            for domain in lr.domains:
                log_truststore(domain.config.label, domain.holder.current)
        for lr in self.listeners:
            await lr.start()
            log.info("listener %s on %s:%d", lr.name, lr.config.host, lr.bound_port)
        for periodic in self._periodics():
            periodic.start()
        self.started = True
        self.ready_gauge.set(1 if self.is_ready() else 0)

    def _periodics(self) -> list[Periodic]:
        """Every refresh loop: truststores, CRLs (these change on reload), server certs,
        the config file."""
        return [*self.watchers.values(),
                *(d.owner.revocation for lr in self.listeners for d in lr.domains
                  if d.owner.revocation is not None),
                *self.cert_watchers,
                *([self.config_watcher] if self.config_watcher is not None else [])]

    # -- SIGHUP: re-read the config file --------------------------------------------------

    def _not_live(self, new: Config) -> list[str]:
        """What a reload cannot change without dropping connections."""
        problems = []
        old_l = [(lc.name, lc.host, lc.port) for lc in self.config.listeners]
        new_l = [(lc.name, lc.host, lc.port) for lc in new.listeners]
        if old_l != new_l:
            problems.append("listeners: names and addresses cannot change without a restart")
        if self.config.admin != new.admin:
            problems.append("admin.address: cannot change without a restart")
        if [lc.proxy_protocol for lc in self.config.listeners] != [
                lc.proxy_protocol for lc in new.listeners]:
            problems.append("listeners[].proxy_protocol: cannot change without a restart")
        if self.config.parser != new.parser:
            problems.append("parser: cannot change without a restart")
        if self.config.workers != new.workers:
            problems.append("workers: cannot change without a restart")
        if [lc.tcp is None for lc in self.config.listeners] != [
                lc.tcp is None for lc in new.listeners]:
            problems.append("listeners[].tcp: a listener cannot switch between routes and "
                            "TCP mode without a restart")
        for i, (old_lc, new_lc) in enumerate(
                zip(self.config.listeners, new.listeners, strict=False)):
            if [d.label for d in old_lc.domain_views()] != [
                    d.label for d in new_lc.domain_views()]:
                problems.append(f"listeners[{i}].domains: domains cannot be added, removed "
                                "or renamed (their first names) without a restart")
        return problems

    async def reload_from_file(self) -> list[str]:
        """Re-read ``config.source``; apply what can change live. Returns the problems
        (empty when applied); on any problem the old config keeps running."""
        loop = asyncio.get_running_loop()
        if self.config.source is None:
            return ["(config file): this server was not started from a file"]
        try:
            new = await loop.run_in_executor(None, load_config, self.config.source)
        except ConfigError as exc:
            return self._reload_failed(exc.problems)
        if self.worker is not None:
            new = self.worker.apply(new)
        if self.config_watcher is not None:
            self.config_watcher.seen()  # what SIGHUP loaded is no change for the watcher
        return await self.reload(new)

    def _reload_failed(self, problems: list[str]) -> list[str]:
        self.config_reloads.labels("failed").inc()
        for p in problems:
            log.error("config reload refused, old config stays: %s", p)
        return problems

    async def reload(self, new: Config) -> list[str]:
        problems = self._not_live(new)
        if problems:
            return self._reload_failed(problems)
        # Every listener's generation stays still from the first build to the last apply:
        # a watcher's change waits, then builds from what the reload installed.
        async with contextlib.AsyncExitStack() as held:
            for lr in self.listeners:
                for domain in lr.domains:
                    await held.enter_async_context(domain.owner.lock)
            return await self._reload_held(new)

    async def _reload_held(self, new: Config) -> list[str]:
        problems: list[str] = []
        # Build every new truststore generation first; apply nothing unless all succeed.
        built: dict[tuple[str, str], _Built] = {}
        for i, (lr, lc) in enumerate(zip(self.listeners, new.listeners, strict=True)):
            for domain, view in zip(lr.domains, lc.domain_views(), strict=True):
                old = domain.config
                if (old.mutual_tls.truststore_uri, old.mutual_tls.truststore_version, old.tls,
                        old.mutual_tls.max_chain_length, old.mutual_tls.send_ca_names) == (
                        view.mutual_tls.truststore_uri, view.mutual_tls.truststore_version,
                        view.tls, view.mutual_tls.max_chain_length,
                        view.mutual_tls.send_ca_names):
                    continue
                mtls = view.mutual_tls
                source = (make_source(mtls.truststore_uri, mtls.truststore_version,
                                      self.s3_client_factory) if mtls.enabled else None)
                try:
                    generation, data = await run_build(fetch_generation, view, source)
                except TruststoreError as exc:
                    problems.append(f"listeners[{i}].{view.key(exc.key or 'tls')}: {exc}")
                    continue
                prepared = None
                revocation = domain.owner.revocation
                if revocation is not None and old.mutual_tls.revocation == mtls.revocation:
                    # The CRLs the domain keeps, verified against the new bundle on the
                    # build thread too (a long CRL would stall the loop: performance.md).
                    prepared = await run_build(revocation.prepare, generation.bundle)
                built[lc.name, view.domain] = _Built(generation, data, source, prepared)
        if problems:
            return self._reload_failed(problems)
        for lr, lc in zip(self.listeners, new.listeners, strict=True):
            olds = [d.config for d in lr.domains]
            lr.apply_config(lc)
            for domain, old in zip(lr.domains, olds, strict=True):
                self._apply(domain, old, built.get((lc.name, domain.label)))
        self.config = new
        warn_open_proxy_protocol(new)
        self.config_reloads.labels("applied").inc()
        log.info("config reloaded from %s", new.source)
        return []

    def _apply(self, domain: DomainRuntime, old: ListenerConfig, built: _Built | None) -> None:
        """A domain's new truststore, CRLs and policy (its config is applied already)."""
        lc, owner, holder = domain.config, domain.owner, domain.holder
        old_revocation = old.mutual_tls.revocation
        old_intermediates = old.mutual_tls.client_intermediates
        if old_revocation != lc.mutual_tls.revocation:
            if owner.revocation is not None:
                owner.revocation.stop()
            watcher = None
            if lc.mutual_tls.revocation.crl_uris:
                watcher = RevocationWatcher(owner, self.crl_stale, self.clock)
                if self.started:
                    watcher.start()
                    asyncio.get_running_loop().create_task(watcher.refresh())
            if watcher is None:
                owner.attach_revocation(None)  # no CRLs: verdicts decided again without
            else:
                owner.revocation = watcher  # its first refresh installs its CRLs
        if built is None:
            if (old_revocation == lc.mutual_tls.revocation
                    and old_intermediates != lc.mutual_tls.client_intermediates):
                # Verdicts are cached per generation number: a new one decides them all
                # again under the new mode; the contexts (and session tickets) are kept.
                holder.swap(holder.current.renumbered())
            return
        generation, data, source = built.generation, built.data, built.source
        if owner.revocation is not None:
            # A new watcher (the revocation config changed) has fetched nothing yet: its
            # state is empty and cheap; a kept one takes what the build thread prepared.
            generation = generation.with_revocation(
                owner.revocation.attach_state(generation.bundle, built.prepared))
        holder.swap(generation)
        log_truststore(lc.label, generation)
        key = (lc.name, lc.domain)
        old_watcher = self.watchers.pop(key, None)
        if old_watcher is not None:
            old_watcher.stop()
        if source is not None and data is not None:
            truststore_watcher = TruststoreWatcher(owner, source, self.truststore_metrics,
                                                   data, self.clock)
            self.watchers[key] = truststore_watcher
            if self.started:
                truststore_watcher.start()

    def request_stop(self) -> None:
        self._stop.set()

    async def drain(self) -> None:
        """Stop accepting, finish in-flight requests (bounded), then close everything."""
        self.draining = True
        self.ready_gauge.set(0)
        for periodic in self._periodics():
            periodic.stop()
        for lr in self.listeners:
            lr.stop_accepting()
            lr.begin_drain()
        results = await asyncio.gather(*(lr.wait_drained(self.config.drain_timeout)
                                          for lr in self.listeners))
        if not all(results):
            log.warning("drain timeout: connections still open were closed")
        self.pool.close_all()
        if self.access_log is not None:
            self.access_log.flush()
        if self.admin is not None:
            self.admin.close()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT (or ``request_stop``), then drain.

        Signal handlers go in first, so a signal never finds the default handler once the
        caller has been told (``on_ready``) that we serve.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        reloads: set[asyncio.Task[list[str]]] = set()

        def on_hup() -> None:
            task = loop.create_task(self.reload_from_file())
            reloads.add(task)
            task.add_done_callback(reloads.discard)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            if not self.started:
                await self.start()
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            log.info("draining (up to %.0fs)", self.config.drain_timeout)
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
