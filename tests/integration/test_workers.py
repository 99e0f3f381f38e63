"""``workers: N``: N processes on the same ports (SO_REUSEPORT) under one supervisor.

Every test runs the real CLI (the multiprocess metrics store is chosen when a process
imports prometheus-client, so only a fresh process is honest) with ports 0, which the
supervisor resolves once for all workers.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsproxy.config import ConfigError, cpu_count, parse_config
from mtlsproxy.dev.pki import DevPKI
from mtlsproxy.server.workers import ADMIN, WorkerSettings
from tests.support.loops import LoopThread, start_slow_upstream


class Workers:
    """The supervisor process, its stderr (JSON log lines) and stdout (access log)."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err
        self.port = self.admin = 0

    def log(self) -> str:
        return self.err.read_text()

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count}x {pattern!r} in the log:\n{self.log()}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.admin}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def worker_pids(self) -> dict[int, int]:
        return {int(i): int(p) for i, p in
                re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log())}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def access_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]


def start_workers(devpki: DevPKI, upstream_port: int, tmp: Path, workers: object = 2,
                  **top: object) -> Workers:
    config = {
        "workers": workers,
        "listeners": [{
            "name": "public", "address": "127.0.0.1:0",
            "tls": {"certificates": [{"cert_file": str(devpki.server_cert),
                                      "key_file": str(devpki.server_key)}]},
            "mutual_tls": {"truststore_uri": str(devpki.truststore)},
            "routes": [{"path_prefix": "/", "upstream": f"http://127.0.0.1:{upstream_port}"}],
        }],
        "admin": {"address": "127.0.0.1:0"},
        **top,
    }
    path = tmp / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    out, err = tmp / "stdout", tmp / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "mtlsproxy", "run", "--config",
                                 str(path)], stdout=o, stderr=e)
    w = Workers(proc, out, err)
    w.wait_log(r"all 2 workers serving")
    ports = set(re.findall(r"listener public on 127\.0\.0\.1:(\d+)", w.log()))
    admins = set(re.findall(r"admin on 127\.0\.0\.1:(\d+)", w.log()))
    assert len(ports) == 1 and len(admins) == 1, w.log()  # one port, shared by both
    w.port, w.admin = int(ports.pop()), int(admins.pop())
    return w


@pytest.fixture
def workers(devpki: DevPKI, upstream: tuple[LoopThread, int],
            tmp_path: Path) -> Iterator[Workers]:
    w = start_workers(devpki, upstream[1], tmp_path)
    yield w
    w.stop()
    # Whatever the test did, nothing escaped to a worker's event loop or crashed one.
    for sign in ("Traceback", "never retrieved", "Exception in callback"):
        assert sign not in w.log(), w.log()[-3000:]


def client_ctx(devpki: DevPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(devpki.root_cert))
    ctx.load_cert_chain(str(devpki.client_cert), str(devpki.client_key))
    return ctx


