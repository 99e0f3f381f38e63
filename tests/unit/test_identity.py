"""The sans-IO identity core: policy, path building, cache, headers, routing, failure
labels, pool bookkeeping and metric names. No sockets."""

from __future__ import annotations

import base64
import datetime as dt
import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client import CollectorRegistry

from mtlsproxy.admission.cache import ValidationCache, Verdict
from mtlsproxy.admission.policy import build_path, check_chain
from mtlsproxy.config import RouteConfig, Upstream, parse_upstream
from mtlsproxy.http.parser import HttptoolsRequestParser, HttptoolsResponseParser, Request
from mtlsproxy.http.wire import error_response, upstream_request_head
from mtlsproxy.identity.algorithms import algorithm_problem
from mtlsproxy.identity.headers import header_block, is_identity_header, render, safe_value
from mtlsproxy.identity.peer import read_identity
from mtlsproxy.metrics import Metrics
from mtlsproxy.proxy.pool import UpstreamPool
from mtlsproxy.proxy.routing import Router
from mtlsproxy.proxy.upstream import UpstreamConnection, UpstreamState
from mtlsproxy.reasons import HANDSHAKE_FAILURE_REASONS as REASONS
from mtlsproxy.tls.failures import classify
from mtlsproxy.truststore.bundle import parse_bundle
from tests.support.pki import PKI, UTC, make_cert

# -- policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("key, ok", [
    (lambda: ec.generate_private_key(ec.SECP256R1()), True),
    (lambda: ec.generate_private_key(ec.SECP384R1()), True),
    (lambda: rsa.generate_private_key(65537, 2048), True),
    (lambda: ec.generate_private_key(ec.SECP521R1()), False),
    (lambda: ed25519.Ed25519PrivateKey.generate(), False),
])
def test_algorithm_policy_follows_the_model(pki: PKI, key: object, ok: bool) -> None:
    cert = make_cert("k", pki.inter, key=key())  # type: ignore[operator]
    assert (algorithm_problem(cert.cert) is None) == ok


def test_chain_length_counts_leaf_to_root(pki: PKI) -> None:
    leaf = pki.client.cert
    chain = [pki.inter.cert, pki.root.cert]
    assert check_chain(leaf, chain, 3) is None
    assert check_chain(leaf, chain, 2) == "chain_too_long"


def test_path_is_rebuilt_from_the_truststore(pki: PKI) -> None:
    bundle = parse_bundle(pki.truststore.read_bytes())
    path = build_path(pki.client.cert, bundle)
    assert path == [pki.inter.cert, pki.root.cert]


def test_no_path_without_the_issuer(pki: PKI) -> None:
    bundle = parse_bundle(pki.truststore.read_bytes())
    stranger = make_cert("x", make_cert("Other CA", ca=True))
    assert build_path(stranger.cert, bundle) is None


def test_verdict_rechecks_the_clock(pki: PKI) -> None:
    identity = read_identity(pki.client.der, [pki.inter.der, pki.root.der])
    v = Verdict(1, None, identity, (), identity.valid_from, identity.valid_until)
    now = dt.datetime.now(UTC)
    assert v.reason_at(now) is None
    assert v.reason_at(now + dt.timedelta(days=400)) == "expired"
    assert v.reason_at(now - dt.timedelta(days=400)) == "not_yet_valid"


def test_admits_agrees_with_reason_at_on_both_bounds_and_a_refusal(pki: PKI) -> None:
    identity = read_identity(pki.client.der, [pki.inter.der, pki.root.der])
    ok = Verdict(1, None, identity, (), identity.valid_from, identity.valid_until)
    bad = Verdict(1, "untrusted", identity, (), identity.valid_from, identity.valid_until)
    second = dt.timedelta(seconds=1)
    for now in (identity.valid_from - second, identity.valid_from,
                identity.valid_until, identity.valid_until + second):
        for v in (ok, bad):
            assert v.admits(now) is (v.reason_at(now) is None), (v.reason, now)
    assert ok.admits(identity.valid_until) and not ok.admits(identity.valid_until + second)


