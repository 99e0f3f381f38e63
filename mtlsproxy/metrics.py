"""Every collector in one place, built on an injected ``CollectorRegistry``.

Names and labels are a public interface (dashboards and alerts depend on them): change
them only with a deprecation. No label ever carries a certificate subject or a client
address, so cardinality stays bounded.
"""

from __future__ import annotations

import platform
import ssl
from collections.abc import Iterator
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mtlsproxy.reasons import (
    ACCESS_TOKEN_RESULTS,
    H2_ERROR_KINDS,
    HANDSHAKE_FAILURE_REASONS,
    HEADER_DROP_REASONS,
    TUNNEL_KINDS,
)
from mtlsproxy.runtime.pacing import pace
from mtlsproxy.runtime.series import LATENCY_BUCKETS, RequestSeries

# Request latency buckets: a sidecar adds sub-millisecond latency; upstreams take longer.
# Connections, not requests: a database session lasts minutes or hours.
TCP_DURATION_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0)


_REQUESTS = ("mtlsproxy_requests", "HTTP requests answered, by status code.")
_DURATION = ("mtlsproxy_request_duration_seconds",
             "Time from a request head to the end of its response.")
# protocol: http1, or h2 (an HTTP/2 stream is a request).
_REQUEST_LABELS = ["listener", "route", "protocol", "code"]
_DURATION_LABELS = ["listener", "route", "protocol"]


