"""Revocation that never locks out by timing (issue 22, item 4): a newer CRL is fetched
ahead of nextUpdate, a stale or missing one is retried within seconds rather than after a
whole refresh interval, and an unchanged CRL over HTTP costs a 304, not a download."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mtlsproxy.truststore.sources import HttpSource
from tests.support.harness import Harness
from tests.support.pki import UTC, Cert
from tests.support.tools import wait_for


def crl(issuer: Cert, this_update: dt.datetime, next_update: dt.datetime) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.cert.subject)
         .last_update(this_update).next_update(next_update))
    return b.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def hard_mode(h: Harness, f: Path, refresh: float = 3600) -> None:
    h.start(h.config(mutual_tls={
        "truststore_uri": str(h.pki.truststore), "refresh_interval": refresh,
        "revocation": {"crl_uris": [str(f)], "mode": "hard"}}))


def reason(h: Harness) -> str | None:
    status, _, body = h.get("/")
    return None if status == 200 else str(json.loads(body)["reason"])


def test_a_publisher_late_by_seconds_does_not_lock_hard_mode_out_for_an_interval(
        harness: Harness, tmp_path: Path) -> None:
    # The CRL in use went past its nextUpdate; the fresh one appears a moment later. With
    # a refresh interval of an hour, only a retry within seconds admits clients again.
    now = dt.datetime.now(UTC)
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, now - dt.timedelta(days=1),
                      now - dt.timedelta(seconds=1)))
    hard_mode(harness, f)
    assert reason(harness) == "revocation_unavailable"
    f.write_bytes(crl(harness.pki.inter, now, now + dt.timedelta(days=1)))
    wait_for(lambda: reason(harness) is None, timeout=10)


def stopped_watcher(h: Harness) -> Any:
    """The listener's CRL watcher, its loop stopped: the test asks next_wait itself."""
    watcher = h.server.listeners[0].revocation  # type: ignore[union-attr]
    assert watcher is not None
    h.loop.call(watcher.stop)
    return watcher


def start_with(h: Harness, f: Path, this: dt.timedelta, next_: dt.timedelta,
               **revocation: Any) -> Any:
    now = dt.datetime.now(UTC)
    f.write_bytes(crl(h.pki.inter, now + this, now + next_))
    h.start(h.config(mutual_tls={
        "truststore_uri": str(h.pki.truststore), "refresh_interval": 3600,
        "revocation": {"crl_uris": [str(f)], "mode": "hard", **revocation}}))
    return stopped_watcher(h)


def test_a_newer_crl_is_wanted_at_the_fraction_of_its_window(harness: Harness,
                                                               tmp_path: Path) -> None:
    # A window of 100,000 s, 79,000 of them gone: 0.8 of it is 1,000 s ahead, well
    # before the hour's interval and nextUpdate minus it.
    watcher = start_with(harness, tmp_path / "inter.crl", dt.timedelta(seconds=-79_000),
                         dt.timedelta(seconds=21_000))
    assert 990 <= watcher.next_wait() <= 1_000


def test_a_newer_crl_is_wanted_an_interval_before_next_update(harness: Harness,
                                                              tmp_path: Path) -> None:
    # 0.8 of the window is 3,800 s ahead, but nextUpdate minus the hour comes first.
    watcher = start_with(harness, tmp_path / "inter.crl", dt.timedelta(seconds=-1_000),
                         dt.timedelta(seconds=5_000))
    assert 1_390 <= watcher.next_wait() <= 1_400


def test_the_refresh_fraction_is_configurable(harness: Harness, tmp_path: Path) -> None:
    watcher = start_with(harness, tmp_path / "inter.crl", dt.timedelta(seconds=-79_000),
                         dt.timedelta(seconds=21_000), refresh_fraction=0.5)
    # Half of the window is long gone: the CRL is due, and fetched again within seconds.
    assert watcher.next_wait() <= 30


