"""CRL revocation (issue #6) over real TLS: a revoked leaf, a revoked intermediate, a CRL
swapped live under a kept-alive connection, and a stale CRL under hard and soft modes."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.harness import Harness
from tests.support.pki import UTC, Cert, make_cert
from tests.support.tools import wait_for as shared_wait_for

REFRESH = 0.2


def crl(issuer: Cert, revoked: list[int], next_update: dt.timedelta = dt.timedelta(days=1),
        signer: Any = None) -> bytes:
    now = dt.datetime.now(UTC)
    b = (x509.CertificateRevocationListBuilder()
         .issuer_name(issuer.cert.subject)
         .last_update(now - dt.timedelta(hours=1))
         .next_update(now + next_update))
    for serial in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now - dt.timedelta(minutes=5)).build())
    return b.sign(signer or issuer.key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


def start(h: Harness, files: list[Path], mode: str = "soft") -> None:
    h.start(h.config(mutual_tls={
        "truststore_uri": str(h.pki.truststore), "refresh_interval": REFRESH,
        "revocation": {"crl_uris": [str(f) for f in files], "mode": mode}}))



def wait_for(predicate: Callable[[], bool], timeout: float = REFRESH + 3) -> None:
    shared_wait_for(predicate, timeout)


def reason(h: Harness) -> str | None:
    status, _, body = h.get("/")
    return None if status == 200 else json.loads(body)["reason"]


def test_a_revoked_leaf_gets_403_revoked(harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, [harness.pki.client.cert.serial_number]))
    start(harness, [f])
    assert reason(harness) == "revoked"
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="revoked") == 1


def test_an_unrevoked_leaf_passes(harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, [12345]))
    start(harness, [f], mode="hard")
    assert reason(harness) is None


def test_a_revoked_intermediate_gets_403_revoked(harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "root.crl"
    f.write_bytes(crl(harness.pki.root, [harness.pki.inter.cert.serial_number]))
    start(harness, [f])
    assert reason(harness) == "revoked"


def test_a_crl_swapped_live_refuses_the_next_request_of_a_kept_connection(
        harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, []))
    start(harness, [f])
    conn = harness.https()
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    f.write_bytes(crl(harness.pki.inter, [harness.pki.client.cert.serial_number]))
    number = harness.server.listeners[0].holder.current.number  # type: ignore[union-attr]
    wait_for(lambda: harness.server.listeners[0].holder.current.number != number)  # type: ignore[union-attr]
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 403 and json.loads(r.read())["reason"] == "revoked"
    conn.close()


@pytest.mark.parametrize("mode, expected", [("hard", "revocation_unavailable"),
                                            ("soft", None)])
def test_a_stale_crl_follows_the_mode(harness: Harness, tmp_path: Path, mode: str,
                                      expected: str | None) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, [], next_update=-dt.timedelta(hours=1)))
    start(harness, [f], mode=mode)
    assert reason(harness) == expected
    issuer = harness.pki.inter.cert.subject.rfc4514_string()
    assert harness.metric("mtlsproxy_crl_stale", listener="public", issuer=issuer) == 1


def test_a_crl_not_signed_by_its_issuer_is_ignored(harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "forged.crl"
    forged_key = ec.generate_private_key(ec.SECP256R1())
    f.write_bytes(crl(harness.pki.inter, [harness.pki.client.cert.serial_number],
                      signer=forged_key))
    start(harness, [f])  # soft: the forged CRL must not revoke anyone
    assert reason(harness) is None


def test_a_missing_crl_refuses_in_hard_mode(harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(b"not a crl")
    start(harness, [f], mode="hard")
    assert reason(harness) == "revocation_unavailable"


def test_truststore_check_reports_which_crl_covers_each_ca(harness: Harness,
                                                           tmp_path: Path) -> None:
    import subprocess
    import sys
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, [1, 2, 3]))
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", "truststore", "check",
                          str(harness.pki.truststore), "--crl", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    inter = harness.pki.inter.cert.subject.rfc4514_string()
    i = next(n for n, line in enumerate(lines) if line.startswith(inter + "  issuer="))
    assert lines[i + 1].startswith(f"  CRL: {f} next_update=") and "revoked=3" in lines[i + 1]
    assert "  CRL: none covers this CA" in lines


def test_crls_are_refetched_by_their_next_update(harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, [], next_update=dt.timedelta(seconds=5)))
    harness.start(harness.config(mutual_tls={
        "truststore_uri": str(harness.pki.truststore), "refresh_interval": 3600,
        "revocation": {"crl_uris": [str(f)]}}))
    watcher = harness.server.listeners[0].revocation  # type: ignore[union-attr]
    assert watcher is not None and 1.0 <= watcher.next_wait() <= 5.0


def test_a_changed_crl_is_verified_on_the_build_thread_not_the_event_loop(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Loading and indexing a CRL costs ~0.7 us per entry: 70 ms of a 100,000-entry CRL
    # would stall every connection if it ran on the loop. The verdict on a CRL is logged
    # where it is verified, so the warning's thread tells where that was.
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, []))
    start(harness, [f])
    forged_key = ec.generate_private_key(ec.SECP256R1())
    with caplog.at_level(logging.WARNING, "mtlsproxy.revocation"):
        f.write_bytes(crl(harness.pki.inter, [harness.pki.client.cert.serial_number],
                          signer=forged_key))
        wait_for(lambda: any("signed it" in r.getMessage() for r in caplog.records))
    threads = {r.threadName for r in caplog.records if "signed it" in r.getMessage()}
    assert threads and all(t.startswith("mtlsproxy-build") for t in threads)
    assert reason(harness) is None  # and the forged CRL revokes no one


def test_a_truststore_swap_verifies_the_crls_on_the_build_thread(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, []))
    store = tmp_path / "ts.pem"
    store.write_bytes(harness.pki.truststore.read_bytes())
    harness.start(harness.config(mutual_tls={
        "truststore_uri": str(store), "refresh_interval": REFRESH,
        "revocation": {"crl_uris": [str(f)], "mode": "soft"}}))
    with caplog.at_level(logging.WARNING, "mtlsproxy.revocation"):
        store.write_bytes(make_cert("Rotated CA", ca=True).cert_pem())  # no CA signed the CRL
        wait_for(lambda: any("signed it" in r.getMessage() for r in caplog.records))
    threads = {r.threadName for r in caplog.records if "signed it" in r.getMessage()}
    assert threads and all(t.startswith("mtlsproxy-build") for t in threads)


def revocation_config(h: Harness, store: Path, f: Path) -> dict[str, Any]:
    return h.config(mutual_tls={
        "truststore_uri": str(store), "refresh_interval": 3600,
        "revocation": {"crl_uris": [str(f)], "mode": "soft"}})


def test_a_config_reload_verifies_the_kept_crls_against_its_new_truststore_on_the_build_thread(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A reload builds every new truststore before it applies any; the CRLs a listener keeps
    # are verified against the new bundle there too, not in the apply step on the loop.
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, []))
    rotated = tmp_path / "rotated.pem"
    rotated.write_bytes(make_cert("Rotated CA", ca=True).cert_pem())  # no CA signed the CRL
    harness.start(revocation_config(harness, harness.pki.truststore, f))
    with caplog.at_level(logging.WARNING, "mtlsproxy.revocation"):
        assert harness.reload(revocation_config(harness, rotated, f)) == []
    threads = {r.threadName for r in caplog.records if "signed it" in r.getMessage()}
    assert threads and all(t.startswith("mtlsproxy-build") for t in threads)
    state = harness.server.listeners[0].holder.current.revocation
    assert state is not None and not state.crls  # verified against the rotated bundle


def test_a_crl_fetched_between_a_reload_build_and_its_swap_is_the_one_attached(
        harness: Harness, tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, []))
    harness.start(revocation_config(harness, harness.pki.truststore, f))
    lr = harness.server.listeners[0]
    watcher, gen = lr.revocation, lr.holder.current
    assert watcher is not None
    prepared = watcher.prepare(gen.bundle)
    serial = harness.pki.client.cert.serial_number
    f.write_bytes(crl(harness.pki.inter, [serial]))
    assert watcher.fetch_all()  # what the periodic refresh does meanwhile
    attached = harness.loop.call(lambda: watcher.attach_state(gen.bundle, prepared))
    assert [serial in c.revoked for c in attached.crls.values()] == [True]
    # Prepared from the CRLs still current, it is taken as it is.
    again = watcher.prepare(gen.bundle)
    assert harness.loop.call(lambda: watcher.attach_state(gen.bundle, again)) is again.state


@pytest.fixture
def crl_server() -> Iterator[tuple[int, dict[str, bytes]]]:
    """A plain HTTP server on loopback, on its own thread (a CRL distribution point; the
    proxy fetches its CRLs at start-up before its loop serves anything): GET /name answers
    ``files[name]``, changeable while it runs, anything else 404. (port, files)."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = files.get(self.path.lstrip("/"))
            self.send_response(404 if body is None else 200)
            self.send_header("Content-Type", "application/pkix-crl")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _no_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # CRLs on loopback are fetched directly, whatever proxy the environment names.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_a_crl_fetched_over_http_revokes_and_a_new_one_is_refetched(
        harness: Harness, crl_server: tuple[int, dict[str, bytes]]) -> None:
    # CRL distribution points are http:// URLs more often than not.
    port, files = crl_server
    files["inter.crl"] = crl(harness.pki.inter, [])
    harness.start(harness.config(mutual_tls={
        "truststore_uri": str(harness.pki.truststore), "refresh_interval": REFRESH,
        "revocation": {"crl_uris": [f"http://127.0.0.1:{port}/inter.crl"],
                       "mode": "hard"}}))
    assert reason(harness) is None
    files["inter.crl"] = crl(harness.pki.inter, [harness.pki.client.cert.serial_number])
    wait_for(lambda: reason(harness) == "revoked")


def test_a_crl_url_that_answers_404_is_missing_and_hard_mode_refuses(
        harness: Harness, crl_server: tuple[int, dict[str, bytes]]) -> None:
    port, _ = crl_server
    harness.start(harness.config(mutual_tls={
        "truststore_uri": str(harness.pki.truststore), "refresh_interval": 3600,
        "revocation": {"crl_uris": [f"http://127.0.0.1:{port}/gone.crl"],
                       "mode": "hard"}}))
    assert reason(harness) == "revocation_unavailable"


def test_a_config_reload_adds_then_removes_crls_live(harness: Harness,
                                                     tmp_path: Path) -> None:
    f = tmp_path / "inter.crl"
    f.write_bytes(crl(harness.pki.inter, [harness.pki.client.cert.serial_number]))
    without = harness.config(mutual_tls={"truststore_uri": str(harness.pki.truststore)})
    harness.start(without)
    assert reason(harness) is None
    assert harness.reload(revocation_config(harness, harness.pki.truststore, f)) == []
    wait_for(lambda: reason(harness) == "revoked")  # fetched by the new watcher
    assert harness.reload(without) == []
    assert reason(harness) is None
    assert harness.server.listeners[0].revocation is None  # type: ignore[union-attr]