def one_request(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
                ) -> tuple[int, ssl.SSLSession | None, bool]:
    """A new connection (resuming ``session`` if given); (status, session, resumed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /w HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return int(data.split(b" ", 2)[1]), tls.session, tls.session_reused


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in\n{text}")


# -- config ---------------------------------------------------------------------------------

def _listener(tmp: Path, devpki: DevPKI) -> dict[str, Any]:
    return {"name": "a", "address": "127.0.0.1:0",
            "tls": {"certificates": [{"cert_file": str(devpki.server_cert),
                                      "key_file": str(devpki.server_key)}]},
            "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:1"}]}


def test_workers_auto_means_the_cores_this_process_may_use(devpki: DevPKI,
                                                          tmp_path: Path) -> None:
    config = parse_config({"workers": "auto", "listeners": [_listener(tmp_path, devpki)]},
                          tmp_path)
    assert config.workers == cpu_count() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True, 257])
def test_a_bad_workers_value_is_a_config_error_naming_the_key(devpki: DevPKI, tmp_path: Path,
                                                              value: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"workers": value, "listeners": [_listener(tmp_path, devpki)]}, tmp_path)
    assert err.value.problems[0].startswith("workers: must be an integer from 1 to 256")


def test_worker_settings_survive_the_environment_and_fill_in_port_0(devpki: DevPKI,
                                                                    tmp_path: Path) -> None:
    settings = WorkerSettings(1, 2, "/m", "/s", {"a": 4431, ADMIN: 9911}, ready_fd=7)
    back = WorkerSettings.from_env({"MTLSPROXY_WORKER": settings.to_env()})
    assert back == settings
    config = back.apply(parse_config({"listeners": [_listener(tmp_path, devpki)],
                                      "admin": {"address": "127.0.0.1:0"}}, tmp_path))
    assert config.listeners[0].port == 4431
    assert config.admin is not None and config.admin.port == 9911
    assert WorkerSettings.from_env({}) is None


# -- the processes ------------------------------------------------------------------------

def test_two_workers_both_serve_the_one_port(devpki: DevPKI, workers: Workers) -> None:
    ctx = client_ctx(devpki)
    for _ in range(40):  # new connections: the kernel spreads them by 4-tuple hash
        assert one_request(workers.port, ctx)[0] == 200
    assert workers.stop() == 0
    served = collections.Counter(r["worker"] for r in workers.access_records())
    assert set(served) == {0, 1}, served
    assert sum(served.values()) == 40


def test_admin_metrics_add_up_every_workers_requests(devpki: DevPKI, workers: Workers) -> None:
    ctx = client_ctx(devpki)
    for _ in range(30):
        assert one_request(workers.port, ctx)[0] == 200
    text = workers.metrics()
    assert metric(text, "mtlsproxy_requests_total", listener="public", route="/",
                  protocol="http1", code="200") == 30
    assert metric(text, "mtlsproxy_tls_handshakes_total", listener="public",
                  resumed="false") == 30
    assert metric(text, "mtlsproxy_ready") == 1  # livemin: every worker is ready
    assert metric(text, "mtlsproxy_truststore_certificates", domain="", listener="public") == 2
    # Whichever worker answers the scrape, the sums are the same.
    assert all(metric(workers.metrics(), "mtlsproxy_requests_total", listener="public",
                      route="/", protocol="http1", code="200") == 30 for _ in range(6))


def test_tls_sessions_resume_on_whichever_worker_takes_the_connection(
        devpki: DevPKI, workers: Workers) -> None:
    ctx = client_ctx(devpki)
    status, session, resumed = one_request(workers.port, ctx)
    assert status == 200 and not resumed and session is not None
    results = []
    for _ in range(30):
        status, session, resumed = one_request(workers.port, ctx, session)
        results.append((status, resumed))
    assert results == [(200, True)] * 30  # with per-worker keys about half would not resume
    assert workers.stop() == 0
    resumed_on = {r["worker"] for r in workers.access_records() if r["resumed"]}
    assert resumed_on == {0, 1}


def test_sigterm_drains_every_worker_then_exits_0(devpki: DevPKI, tmp_path: Path) -> None:
    loop = LoopThread("uvloop")
    arrived = threading.Semaphore(0)
    server, port = start_slow_upstream(loop, arrived.release)
    w = start_workers(devpki, port, tmp_path)
    results: list[tuple[int, bytes]] = []

    def request() -> None:
        conn = http.client.HTTPSConnection("localhost", w.port, context=client_ctx(devpki),
                                           timeout=20)
        conn.request("GET", "/slow")
        r = conn.getresponse()
        results.append((r.status, r.read()))
        conn.close()
    threads = [threading.Thread(target=request) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for _ in threads:
            assert arrived.acquire(timeout=10)
        w.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        assert results == [(200, b"done")] * 8
        assert w.proc.wait(20) == 0
        assert sorted(w.wait_log(r"worker (\d) exited \(0\)", 2)) == ["0", "1"]
    finally:
        w.stop()
        loop.call(server.close)
        loop.stop()


def test_a_worker_that_dies_is_replaced_and_the_port_keeps_serving(
        devpki: DevPKI, workers: Workers) -> None:
    victim = workers.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    workers.wait_log(r"worker 0 \(pid \d+\) died with exit code -9")
    workers.wait_log(r"worker 0 started \(pid \d+\)", 2)
    assert workers.worker_pids()[0] != victim
    workers.wait_log(r"listener public on", 3)  # the new worker bound the shared port
    ctx = client_ctx(devpki)
    assert all(one_request(workers.port, ctx)[0] == 200 for _ in range(20))


def test_a_bad_truststore_stops_the_supervisor_before_any_worker_starts(
        devpki: DevPKI, tmp_path: Path) -> None:
    config = {"workers": 2, "listeners": [{
        "name": "public", "address": "127.0.0.1:0",
        "tls": {"certificates": [{"cert_file": str(devpki.server_cert),
                                  "key_file": str(devpki.server_key)}]},
        "mutual_tls": {"truststore_uri": str(tmp_path / "missing.pem")},
        "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:1"}]}]}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "mtlsproxy", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("listeners[0].mutual_tls.truststore_uri: ")
    assert "worker" not in out.stderr


def test_sighup_reloads_every_worker(devpki: DevPKI, workers: Workers) -> None:
    def applied() -> float:
        text = workers.metrics()
        if "mtlsproxy_config_reloads_total{" not in text:
            return 0.0  # no reload counted yet: the series appears with the first one
        return metric(text, "mtlsproxy_config_reloads_total", result="applied")
    assert applied() == 0
    workers.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and applied() < 2:
        time.sleep(0.1)
    assert applied() == 2  # one per worker, summed across both


def test_workers_that_keep_dying_stop_the_supervisor_with_exit_1(
        devpki: DevPKI, workers: Workers) -> None:
    from mtlsproxy.server.workers import MAX_RESTARTS
    for kill in range(MAX_RESTARTS + 1):
        pid = workers.worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        if kill < MAX_RESTARTS:
            workers.wait_log(r"worker 0 started \(pid \d+\)", kill + 2)
    assert workers.proc.wait(30) == 1
    assert "workers keep dying: stopping" in workers.log()