class RequestCounts(Collector):
    """``mtlsproxy_requests_total`` and ``mtlsproxy_request_duration_seconds`` of one
    process, counted in plain ints and floats and turned into samples at scrape time.

    Why not prometheus-client's Counter and Histogram here: their ``inc`` and ``observe``
    take a lock each and the histogram walks its buckets in Python; on a keep-alive request
    that was a measurable share of its instructions (bench/instructions.py). Same names, labels
    and buckets. Only for a single process: with ``workers: N`` the samples must reach
    prometheus-client's multiprocess files, so ``Metrics`` uses its Counter and Histogram.
    Scrapes run on the event loop that counts, so no lock is needed.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], RequestSeries] = {}

    def series(self, listener: str, route: str, protocol: str = "http1") -> RequestSeries:
        """The counts of one (listener, route, protocol), created on first use: callers
        keep it, so a request costs no label lookup."""
        key = (listener, route, protocol)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = RequestSeries()
        return series

    def observe(self, listener: str, route: str, status: int, duration: float,
                protocol: str = "http1") -> None:
        self.series(listener, route, protocol).observe(status, duration)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(*_REQUESTS, labels=_REQUEST_LABELS),
                HistogramMetricFamily(*_DURATION, labels=_DURATION_LABELS)]

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*_REQUESTS, labels=_REQUEST_LABELS)
        for (listener, route, protocol), series in self._series.items():
            for status, count in series.codes.items():
                requests.add_metric([listener, route, protocol, str(status)], count)
        yield requests
        duration = HistogramMetricFamily(*_DURATION, labels=_DURATION_LABELS)
        bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for labels, series in self._series.items():
            cumulative, total = [], 0
            for bound, n in zip(bounds, series.buckets, strict=True):
                total += n
                cumulative.append((bound, total))
            duration.add_metric(list(labels), cumulative, series.sum)
        yield duration


class LocalValue:
    """One series of a ``LocalFamily``: a plain float, changed on the event loop only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class LocalFamily(Collector):
    """A counter or gauge of one process counted in plain floats, for the metrics that
    change on every connection (handshakes, cache lookups, open connections).

    Why: prometheus-client's ``inc`` is three Python calls and a lock, four of them per
    connection; replacing them, with the handshake timer moved to the ticker in the same
    change, cut the user CPU of a resumed connection (A/B, docs/performance.md).
    Same names, labels and samples
    (``test_local_families_expose_what_prometheus_client_would``).
    Single process only, like ``RequestCounts``; ``workers: N`` keep prometheus-client's.
    """

    def __init__(self, name: str, documentation: str, labelnames: list[str],
                 kind: Literal["counter", "gauge"], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.kind = kind
        self._children: dict[tuple[str, ...], LocalValue] = {}
        registry.register(self)

    def labels(self, *values: str) -> LocalValue:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = LocalValue()
        return child

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return cls(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry, multiprocess: bool = False) -> None:
        self.registry = registry
        self.handshakes: Counter | LocalFamily
        self.cert_cache: Counter | LocalFamily
        self.connections_active: Gauge | LocalFamily
        handshakes = ("mtlsproxy_tls_handshakes", "Completed TLS handshakes.",
                      ["listener", "resumed"])
        cert_cache = ("mtlsproxy_client_cert_cache",
                      "Client-certificate validation cache lookups.", ["result"])
        active = ("mtlsproxy_connections_active", "Open client connections.", ["listener"])
        if multiprocess:
            self.handshakes = Counter(*handshakes, registry=registry)
            self.cert_cache = Counter(*cert_cache, registry=registry)
            self.connections_active = Gauge(*active, registry=registry,
                                            multiprocess_mode="livesum")
        else:
            self.handshakes = LocalFamily(*handshakes, "counter", registry)
            self.cert_cache = LocalFamily(*cert_cache, "counter", registry)
            self.connections_active = LocalFamily(*active, "gauge", registry)
        self.handshake_failures = Counter(
            "mtlsproxy_tls_handshake_failures",
            "Client connections refused, in the TLS handshake or by the proxy's certificate "
            "policy after it, by reason (domain: a listener's domain, empty without domains).",
            ["listener", "domain", "reason"], registry=registry)
        self.request_counts: RequestCounts | None = None
        self.requests: Counter | None = None
        self.request_duration: Histogram | None = None
        if multiprocess:
            self.requests = Counter(*_REQUESTS, _REQUEST_LABELS, registry=registry)
            self.request_duration = Histogram(*_DURATION, _DURATION_LABELS,
                                              buckets=LATENCY_BUCKETS, registry=registry)
        else:
            self.request_counts = RequestCounts()
            registry.register(self.request_counts)
        self.upstream_errors = Counter(
            "mtlsproxy_upstream_errors", "Failures talking to an upstream, by kind.",
            ["upstream", "kind"], registry=registry)
        self.headers_dropped = Counter(
            "mtlsproxy_headers_dropped", "Request headers a client sent that never reached "
            "the upstream, by reason: underscore (headers_with_underscores: drop), identity "
            "(a certificate-identity header in any spelling), strip_headers (the listener's "
            "list), override (a header that rewrites the path or method).",
            ["listener", "reason"], registry=registry)
        self.h2_streams_active: Gauge | LocalFamily
        streams = ("mtlsproxy_h2_streams_active", "Open HTTP/2 streams from clients.",
                   ["listener"])
        if multiprocess:
            self.h2_streams_active = Gauge(*streams, registry=registry,
                                           multiprocess_mode="livesum")
        else:
            self.h2_streams_active = LocalFamily(*streams, "gauge", registry)
        self.h2_protocol_errors = Counter(
            "mtlsproxy_h2_protocol_errors", "HTTP/2 client connections ended by GOAWAY for "
            "abuse or a protocol error, by kind: rapid_reset, flood, header_size, "
            "frame_size, timeout, protocol.", ["listener", "kind"], registry=registry)
        self.tunnels_active: Gauge | LocalFamily
        tunnels = ("mtlsproxy_tunnels_active", "Open tunnels (a WebSocket after its 101, a "
                   "TCP-mode connection), by kind.", ["listener", "kind"])
        if multiprocess:
            self.tunnels_active = Gauge(*tunnels, registry=registry,
                                        multiprocess_mode="livesum")
        else:
            self.tunnels_active = LocalFamily(*tunnels, "gauge", registry)
        # TCP mode (listeners[].tcp): counted when a relayed connection ends; refusals are
        # mtlsproxy_tls_handshake_failures_total's, by reason, as for HTTP listeners.
        self.tcp_connections = Counter(
            "mtlsproxy_tcp_connections", "TCP-mode connections relayed to the upstream, "
            "counted when they end.", ["listener"], registry=registry)
        self.tcp_bytes = Counter(
            "mtlsproxy_tcp_bytes", "Bytes TCP-mode listeners relayed: received from "
            "clients (and sent upstream), sent to clients (received from upstream).",
            ["listener", "direction"], registry=registry)
        self.tcp_duration = Histogram(
            "mtlsproxy_tcp_connection_duration_seconds", "How long TCP-mode connections "
            "were relayed.", ["listener"], buckets=TCP_DURATION_BUCKETS, registry=registry)
        self.authorizer_requests = Counter(
            "mtlsproxy_authorizer_requests", "External authorizer calls by result: allow, "
            "deny, timeout, error.", ["route", "result"], registry=registry)
        self.access_tokens = Counter(
            "mtlsproxy_access_tokens", "Access tokens checked on routes with access_token "
            "(RFC 8705 certificate-bound JWTs), by result.", ["listener", "route", "result"],
            registry=registry)

    def declare_token_route(self, listener: str, route: str) -> None:
        """A route with access_token: its series at zero, so rates exist at once."""
        for result in ACCESS_TOKEN_RESULTS:
            self.access_tokens.labels(listener, route, result)

    def declare_listener(self, listener: str, domains: tuple[str, ...] = ("",),
                         tcp: bool = False) -> None:
        """Create the listener's series at zero, so rates exist before the first event."""
        self.connections_active.labels(listener)
        if tcp:
            self.tcp_connections.labels(listener)
            for direction in ("received", "sent"):
                self.tcp_bytes.labels(listener, direction)
            self.tcp_duration.labels(listener)
        for resumed in ("true", "false"):
            self.handshakes.labels(listener, resumed)
        for domain in domains:
            for reason in HANDSHAKE_FAILURE_REASONS:
                self.handshake_failures.labels(listener, domain, reason)
        for result in ("hit", "miss"):
            self.cert_cache.labels(result)
        for reason in HEADER_DROP_REASONS:
            self.headers_dropped.labels(listener, reason)
        self.h2_streams_active.labels(listener)
        for kind in TUNNEL_KINDS:
            self.tunnels_active.labels(listener, kind)
        for kind in H2_ERROR_KINDS:
            self.h2_protocol_errors.labels(listener, kind)


class TruststoreMetrics:
    """The truststore collectors (issue #3's public names), one instance per registry.

    Every series carries ``domain``: the listener's domain whose truststore it is, empty
    for a listener without domains (an empty label is no label to Prometheus, so the
    queries written before domains existed still select the same series)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "mtlsproxy_truststore_reloads", "Truststore refreshes by result: applied, "
            "unchanged, failed.", ["listener", "domain", "result"], registry=registry)
        self.info = Gauge(
            "mtlsproxy_truststore_info", "The truststore in use (value 1).",
            ["listener", "domain", "uri", "version", "sha256"], registry=registry,
            multiprocess_mode="livemax")
        self.certificates = Gauge(
            "mtlsproxy_truststore_certificates", "Usable CA certificates in the truststore.",
            ["listener", "domain"], registry=registry, multiprocess_mode="livemax")
        self.warnings = Gauge(
            "mtlsproxy_truststore_warnings", "Warnings of the truststore in use, re-evaluated "
            "on every refresh.", ["listener", "domain"], registry=registry,
            multiprocess_mode="livemax")
        self.last_success = Gauge(
            "mtlsproxy_truststore_last_success_timestamp_seconds",
            "When the truststore source was last checked successfully.", ["listener", "domain"],
            registry=registry, multiprocess_mode="livemax")
        self.cert_not_after = Gauge(
            "mtlsproxy_truststore_cert_not_after_timestamp_seconds",
            "Expiry of each usable truststore CA (one series per CA; a CA left out has a "
            "warning instead).",
            ["listener", "domain", "subject", "fingerprint_sha256"], registry=registry,
            multiprocess_mode="livemax")
        self._info_labels: dict[tuple[str, str], tuple[str, ...]] = {}
        self._cert_labels: dict[tuple[str, str], dict[tuple[str, str, str, str], float]] = {}

    def declare_listener(self, listener: str, domain: str = "") -> None:
        for result in ("applied", "unchanged", "failed"):
            self.reloads.labels(listener, domain, result)

    def publish(self, listener: str, uri: str, version: str, sha256: str,
                cas: list[tuple[str, str, float]], usable: int, warnings: int,
                now: float, domain: str = "") -> None:
        """Replace the listener's series with those of the truststore now in use.

        Only what changed is touched: a refresh that keeps most CAs (the usual update, or
        the daily re-analysis of the same bytes) costs a dict comparison, not the label
        handling of every CA."""
        key = (listener, domain)
        labels = (listener, domain, uri, version, sha256)
        old = self._info_labels.get(key)
        if old != labels:
            if old is not None:
                # With workers the sample lives on in the worker's file after remove():
                # zero it first, so only the truststore in use reads 1.
                self.info.labels(*old).set(0)
                self.info.remove(*old)
            self.info.labels(*labels).set(1)
            self._info_labels[key] = labels
        before = self._cert_labels.get(key, {})
        after = {(listener, domain, subject, fingerprint): not_after
                 for subject, fingerprint, not_after in cas}
        for cert_labels in before.keys() - after.keys():
            pace()
            # NaN, not 0, for the same reason: 0 would read as "expired in 1970" to alerts.
            self.cert_not_after.labels(*cert_labels).set(float("nan"))
            self.cert_not_after.remove(*cert_labels)
        for cert_labels, not_after in after.items():
            if before.get(cert_labels) != not_after:
                pace()
                self.cert_not_after.labels(*cert_labels).set(not_after)
        self._cert_labels[key] = after
        self.certificates.labels(listener, domain).set(usable)
        self.warnings.labels(listener, domain).set(warnings)
        self.last_success.labels(listener, domain).set(now)


class ServerCertMetrics:
    """Server certificate reloads (tls/server_certs.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter("mtlsproxy_server_cert_reloads",
                               "Server certificate reloads by result: applied, failed.",
                               ["listener", "domain", "result"], registry=registry)
        self.not_after = Gauge("mtlsproxy_server_cert_not_after_timestamp_seconds",
                               "The earliest expiry among a listener's (or domain's) server "
                               "certificates.",
                               ["listener", "domain"], registry=registry,
                               multiprocess_mode="livemin")


def crl_stale_gauge(registry: CollectorRegistry) -> Gauge:
    """1 per (listener, issuer) whose CRL is past its nextUpdate (revocation/watcher.py)."""
    return Gauge("mtlsproxy_crl_stale",
                 "1 when a CRL in use is past its nextUpdate (soft mode admits anyway).",
                 ["listener", "domain", "issuer"], registry=registry,
                 multiprocess_mode="livemax")


class ServerMetrics:
    """The process's own state: readiness and config reloads (server/proxy_server.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Set on every change of state, not computed at scrape time: a worker's value must
        # reach the multiprocess files. With workers: 1 only when every worker is ready.
        self.ready = Gauge(
            "mtlsproxy_ready", "1 while /readyz answers 200 (bound, loaded, not draining).",
            registry=registry, multiprocess_mode="livemin")
        self.config_reloads = Counter(
            "mtlsproxy_config_reloads",
            "Config file reloads (SIGHUP, or the file changed) by result.", ["result"],
            registry=registry)
        for result in ("applied", "failed"):  # at zero: increase() sees the first one
            self.config_reloads.labels(result)


def process_metrics(registry: CollectorRegistry, version: str, multiprocess: bool) -> None:
    """The standard process collectors and ``mtlsproxy_build_info``.

    ``process_*`` (CPU seconds, resident memory, open file descriptors, start time) and
    ``python_gc_*`` / ``python_info``: prometheus-client's own collectors, as every Python
    exporter has them. With ``workers: N`` they are left out: each scrape is answered by
    one worker, so its process figures would change with the worker that answered
    (prometheus-client's multiprocess mode does not aggregate them either)."""
    if not multiprocess:
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
    build = Gauge("mtlsproxy_build_info", "The running build (value 1): mtlsproxy's version, "
                  "the Python and OpenSSL it runs on.", ["version", "python", "openssl"],
                  registry=registry, multiprocess_mode="livemax")
    build.labels(version, platform.python_version(), ssl.OPENSSL_VERSION).set(1)
