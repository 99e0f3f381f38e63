"""The proxy as users run it: the CLI process, real curl and openssl s_client binaries,
SIGTERM drain, and 50 MB streamed each way with bounded memory."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsproxy.dev.pki import DevPKI, make_leaf
from tests.support.loops import LoopThread, start_slow_upstream
from tests.support.pki import make_cert
from tests.support.proxyproc import ProxyProcess, start_proxy, stop_proxy

MiB = 1024 * 1024


@pytest.fixture
def proxy_proc(devpki: DevPKI, upstream: tuple[LoopThread, int],
               tmp_path: Path) -> Iterator[ProxyProcess]:
    pp = start_proxy(devpki, upstream[1], tmp_path)
    yield pp
    stop_proxy(pp)


def client_ctx(devpki: DevPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(devpki.root_cert))
    ctx.load_cert_chain(str(devpki.client_cert), str(devpki.client_key))
    return ctx


# -- real clients ---------------------------------------------------------------------

needs_curl = pytest.mark.needs_tool("curl", "curl")
needs_openssl = pytest.mark.needs_tool("openssl", "openssl")


@needs_curl
def test_curl_with_the_dev_client_certificate_gets_the_upstream(devpki: DevPKI,
                                                                proxy_proc: ProxyProcess
                                                                ) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--cert", str(devpki.client_cert), "--key", str(devpki.client_key),
         "--cacert", str(devpki.root_cert), f"https://localhost:{proxy_proc.port}/curl"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["path"] == "/curl"
    assert any(n == "x-forwarded-client-cert" for n, _ in body["headers"])


@needs_curl
@pytest.mark.parametrize("case, alert", [("expired", "alert certificate expired"),
                                         ("untrusted", "alert unknown ca")])
def test_curl_with_a_bad_certificate_prints_the_tls_alert(harness_for: Any, case: str,
                                                          alert: str) -> None:
    h = harness_for("uvloop")
    now = dt.datetime.now(dt.UTC)
    cert = (make_cert("expired", h.pki.inter, not_before=now - dt.timedelta(days=9),
                      not_after=now - dt.timedelta(days=1)) if case == "expired"
            else make_cert("stranger", make_cert("Unknown CA", ca=True)))
    c, k = h.pki.client_files(cert, case)
    h.start()
    out = subprocess.run(
        ["curl", "-sS", "--cert", str(c), "--key", str(k),
         "--cacert", str(h.pki.directory / "root.pem"), f"https://localhost:{h.port}/"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert alert in out.stderr, out.stderr
    assert h.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                    reason=case) == 1


@needs_openssl
def test_openssl_s_client_without_a_certificate_sees_certificate_required(
        devpki: DevPKI, proxy_proc: ProxyProcess) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy_proc.port}",
         "-servername", "localhost", "-CAfile", str(devpki.root_cert), "-quiet"],
        input="GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", capture_output=True, text=True,
        timeout=30)
    assert "certificate required" in (out.stderr + out.stdout)


@needs_openssl
def test_openssl_s_client_sees_the_server_chain_and_gets_a_response(
        devpki: DevPKI, proxy_proc: ProxyProcess) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy_proc.port}",
         "-servername", "localhost", "-CAfile", str(devpki.root_cert),
         "-cert", str(devpki.client_cert), "-key", str(devpki.client_key), "-ign_eof"],
        input="GET /s_client HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, text=True, timeout=30)
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout[-2000:]
    assert "HTTP/1.1 200 OK" in out.stdout
    assert '"path": "/s_client"' in out.stdout


# -- metrics and admin through the process ---------------------------------------------

def test_admin_endpoints_answer(devpki: DevPKI, proxy_proc: ProxyProcess) -> None:
    assert proxy_proc.admin_get("/healthz")[0] == 200
    assert proxy_proc.admin_get("/readyz")[0] == 200
    status, body = proxy_proc.admin_get("/truststore")
    store = json.loads(body)["public"]
    assert status == 200 and store["uri"] == str(devpki.truststore)
    assert len(store["sha256"]) == 64 and store["loaded_at"].endswith("Z")
    subjects = [c["subject"] for c in store["certificates"]]
    assert any("intermediate" in s for s in subjects) and any("root" in s for s in subjects)
    for cert in store["certificates"]:
        assert set(cert) >= {"subject", "issuer", "serial", "not_before", "not_after",
                             "fingerprint_sha256"}
    status, metrics = proxy_proc.admin_get("/metrics")
    text = metrics.decode()
    for name in ("mtlsproxy_tls_handshakes_total", "mtlsproxy_tls_handshake_failures_total",
                 "mtlsproxy_connections_active"):
        assert name in text


def test_access_log_goes_to_stdout_as_json(devpki: DevPKI, upstream: tuple[LoopThread, int],
                                           tmp_path: Path) -> None:
    pp = start_proxy(devpki, upstream[1], tmp_path)
    conn = http.client.HTTPSConnection("localhost", pp.port, context=client_ctx(devpki))
    conn.request("GET", "/log-me")
    assert conn.getresponse().status == 200
    conn.close()
    pp.proc.send_signal(signal.SIGTERM)
    stdout, _ = pp.proc.communicate(timeout=20)
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert any(r["path"] == "/log-me" and r["status"] == 200 for r in records)


# -- SIGTERM drain ------------------------------------------------------------------------

def test_sigterm_drains_in_flight_requests_then_exits_0(devpki: DevPKI, tmp_path: Path) -> None:
    loop = LoopThread("uvloop")
    started = threading.Event()
    server, port = start_slow_upstream(loop, started.set)
    pp = start_proxy(devpki, port, tmp_path)
    result: dict[str, object] = {}

    def request() -> None:
        conn = http.client.HTTPSConnection("localhost", pp.port, context=client_ctx(devpki),
                                           timeout=20)
        conn.request("GET", "/slow")
        r = conn.getresponse()
        result["status"], result["body"] = r.status, r.read()
        conn.close()
    t = threading.Thread(target=request)
    t.start()
    try:
        assert started.wait(10)
        pp.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert pp.admin_get("/readyz")[0] == 503  # draining: no new traffic, please
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", pp.port), timeout=2).close()
        t.join(20)
        assert result == {"status": 200, "body": b"done"}
        assert pp.proc.wait(20) == 0
    finally:
        if pp.proc.poll() is None:
            pp.proc.kill()
        pp.proc.communicate()
        loop.call(server.close)
        loop.stop()


# -- 50 MB each way -------------------------------------------------------------------

def test_50_mb_stream_each_way_with_bounded_proxy_memory(devpki: DevPKI,
                                                         proxy_proc: ProxyProcess) -> None:
    size = 50 * MiB
    block = os.urandom(MiB)
    before = proxy_proc.rss_hwm_kib()
    conn = http.client.HTTPSConnection("localhost", proxy_proc.port, context=client_ctx(devpki),
                                       timeout=120)
    conn.request("POST", "/upload", body=(block for _ in range(50)),
                 headers={"Content-Length": str(size)})
    reply = json.loads(conn.getresponse().read())
    assert reply["body_bytes"] == size
    assert reply["body_sha256"] == hashlib.sha256(block * 50).hexdigest()
    conn.request("GET", f"/bytes/{size}")
    r = conn.getresponse()
    received = 0
    while chunk := r.read(MiB):
        received += len(chunk)
    assert received == size
    conn.close()
    growth_mib = (proxy_proc.rss_hwm_kib() - before) / 1024
    # 100 MB went through; a buffering proxy would grow by at least 50 MB.
    assert growth_mib < 24, f"proxy peak RSS grew by {growth_mib:.1f} MiB"


# -- demo and dev-pki -----------------------------------------------------------------

def test_demo_once_exits_0_and_prints_a_curl_line() -> None:
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", "demo", "--once", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "-> 200" in out.stdout
    assert "curl --cert " in out.stdout and " --key " in out.stdout and "--cacert" in out.stdout


def test_dev_pki_writes_a_working_pki(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", "dev-pki", str(tmp_path / "p")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("server.pem", "server.key", "client.pem", "client.key", "truststore.pem",
                 "root-ca.pem", "intermediate-ca.pem"):
        assert (tmp_path / "p" / name).is_file()
    from cryptography import x509
    certs = x509.load_pem_x509_certificates((tmp_path / "p" / "truststore.pem").read_bytes())
    assert len(certs) == 2  # intermediate + root
    server = x509.load_pem_x509_certificates((tmp_path / "p" / "server.pem").read_bytes())[0]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert make_leaf  # the helper dev-pki uses is importable for users' own scripts


def test_demo_serves_until_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mtlsproxy", "demo", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Serving until Ctrl-C" in line:
                break
        assert any("-> 200" in line for line in lines), lines
        assert proc.poll() is None  # still serving
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sighup_rereads_the_config_file(devpki: DevPKI, upstream: tuple[LoopThread, int],
                                        tmp_path: Path) -> None:
    pp = start_proxy(devpki, upstream[1], tmp_path,
                     routes=[{"path_prefix": "/old",
                              "upstream": f"http://127.0.0.1:{upstream[1]}"}])
    try:
        def status(path: str) -> int:
            conn = http.client.HTTPSConnection("localhost", pp.port,
                                               context=client_ctx(devpki), timeout=10)
            conn.request("GET", path)
            code = conn.getresponse().status
            conn.close()
            return code
        assert status("/new") == 404
        config = yaml.safe_load((tmp_path / "proxy.yaml").read_text())
        config["listeners"][0]["routes"][0]["path_prefix"] = "/new"
        (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(config))
        pp.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status("/new") != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status("/new") == 200
        assert pp.proc.poll() is None
    finally:
        pp.proc.send_signal(signal.SIGTERM)
        pp.proc.communicate(timeout=20)