def test_a_stale_crl_is_retried_with_a_short_capped_backoff(harness: Harness,
                                                           tmp_path: Path) -> None:
    watcher = start_with(harness, tmp_path / "inter.crl", dt.timedelta(days=-1),
                         dt.timedelta(seconds=-1))
    waits = [watcher.next_wait() for _ in range(10)]
    assert all(b == min(2 * a, 30.0) for a, b in zip(waits, waits[1:], strict=False))
    assert waits[0] <= 30.0 and waits[-1] == 30.0


@pytest.fixture
def etag_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """Serves one body with an ETag, answering 304 to a matching If-None-Match."""
    state: dict[str, Any] = {"body": b"first", "hits": [], }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if state["body"] is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = '"' + hashlib.sha256(state["body"]).hexdigest()[:16] + '"'
            conditional = self.headers.get("If-None-Match")
            state["hits"].append(conditional)
            gate = state.get("gate")
            if gate is not None:  # a slow distribution point: answers once released
                gate.wait(30)
            if conditional == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/crl", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_an_unchanged_crl_over_http_costs_a_304(etag_server: tuple[str, dict[str, Any]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url, state = etag_server
    source = HttpSource(url)
    first = source.check(None)
    assert first is not None and first.data == b"first"
    assert source.check(first.version) is None  # 304: nothing downloaded
    assert state["hits"][0] is None and state["hits"][1] is not None
    state["body"] = b"second"
    second = source.check(first.version)
    assert second is not None and second.data == b"second"


def readyz(h: Harness) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{h.admin_port}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_readyz_says_not_ready_while_a_hard_mode_crl_is_missing(
        harness: Harness, etag_server: tuple[str, dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url, state = etag_server
    state["body"] = None  # the distribution point answers 404: the CRL is missing
    harness.start(harness.config(mutual_tls={
        "truststore_uri": str(harness.pki.truststore), "refresh_interval": 3600,
        "revocation": {"crl_uris": [url], "mode": "hard"}}))
    assert readyz(harness) == 503
    assert harness.metric("mtlsproxy_ready") == 0
    assert reason(harness) == "revocation_unavailable"
    now = dt.datetime.now(UTC)
    state["body"] = crl(harness.pki.inter, now, now + dt.timedelta(days=1))
    wait_for(lambda: readyz(harness) == 200, timeout=10)  # retried within seconds
    assert harness.metric("mtlsproxy_ready") == 1
    assert reason(harness) is None


def test_a_slow_first_crl_fetch_holds_start_up_only_for_first_fetch_timeout(
        harness: Harness, etag_server: tuple[str, dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up waits a bounded time, then serves (hard mode: refusing, not ready); the
    fetch goes on and its CRL is attached when it lands, with no second download."""
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url, state = etag_server
    now = dt.datetime.now(UTC)
    state["body"] = crl(harness.pki.inter, now, now + dt.timedelta(days=1))
    gate = state["gate"] = threading.Event()
    try:
        harness.start(harness.config(mutual_tls={
            "truststore_uri": str(harness.pki.truststore), "refresh_interval": 3600,
            "revocation": {"crl_uris": [url], "mode": "hard",
                           "first_fetch_timeout": 0.2}}))
        assert not gate.is_set()  # serving while the distribution point still holds on
        assert readyz(harness) == 503
        assert reason(harness) == "revocation_unavailable"
        gate.set()
        wait_for(lambda: readyz(harness) == 200, timeout=10)
        assert reason(harness) is None
        # The first GET delivered it: any later one was conditional on its ETag.
        assert state["hits"][0] is None and None not in state["hits"][1:], state["hits"]
    finally:
        gate.set()


def test_first_fetch_timeout_must_be_positive(tmp_path: Path) -> None:
    from mtlsproxy.config import ConfigError, parse_config
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    raw = {"listeners": [{"name": "l", "address": "127.0.0.1:0",
                          "tls": {"certificates": [{"cert_file": str(pem),
                                                    "key_file": str(pem)}]},
                          "mutual_tls": {"truststore_uri": str(pem), "revocation": {
                              "crl_uris": [str(pem)], "first_fetch_timeout": 0}},
                          "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:1"}]}]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path)
    assert ("listeners[0].mutual_tls.revocation.first_fetch_timeout: must be greater than 0"
            in info.value.problems)