def test_the_verified_chain_is_read_on_a_cache_miss_only(pki: PKI) -> None:
    from mtlsproxy.admission.verify import cached_verdict
    from mtlsproxy.config import MutualTLSConfig
    bundle = parse_bundle(pki.truststore.read_bytes())
    cache, asked = ValidationCache(), []

    def chain() -> list[bytes]:
        asked.append(1)
        return [pki.client.der, pki.inter.der, pki.root.der]
    first, hit = cached_verdict(cache, pki.client.der, chain, bundle, 1, MutualTLSConfig())
    assert not hit and first.reason is None and asked == [1]
    again, hit = cached_verdict(cache, pki.client.der, chain, bundle, 1, MutualTLSConfig())
    assert hit and again is first and asked == [1]


def test_cache_is_bounded_lru() -> None:
    cache = ValidationCache(max_entries=2)
    v = Verdict(1, None, None, (), dt.datetime.now(UTC), dt.datetime.now(UTC))
    cache.put((b"a", 1, "ignore"), v)
    cache.put((b"b", 1, "ignore"), v)
    assert cache.get((b"a", 1, "ignore")) is v  # a is now the most recent
    cache.put((b"c", 1, "ignore"), v)
    assert cache.get((b"b", 1, "ignore")) is None and len(cache) == 2
    assert repr(cache) == "<ValidationCache entries=2 max=2>"


# -- headers ------------------------------------------------------------------------------

def test_rfc9440_values_are_byte_sequences(pki: PKI) -> None:
    identity = read_identity(pki.client.der, [pki.inter.der])
    headers = dict(render(identity, ["rfc9440"]))
    assert headers[b"Client-Cert"] == b":" + base64.b64encode(pki.client.der) + b":"
    assert headers[b"Client-Cert-Chain"] == b":" + base64.b64encode(pki.inter.der) + b":"


def test_header_values_cannot_carry_control_characters() -> None:
    assert safe_value("CN=evil\r\nX-Admin: 1") == b"CN=evil\\0D\\0AX-Admin: 1"
    assert safe_value("CN=caf\u00e9") == b"CN=caf\\C3\\A9"


def test_xfcc_quotes_values_with_separators(pki: PKI) -> None:
    cert = make_cert("a;b", pki.inter, uris=("spiffe://x/a,b",))
    identity = read_identity(cert.der, [pki.inter.der])
    (xfcc,) = [v for n, v in render(identity, ["xfcc"])]
    assert b'URI="spiffe://x/a,b"' in xfcc
    assert b'Subject="CN=a\\\\;b,O=mtlsproxy tests"' in xfcc


@pytest.mark.parametrize("name, spoofable", [
    (b"client-cert", True), (b"client-cert-chain", True), (b"x-forwarded-client-cert", True),
    (b"x-client-cert-subject", True), (b"x-client-cert-anything", True),
    (b"Client_Cert", True), (b"X_SSL_CLIENT_S_DN", True), (b"x-ssl", True),
    (b"ssl-client-verify", True), (b"x-amzn-mtls-clientcert-leaf", True),
    (b"x-sslx", False), (b"x-forwarded-for", False), (b"authorization", False),
    (b"x-client", False)])
def test_identity_header_names_in_every_spelling(name: bytes, spoofable: bool) -> None:
    assert is_identity_header(name) is spoofable


def test_upstream_head_drops_client_identity_and_reframes() -> None:
    (req, *_) = HttptoolsRequestParser().feed(
        b"POST /x HTTP/1.1\r\nhost: h\r\nclient-cert: :x:\r\ntransfer-encoding: chunked\r\n"
        b"x-client-cert-subject: CN=admin\r\nconnection: x-drop\r\nx-drop: 1\r\n"
        b"x-ok: 1\r\n\r\n")
    assert isinstance(req, Request)
    head = upstream_request_head(req, b"/x", "127.0.0.9",
                                 header_block([(b"Client-Cert", b":real:")]))
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /x HTTP/1.1"
    assert b"client-cert: :x:" not in head and b"CN=admin" not in head and b"x-drop" not in head
    assert b"Client-Cert: :real:" in lines and b"x-ok: 1" in lines
    assert b"x-forwarded-for: 127.0.0.9" in lines
    assert head.count(b"transfer-encoding: chunked") == 1
    assert head.endswith(b"\r\n\r\n")


