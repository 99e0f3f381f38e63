"""The proxy as a separate process (``python -m mtlsproxy run``), for tests that measure
it from outside (its memory) or signal it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from mtlsproxy.dev.pki import DevPKI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    def __init__(self, proc: subprocess.Popen[str], port: int, admin: int) -> None:
        self.proc, self.port, self.admin = proc, port, admin

    def admin_get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def rss_hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")




def start_proxy(devpki: DevPKI, upstream_port: int, tmp: Path,
                routes: list[dict[str, object]] | None = None, **top: object) -> ProxyProcess:
    port, admin = free_port(), free_port()
    config = {
        "listeners": [{
            "name": "public", "address": f"127.0.0.1:{port}",
            "tls": {"certificates": [{"cert_file": str(devpki.server_cert),
                                      "key_file": str(devpki.server_key)}]},
            "mutual_tls": {"truststore_uri": str(devpki.truststore)},
            "routes": routes or [{"path_prefix": "/",
                                  "upstream": f"http://127.0.0.1:{upstream_port}"}],
        }],
        "admin": {"address": f"127.0.0.1:{admin}"},
        **top,
    }
    path = tmp / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "mtlsproxy", "run", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pp = ProxyProcess(proc, port, admin)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if pp.admin_get("/readyz")[0] == 200:
                return pp
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("proxy did not become ready")


def stop_proxy(pp: ProxyProcess) -> None:
    """SIGTERM, then check that nothing escaped to its event loop or crashed."""
    if pp.proc.poll() is None:
        pp.proc.send_signal(signal.SIGTERM)
        try:
            pp.proc.wait(15)
        except subprocess.TimeoutExpired:
            pp.proc.kill()
            pp.proc.wait()
    err = pp.proc.stderr.read() if pp.proc.stderr else ""
    for stream in (pp.proc.stdout, pp.proc.stderr):
        if stream:
            stream.close()
    # Whatever the test did, nothing escaped to the process's event loop or crashed.
    for sign in ("Traceback", "never retrieved", "Exception in callback"):
        assert sign not in err, err[-3000:]
