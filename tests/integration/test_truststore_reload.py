"""Truststore lifecycle over real sockets: S3 through a real S3-protocol server (moto in
server mode on loopback, boto3 unpatched), files with a Kubernetes-style ``..data``
symlink swap, broken uploads, outages, and swaps under load."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import hashes

from tests.support.harness import Harness
from tests.support.pki import Cert, make_cert
from tests.support.tools import freeing_thread
from tests.support.tools import wait_for as shared_wait_for

REFRESH = 0.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Moto:
    """moto's S3 server as a separate process on a loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[Moto]:
    m = Moto()
    m.start()
    # boto3 itself honours these: the proxy has no endpoint code of its own.
    monkeypatch.setenv("AWS_ENDPOINT_URL", m.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield m
    m.stop()


def make_bucket(m: Moto) -> Any:
    s3 = m.client()
    s3.create_bucket(Bucket="trust")
    s3.put_bucket_versioning(Bucket="trust", VersioningConfiguration={"Status": "Enabled"})
    return s3


def upload(s3: Any, data: bytes) -> str:
    return str(s3.put_object(Bucket="trust", Key="ca.pem", Body=data)["VersionId"])



def wait_for(predicate: Callable[[], bool], timeout: float = REFRESH + 2) -> None:
    shared_wait_for(predicate, timeout)


def start_watching_a_file(h: Harness, tmp_path: Path) -> Path:
    """Start on a truststore file (our CAs) refreshed every REFRESH; returns the file."""
    path = tmp_path / "ts.pem"
    path.write_bytes(h.pki.truststore.read_bytes())
    h.start(h.config(mutual_tls={"truststore_uri": str(path), "refresh_interval": REFRESH}))
    return path


def reloads(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_truststore_reloads_total", listener="public", result=result)


def admitted(h: Harness, cert: Cert | None = None, name: str = "client") -> bool:
    """True when a fresh mTLS connection with ``cert`` gets a 200."""
    try:
        status, _, _ = h.get("/", ctx=h.client_context(cert, name=name))
    except (ssl.SSLError, ConnectionError):
        return False
    return status == 200


def s3_config(h: Harness, **mtls: Any) -> dict[str, Any]:
    return h.config(mutual_tls={"truststore_uri": "s3://trust/ca.pem",
                                "refresh_interval": REFRESH, **mtls})


@pytest.fixture
def new_ca() -> tuple[Cert, Cert]:
    ca = make_cert("Rotated CA", ca=True)
    return ca, make_cert("rotated-client", ca)


# -- S3 -----------------------------------------------------------------------------

def test_follows_the_newest_s3_version(harness: Harness, moto: Moto,
                                       new_ca: tuple[Cert, Cert]) -> None:
    s3 = make_bucket(moto)
    v1 = upload(s3, harness.pki.truststore.read_bytes())
    harness.start(s3_config(harness))
    assert admitted(harness)
    assert not admitted(harness, new_ca[1], "rotated")
    v2 = upload(s3, new_ca[0].cert_pem())
    wait_for(lambda: reloads(harness, "applied") >= 1)
    assert admitted(harness, new_ca[1], "rotated")
    assert not admitted(harness)  # the removed CA's client is refused on new connections
    info = harness.metric("mtlsproxy_truststore_info", listener="public",
                          uri="s3://trust/ca.pem", version=v2,
                          sha256=harness.server.listeners[0].holder.current.bundle.sha256)  # type: ignore[union-attr]
    assert info == 1 and v1 != v2


def test_a_pinned_version_ignores_newer_uploads(harness: Harness, moto: Moto,
                                                new_ca: tuple[Cert, Cert]) -> None:
    s3 = make_bucket(moto)
    v1 = upload(s3, harness.pki.truststore.read_bytes())
    upload(s3, new_ca[0].cert_pem())  # newer, but the config pins v1
    harness.start(s3_config(harness, truststore_version=v1))
    wait_for(lambda: reloads(harness, "unchanged") >= 2)
    assert admitted(harness)
    assert not admitted(harness, new_ca[1], "rotated")
    assert reloads(harness, "applied") == 0


@pytest.mark.parametrize("broken", [b"garbage", b"", b"leaf-only"])
def test_a_broken_upload_keeps_the_last_good_truststore(harness: Harness, moto: Moto,
                                                        broken: bytes,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    s3 = make_bucket(moto)
    upload(s3, harness.pki.truststore.read_bytes())
    harness.start(s3_config(harness))
    if broken == b"leaf-only":
        broken = make_cert("just-a-leaf", harness.pki.root).cert_pem()
    upload(s3, broken)
    wait_for(lambda: reloads(harness, "failed") >= 3)
    assert admitted(harness)
    assert reloads(harness, "applied") == 0
    logged = [r for r in caplog.records if "not updated" in r.getMessage()]
    assert len(logged) == 1  # once per change, not once per refresh
    store = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{harness.admin_port}/truststore", timeout=5).read())["public"]
    assert store["last_error"] and store["last_checked_at"].endswith("Z")


def test_an_s3_outage_keeps_serving_and_recovers(harness: Harness, moto: Moto,
                                                 new_ca: tuple[Cert, Cert]) -> None:
    s3 = make_bucket(moto)
    upload(s3, harness.pki.truststore.read_bytes())
    harness.start(s3_config(harness))
    moto.stop()
    wait_for(lambda: reloads(harness, "failed") >= 1, timeout=15)
    assert admitted(harness)
    moto.start()  # same port; moto keeps no state across restarts: upload again
    s3 = make_bucket(moto)
    upload(s3, new_ca[0].cert_pem())
    wait_for(lambda: reloads(harness, "applied") >= 1, timeout=15)
    assert admitted(harness, new_ca[1], "rotated")


def test_startup_with_an_unreadable_s3_truststore_fails_clearly(tmp_path: Path,
                                                                moto: Moto) -> None:
    make_bucket(moto)  # bucket, but no object
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
listeners:
  - name: public
    address: 127.0.0.1:0
    tls: {certificates: [{cert_file: s.pem, key_file: s.key}]}
    mutual_tls: {truststore_uri: "s3://trust/ca.pem"}
    routes: [{path_prefix: /, upstream: "http://127.0.0.1:9"}]
""")
    from mtlsproxy.dev.pki import make_ca, make_leaf
    ca = make_ca("t")
    leaf = make_leaf(ca, "localhost", server=True, dns=("localhost",))
    (tmp_path / "s.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "s.key").write_bytes(leaf.key_pem)
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 2
    assert out.stderr.startswith("listeners[0].mutual_tls.truststore_uri: s3://trust/ca.pem")


def test_truststore_check_reads_s3_versions(moto: Moto, harness: Harness) -> None:
    s3 = make_bucket(moto)
    v1 = upload(s3, harness.pki.truststore.read_bytes())
    upload(s3, b"garbage")
    cmd = [sys.executable, "-m", "mtlsproxy", "truststore", "check", "s3://trust/ca.pem"]
    newest = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert newest.returncode == 1
    pinned = subprocess.run(cmd + ["--version", v1], capture_output=True, text=True,
                            timeout=60)
    assert pinned.returncode == 0, pinned.stderr
    assert f"version={v1}" in pinned.stdout and "not_after=" in pinned.stdout


# -- files -------------------------------------------------------------------------

def configmap_dir(root: Path, data: bytes, generation: int) -> Path:
    """Kubernetes' layout: ``..data`` -> ``..<timestamp>``; the file is a symlink through
    ``..data``; an update writes a new directory and renames a new ``..data`` over."""
    target = root / f"..2026_11_28_{generation:04d}"
    target.mkdir()
    (target / "truststore.pem").write_bytes(data)
    tmp = root / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, root / "..data")
    link = root / "truststore.pem"
    if not link.is_symlink():
        link.symlink_to("..data/truststore.pem")
    return link


def test_configmap_symlink_swap_is_picked_up(harness: Harness, tmp_path: Path,
                                             new_ca: tuple[Cert, Cert]) -> None:
    root = tmp_path / "cm"
    root.mkdir()
    link = configmap_dir(root, harness.pki.truststore.read_bytes(), 1)
    harness.start(harness.config(mutual_tls={"truststore_uri": str(link),
                                             "refresh_interval": REFRESH}))
    assert admitted(harness)
    configmap_dir(root, new_ca[0].cert_pem(), 2)
    wait_for(lambda: reloads(harness, "applied") >= 1)
    assert admitted(harness, new_ca[1], "rotated") and not admitted(harness)


def test_a_replaced_generation_is_freed_on_the_build_thread_not_the_event_loop(
        harness: Harness, tmp_path: Path, new_ca: tuple[Cert, Cert]) -> None:
    # Freeing a generation frees its SSLContext's X509_STORE and the parsed certificates:
    # 10-20 ms with the GIL held for 1,000 CAs, a stall if it happened on the loop.
    path = start_watching_a_file(harness, tmp_path)
    freed_on = freeing_thread(harness.server.listeners[0].holder.current)
    path.write_bytes(new_ca[0].cert_pem())
    wait_for(lambda: reloads(harness, "applied") >= 1)
    wait_for(lambda: bool(freed_on))
    assert freed_on[0].startswith("mtlsproxy-build")


def test_a_keep_alive_connection_is_rechecked_after_its_ca_is_removed(
        harness: Harness, tmp_path: Path, new_ca: tuple[Cert, Cert]) -> None:
    path = start_watching_a_file(harness, tmp_path)
    conn = harness.https()
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    path.write_bytes(new_ca[0].cert_pem())
    wait_for(lambda: reloads(harness, "applied") >= 1)
    conn.request("GET", "/again")
    r = conn.getresponse()
    assert r.status == 403 and json.loads(r.read())["reason"] == "untrusted"
    conn.close()


def test_truststore_metrics_describe_the_store_in_use(harness: Harness) -> None:
    harness.start()
    bundle = harness.server.listeners[0].holder.current.bundle  # type: ignore[union-attr]
    assert bundle is not None
    assert harness.metric("mtlsproxy_truststore_certificates", listener="public") == 2
    assert harness.metric("mtlsproxy_truststore_warnings", listener="public") == 0
    assert harness.metric("mtlsproxy_truststore_last_success_timestamp_seconds",
                          listener="public") > 0
    for c in bundle.certs:
        assert harness.metric("mtlsproxy_truststore_cert_not_after_timestamp_seconds",
                              listener="public", subject=c.subject,
                              fingerprint_sha256=c.fingerprint_sha256) == \
            c.cert.not_valid_after_utc.timestamp()


def test_twenty_swaps_under_load_fail_no_valid_request(harness: Harness,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "ts.pem"
    base = harness.pki.truststore.read_bytes()
    path.write_bytes(base)
    harness.start(harness.config(mutual_tls={"truststore_uri": str(path),
                                             "refresh_interval": 0.1}))
    stop = threading.Event()
    results = {"ok": 0, "failed": 0}
    errors: list[str] = []

    # Contexts are made here, one file pair each: threads writing one file would race.
    contexts = [harness.client_context(name=f"load-{i}") for i in range(3)]

    def load(ctx: ssl.SSLContext, keep_alive: bool) -> None:
        while not stop.is_set():
            conn = harness.https(ctx)
            try:
                for _ in range(20 if keep_alive else 1):
                    conn.request("GET", "/")
                    r = conn.getresponse()
                    r.read()
                    results["ok" if r.status == 200 else "failed"] += 1
                    if r.status != 200:
                        errors.append(str(r.status))
            except (OSError, ssl.SSLError) as exc:
                results["failed"] += 1
                errors.append(repr(exc))
            finally:
                conn.close()

    threads = [threading.Thread(target=load, args=(ctx, ka))
               for ctx, ka in zip(contexts, (True, False, True), strict=True)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            extra = make_cert(f"Extra CA {i}", ca=True).cert_pem()
            path.write_bytes(base + extra)  # the load's CA stays in every version
            wait_for(lambda n=i: reloads(harness, "applied") >= n + 1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert results["failed"] == 0, errors[:5]
    assert results["ok"] > 20


# -- SIGHUP: the config file re-read ---------------------------------------------------

def test_repinning_an_older_version_rolls_back_live(harness: Harness, moto: Moto,
                                                    new_ca: tuple[Cert, Cert]) -> None:
    s3 = make_bucket(moto)
    v1 = upload(s3, harness.pki.truststore.read_bytes())
    upload(s3, new_ca[0].cert_pem())
    harness.start(s3_config(harness))  # follows the newest: v2
    assert admitted(harness, new_ca[1], "rotated") and not admitted(harness)
    assert harness.reload(s3_config(harness, truststore_version=v1)) == []
    assert admitted(harness) and not admitted(harness, new_ca[1], "rotated")


def test_mutual_tls_is_turned_off_and_on_live(harness: Harness) -> None:
    harness.start()
    assert not admitted_without_cert(harness)
    assert harness.reload(harness.config(mutual_tls={"truststore_uri": ""})) == []
    assert admitted_without_cert(harness)
    assert harness.reload(harness.config()) == []
    assert not admitted_without_cert(harness) and admitted(harness)


def test_turning_mutual_tls_on_refuses_open_anonymous_connections(harness: Harness) -> None:
    harness.start(harness.config(mutual_tls={"truststore_uri": ""}))
    conn = harness.https(harness.client_context(with_cert=False))
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    assert harness.reload(harness.config()) == []
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 403 and json.loads(r.read())["reason"] == "no_client_certificate"
    conn.close()


def admitted_without_cert(h: Harness) -> bool:
    try:
        return h.get("/", ctx=h.client_context(with_cert=False))[0] == 200
    except (ssl.SSLError, ConnectionError):
        return False


def test_routes_change_live_without_dropping_a_keep_alive_connection(harness: Harness) -> None:
    harness.start_echo()
    harness.start(harness.config(routes=[
        {"path_prefix": "/old", "upstream": f"http://127.0.0.1:{harness.echo_port}"}]))
    conn = harness.https()
    conn.request("GET", "/new")
    r = conn.getresponse()
    assert r.status == 404
    r.read()
    assert harness.reload(harness.config(routes=[
        {"path_prefix": "/new", "upstream": f"http://127.0.0.1:{harness.echo_port}"}])) == []
    conn.request("GET", "/new")  # same connection, new routes
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    conn.close()


def test_a_listener_address_change_is_refused_and_the_old_config_stays(
        harness: Harness) -> None:
    harness.start()
    raw = harness.config(routes=[{"path_prefix": "/nothing-else",
                                  "upstream": f"http://127.0.0.1:{harness.echo_port}"}])
    raw["listeners"][0]["address"] = "127.0.0.1:1"
    problems = harness.reload(raw)
    assert problems == ["listeners: names and addresses cannot change without a restart"]
    assert harness.get("/")[0] == 200  # the old "/" route still serves
    assert harness.metric("mtlsproxy_config_reloads_total", result="failed") == 1


def test_a_bad_config_or_truststore_on_reload_keeps_the_old_config(harness: Harness,
                                                                   tmp_path: Path) -> None:
    harness.start()
    raw = harness.config()
    raw["listeners"][0]["mutual_tls"]["truststore_url"] = "typo"
    assert harness.reload(raw)[0].startswith("listeners[0].mutual_tls.truststore_url")
    broken = tmp_path / "broken.pem"
    broken.write_text("garbage")
    problems = harness.reload(harness.config(mutual_tls={"truststore_uri": str(broken)}))
    assert problems and problems[0].startswith("listeners[0].mutual_tls.truststore_uri:")
    assert admitted(harness)


def test_a_ca_nearing_expiry_becomes_a_warning_on_a_later_refresh(harness: Harness,
                                                                  tmp_path: Path) -> None:
    """The model warns only at upload time; we re-evaluate on every refresh."""
    start_watching_a_file(harness, tmp_path)
    assert harness.metric("mtlsproxy_truststore_warnings", listener="public") == 0
    not_after = min(c.cert.not_valid_after_utc
                    for c in harness.server.listeners[0].holder.current.bundle.certs)  # type: ignore[union-attr]
    # Move the injected clock to 10 days before the first CA expires.
    import datetime as dt
    harness.clock.advance(not_after - dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    wait_for(lambda: harness.metric("mtlsproxy_truststore_warnings", listener="public") >= 1)
    store = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{harness.admin_port}/truststore", timeout=5).read())["public"]
    assert any(w["problem"].startswith("expires in") for w in store["warnings"])


def test_an_expired_ca_has_no_expiry_series_but_a_warning(harness: Harness,
                                                          tmp_path: Path) -> None:
    # Its series would fire the expiry alert for ever (issue 22); the warning says why the
    # CA is left out.
    import datetime as dt
    now = dt.datetime.now(dt.UTC)
    old = make_cert("Expired Root", ca=True, not_before=now - dt.timedelta(days=9),
                    not_after=now - dt.timedelta(days=1))
    path = tmp_path / "ts.pem"
    path.write_bytes(harness.pki.truststore.read_bytes() + old.cert_pem())
    harness.start(harness.config(mutual_tls={"truststore_uri": str(path)}))
    fp = old.cert.fingerprint(hashes.SHA256()).hex()
    assert harness.registry.get_sample_value(
        "mtlsproxy_truststore_cert_not_after_timestamp_seconds",
        {"listener": "public", "subject": old.cert.subject.rfc4514_string(),
         "fingerprint_sha256": fp}) is None
    assert harness.metric("mtlsproxy_truststore_certificates", listener="public") == 2
    assert harness.metric("mtlsproxy_truststore_warnings", listener="public") >= 1
