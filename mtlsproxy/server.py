"""Composition root: builds every part from a ``Config``, starts them, drains on SIGTERM.

Start order: truststores and contexts are built first (a bad one stops start-up before
anything listens), then the admin listener, then the proxy listeners; ``ready`` turns
true only when all are bound. Stop order is the reverse, with a bounded drain.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
from collections.abc import Callable
from typing import IO, Any

from prometheus_client import CollectorRegistry

from mtlsproxy.admin import AdminServer
from mtlsproxy.config import Config
from mtlsproxy.errors import TruststoreError
from mtlsproxy.identity.cache import ValidationCache
from mtlsproxy.listener import AccessLog, ListenerRuntime, utc_now
from mtlsproxy.metrics import Metrics, TruststoreMetrics
from mtlsproxy.truststore.holder import TruststoreHolder, fetch_generation
from mtlsproxy.truststore.sources import default_s3_client, make_source
from mtlsproxy.truststore.watcher import TruststoreWatcher
from mtlsproxy.upstream.pool import UpstreamPool

log = logging.getLogger("mtlsproxy")


class ProxyServer:
    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 clock: Callable[[], dt.datetime] = utc_now,
                 access_stream: IO[str] | None = None,
                 s3_client_factory: Callable[[], Any] = default_s3_client) -> None:
        """Builds everything that can fail (raises TruststoreError) without listening."""
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.cache = ValidationCache()
        self.pool = UpstreamPool(config.parser)
        self.access_log = AccessLog(access_stream) if config.access_log else None
        self.truststore_metrics = TruststoreMetrics(self.registry)
        self.listeners: list[ListenerRuntime] = []
        self.watchers: dict[str, TruststoreWatcher] = {}
        for i, lc in enumerate(config.listeners):
            mtls = lc.mutual_tls
            source = (make_source(mtls.truststore_uri, mtls.truststore_version,
                                  s3_client_factory) if mtls.enabled else None)
            try:
                generation, data = fetch_generation(lc, source)
            except TruststoreError as exc:
                raise TruststoreError(str(exc), f"listeners[{i}].{exc.key or 'tls'}") from exc
            runtime = ListenerRuntime(lc, TruststoreHolder(generation), self.metrics, self.pool,
                                      self.cache, config.parser, clock, self.access_log)
            self.listeners.append(runtime)
            if source is not None and data is not None:
                self.watchers[lc.name] = TruststoreWatcher(runtime, source,
                                                           self.truststore_metrics, data)
        self.admin: AdminServer | None = None
        if config.admin is not None:
            self.admin = AdminServer(config.admin.host, config.admin.port, self.registry,
                                     self.is_ready, self.describe_truststores)
        self.started = False
        self.draining = False
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        names = [lr.name for lr in self.listeners]
        return f"<ProxyServer listeners={names} ready={self.is_ready()}>"

    def is_ready(self) -> bool:
        return self.started and not self.draining and all(
            lr.server is not None and lr.server.is_serving() for lr in self.listeners)

    def describe_truststores(self) -> dict[str, Any]:
        out = {}
        for lr in self.listeners:
            entry = lr.holder.current.describe()
            watcher = self.watchers.get(lr.name)
            if watcher is not None:
                entry.update(watcher.describe())
            out[lr.name] = entry
        return out

    def listener(self, name: str) -> ListenerRuntime:
        return next(lr for lr in self.listeners if lr.name == name)

    async def start(self) -> None:
        if self.started:
            raise RuntimeError("ProxyServer.start() called twice")
        if self.admin is not None:
            await self.admin.start()
        for lr in self.listeners:
            await lr.start()
            log.info("listener %s on %s:%d", lr.name, lr.config.host, lr.bound_port)
        for watcher in self.watchers.values():
            watcher.start()
        self.started = True

    def request_stop(self) -> None:
        self._stop.set()

    async def drain(self) -> None:
        """Stop accepting, finish in-flight requests (bounded), then close everything."""
        self.draining = True
        for watcher in self.watchers.values():
            watcher.stop()
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
        try:
            if not self.started:
                await self.start()
            if on_ready is not None:
                on_ready()
            await self._stop.wait()
            log.info("draining (up to %.0fs)", self.config.drain_timeout)
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