def test_error_responses_are_small_json() -> None:
    raw = error_response(403, "expired")
    head, body = raw.split(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"connection: close" in head
    assert body == b'{"message":"Forbidden","reason":"expired"}'


# -- routing ----------------------------------------------------------------------------

def _route(prefix: str, host: str | None = None, strip: bool = False,
           upstream: str = "http://u:1") -> RouteConfig:
    return RouteConfig(prefix, parse_upstream(upstream), host, strip)


def test_host_specific_route_beats_a_generic_one_of_equal_length() -> None:
    router = Router((_route("/a"), _route("/a", host="api.test", upstream="http://v:2")))
    match = router.match(b"api.test:443", b"/a/b")
    assert match is not None and match[0].upstream.host == "v"
    match = router.match(b"other.test", b"/a/b")
    assert match is not None and match[0].upstream.host == "u"


@pytest.mark.parametrize("routes, host, target, upstream, new_target", [
    ((_route("/"),), b"h", b"/x/y?q=1", "u", b"/x/y?q=1"),
    ((_route("/", upstream="http://u:1/base"),), b"h", b"/x?q", "u", b"/base/x?q"),
    ((_route("/api", strip=True, upstream="http://v:2/v1"), _route("/")), b"h", b"/api?q=1",
     "v", b"/v1/?q=1"),
    ((_route("/api", strip=True), _route("/")), b"h", b"/api/users/7?x=%20", "u",
     b"/users/7?x=%20"),
    ((_route("/api", upstream="http://v:2"), _route("/")), b"h", b"/apix", "u", b"/apix"),
    ((_route("/api", host="a.test", upstream="http://v:2"), _route("/")), b"A.Test:8443",
     b"/api/1", "v", b"/api/1"),
    ((_route("/api", host="a.test", upstream="http://v:2"), _route("/")), b"", b"/api/1",
     "u", b"/api/1"),
])
def test_routes_rewrite_the_target_by_prefix_base_path_and_host(
        routes: tuple[RouteConfig, ...], host: bytes, target: bytes, upstream: str,
        new_target: bytes) -> None:
    match = Router(routes).match(host, target)
    assert match is not None
    assert match[0].upstream.host == upstream and match[1] == new_target


def test_no_route_for_absolute_form_targets() -> None:
    assert Router((_route("/"),)).match(b"h", b"http://evil/") is None


def test_upstream_urls_are_validated() -> None:
    assert parse_upstream("http://127.0.0.1:8080/base/") == Upstream("http", "127.0.0.1", 8080,
                                                                     "/base")
    assert parse_upstream("https://x").port == 443
    assert parse_upstream("unix:/run/app.sock").key == "unix:/run/app.sock"
    assert parse_upstream("unix:///run/app.sock").unix_path == "/run/app.sock"
    for bad in ("ftp://x", "http://", "http://x:0", "http://u:p@x", "http://x/?q=1",
                "unix:run/app.sock", "unix:"):
        with pytest.raises(ValueError):
            parse_upstream(bad)


# -- failure labels ----------------------------------------------------------------------

def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError("CERTIFICATE_VERIFY_FAILED")
    exc.verify_code = code
    return exc


@pytest.mark.parametrize("code, reason", [(10, "expired"), (9, "not_yet_valid"),
                                          (18, "untrusted"), (20, "untrusted"),
                                          (2, "untrusted"), (7, "bad_signature"),
                                          (66, "weak_algorithm"), (68, "weak_algorithm"),
                                          (26, "unsupported_purpose"), (22, "chain_too_long")])
def test_verify_codes_map_to_reasons(code: int, reason: str) -> None:
    assert classify(_verify_error(code)) == reason


def test_every_label_is_in_the_bounded_set() -> None:
    samples: list[BaseException] = [TimeoutError(), ConnectionResetError(), ssl.SSLError(),
                                    _verify_error(999)]
    for exc in samples:
        assert classify(exc) in REASONS


# -- pool bookkeeping -------------------------------------------------------------------

class _Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def _conn(state: UpstreamState) -> UpstreamConnection:
    conn = UpstreamConnection("u:1", HttptoolsResponseParser())
    conn.state = state
    return conn


def test_pool_hands_out_the_newest_idle_connection_and_drops_stale_ones() -> None:
    clock = _Clock()
    pool = UpstreamPool(idle_timeout=30, clock=clock)
    old, new = _conn(UpstreamState.ACTIVE), _conn(UpstreamState.ACTIVE)
    pool.release(old, reusable=True)
    clock.now = 120.0
    pool.release(new, reusable=True)
    assert pool.take_idle("u:1") is new and new.state is UpstreamState.ACTIVE
    clock.now = 140.0  # old has idled 40 s, over the 30 s timeout
    assert pool.take_idle("u:1") is None and old.state is UpstreamState.CLOSED


def test_pool_does_not_keep_non_reusable_connections() -> None:
    pool = UpstreamPool()
    conn = _conn(UpstreamState.ACTIVE)
    pool.release(conn, reusable=False)
    assert conn.state is UpstreamState.CLOSED and pool.take_idle("u:1") is None


def test_upstream_state_transitions_are_checked() -> None:
    conn = _conn(UpstreamState.CLOSED)
    with pytest.raises(RuntimeError):
        conn.set_state(UpstreamState.ACTIVE)


# -- metric names (public interface) ------------------------------------------------------

def test_metric_names_are_the_public_ones() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.declare_listener("public")
    assert metrics.request_counts is not None
    metrics.request_counts.observe("public", "/", 200, 0.01)
    metrics.upstream_errors.labels("u:1", "timeout").inc()
    names = {s.name for m in registry.collect() for s in m.samples}
    for name in ("mtlsproxy_tls_handshakes_total", "mtlsproxy_tls_handshake_failures_total",
                 "mtlsproxy_requests_total", "mtlsproxy_request_duration_seconds_bucket",
                 "mtlsproxy_upstream_errors_total", "mtlsproxy_connections_active",
                 "mtlsproxy_client_cert_cache_total"):
        assert name in names, name
    labels = {tuple(sorted(s.labels)) for m in registry.collect() for s in m.samples
              if s.name == "mtlsproxy_tls_handshake_failures_total"}
    # domain: "" for a listener without domains (no label at all to Prometheus).
    assert labels == {("domain", "listener", "reason")}
    for reason in ("no_client_certificate", "untrusted", "expired", "not_yet_valid",
                   "bad_signature", "weak_algorithm", "chain_too_long",
                   "unsupported_purpose", "protocol", "timeout", "other"):
        assert registry.get_sample_value("mtlsproxy_tls_handshake_failures_total",
                                         {"listener": "public", "domain": "",
                                          "reason": reason}) == 0


def test_readyz_is_503_until_started_and_while_draining() -> None:
    from mtlsproxy.server.admin import AdminServer
    state = {"ready": False}
    admin = AdminServer("127.0.0.1", 0, CollectorRegistry(), lambda: state["ready"], dict)
    assert admin.respond("GET", "/readyz")[0] == 503
    state["ready"] = True
    assert admin.respond("GET", "/readyz")[0] == 200
    assert admin.respond("GET", "/healthz")[0] == 200
    assert admin.respond("POST", "/metrics")[0] == 405
    assert admin.respond("GET", "/nope")[0] == 404


def test_coalescing_cache_shares_one_call_and_never_hangs_waiters() -> None:
    import asyncio

    from mtlsproxy.runtime.coalesce import CoalescingCache

    async def scenario() -> None:
        clock = _Clock()
        cache: CoalescingCache[str, int] = CoalescingCache(clock, max_entries=2)
        calls = 0

        async def compute() -> tuple[int, float]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            return calls, 10.0
        assert await asyncio.gather(*(cache.get("a", compute) for _ in range(5))) == [1] * 5
        clock.now += 11  # expired
        assert await cache.get("a", compute) == 2

        async def boom() -> tuple[int, float]:
            await asyncio.sleep(0.01)
            raise ValueError("down")
        results = await asyncio.gather(*(cache.get("b", boom) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        await cache.get("c", compute)
        await cache.get("d", compute)
        assert len(cache._cache) <= 2  # bounded
    asyncio.run(scenario())


def test_header_actions_are_memoised_within_a_bound_and_still_applied() -> None:
    from mtlsproxy.http.header_rules import HeaderRules
    rules = HeaderRules()
    parser = HttptoolsRequestParser()
    for i in range(1500):  # names a client chooses must not grow memory without bound
        (req, *_) = parser.feed(b"GET / HTTP/1.1\r\nhost: h\r\nx-n-%d: v\r\n"
                                b"x-client-cert-subject: CN=admin\r\n"
                                b"x-n_%d: v\r\n\r\n" % (i, i))
        assert isinstance(req, Request)
        head = upstream_request_head(req, b"/", "127.0.0.1", b"", rules)
        assert b"x-n-%d: v\r\n" % i in head and b"CN=admin" not in head
        assert b"x-n_%d" % i not in head  # past the bound too: decided, just not memoised
    assert len(rules.actions) <= 1024 and len(rules.plain) <= 1024


def test_request_counts_expose_what_prometheus_clients_histogram_would() -> None:
    """The single-process request metrics are counted by hand (RequestCounts); their
    samples must be exactly those of prometheus-client's Counter and Histogram."""
    from prometheus_client import Counter, Histogram

    from mtlsproxy.runtime.series import LATENCY_BUCKETS
    ours = CollectorRegistry()
    metrics = Metrics(ours)
    assert metrics.request_counts is not None and metrics.requests is None
    theirs = CollectorRegistry()
    counter = Counter("mtlsproxy_requests", "x", ["listener", "route", "protocol", "code"],
                      registry=theirs)
    hist = Histogram("mtlsproxy_request_duration_seconds", "x",
                     ["listener", "route", "protocol"], buckets=LATENCY_BUCKETS,
                     registry=theirs)
    durations = [0.0001, 0.0005, 0.00051, 0.001, 0.2, 0.5, 59.9, 60.0, 61.0, 1e9]
    for i, d in enumerate(durations):
        route, code = ("/" if i % 3 else "/api"), (200 if i % 4 else 502)
        metrics.request_counts.observe("public", route, code, d)
        counter.labels("public", route, "http1", str(code)).inc()
        hist.labels("public", route, "http1").observe(d)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                     float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for m in registry.collect() for s in m.samples
                if s.name.startswith("mtlsproxy_request") and not s.name.endswith("_created")}
    expected = samples(theirs)
    assert samples(ours) == expected and len(expected) == 2 * 2 + 2 * (len(LATENCY_BUCKETS) + 3)


def test_workers_count_requests_with_prometheus_clients_multiprocess_values() -> None:
    metrics = Metrics(CollectorRegistry(), multiprocess=True)
    assert metrics.request_counts is None
    assert metrics.requests is not None and metrics.request_duration is not None
    # The per-connection families too: prometheus-client's files, not plain floats.
    from prometheus_client import Counter, Gauge
    assert isinstance(metrics.handshakes, Counter) and isinstance(metrics.cert_cache, Counter)
    assert isinstance(metrics.connections_active, Gauge)


def test_local_families_expose_what_prometheus_client_would() -> None:
    """Handshakes, cache lookups and open connections are counted in plain floats in one
    process (LocalFamily); their samples must be exactly prometheus-client's."""
    from prometheus_client import Counter, Gauge

    from mtlsproxy.metrics import LocalFamily
    ours = CollectorRegistry()
    metrics = Metrics(ours)
    assert isinstance(metrics.handshakes, LocalFamily)
    theirs = CollectorRegistry()
    handshakes = Counter("mtlsproxy_tls_handshakes", "x", ["listener", "resumed"],
                         registry=theirs)
    cache = Counter("mtlsproxy_client_cert_cache", "x", ["result"], registry=theirs)
    active = Gauge("mtlsproxy_connections_active", "x", ["listener"], registry=theirs)
    metrics.declare_listener("public")
    for resumed in ("true", "false"):
        handshakes.labels("public", resumed)
    for result in ("hit", "miss"):
        cache.labels(result)
    for i in range(7):
        resumed = "true" if i % 3 else "false"
        metrics.handshakes.labels("public", resumed).inc()
        handshakes.labels("public", resumed).inc()
        metrics.cert_cache.labels("hit" if i % 2 else "miss").inc()
        cache.labels("hit" if i % 2 else "miss").inc()
        metrics.connections_active.labels("public").inc()
        active.labels("public").inc()
    for _ in range(3):
        metrics.connections_active.labels("public").dec()
        active.labels("public").dec()

    def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                     float]:
        wanted = ("mtlsproxy_tls_handshakes_total", "mtlsproxy_client_cert_cache_total",
                  "mtlsproxy_connections_active")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for m in registry.collect() for s in m.samples if s.name in wanted}
    expected = samples(theirs)
    assert samples(ours) == expected and len(expected) == 5
    assert expected[("mtlsproxy_connections_active", (("listener", "public"),))] == 4
