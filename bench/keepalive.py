"""Rough keep-alive cost: proxy CPU per request, mtlsproxy vs nginx, in the same run.

    python bench/keepalive.py [--requests 20000] [--concurrency 50] [--rounds 3]

Needs nginx and ab (Debian: nginx, apache2-utils); installs nothing. Both proxies get the
same dev PKI, the same nginx upstream (13-byte body) and the same load; CPU is read from
/proc for the proxy processes only, so the load generator's CPU does not count. The full
benchmark suite (handshakes, latency, memory, swap) is issue #4's work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mtlsproxy.pki import write_dev_pki  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def nginx_conf(d: Path, pki: Path, up_port: int, tls_port: int) -> Path:
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{up_port}; keepalive_requests 1000000;
           location / {{ return 200 "hello world!\\n"; }} }}
  server {{
    listen 127.0.0.1:{tls_port} ssl;
    keepalive_requests 1000000;
    ssl_certificate {pki}/server.pem; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/truststore.pem; ssl_verify_client on; ssl_verify_depth 4;
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
                 proxy_set_header Connection "";
                 proxy_set_header X-Client-Cert-Subject $ssl_client_s_dn; }}
  }}
}}
""")
    return conf


def run_ab(port: int, cert: Path, n: int, c: int) -> float:
    out = subprocess.run(["ab", "-q", "-k", "-n", str(n), "-c", str(c), "-E", str(cert),
                          f"https://127.0.0.1:{port}/"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("Failed requests:") and line.split()[-1] != "0":
            raise SystemExit(out.stdout)
        if line.startswith("Requests per second:"):
            return float(line.split()[3])
    raise SystemExit(out.stdout + out.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for tool in ("nginx", "ab"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install nginx apache2-utils")
    d = Path(tempfile.mkdtemp(prefix="mtlsproxy-bench-"))
    pki = write_dev_pki(d / "pki").directory
    combined = d / "client-combined.pem"
    combined.write_bytes((pki / "client.pem").read_bytes() + (pki / "client.key").read_bytes())
    up_port, nginx_port, proxy_port = free_port(), free_port(), free_port()
    nginx = subprocess.Popen(["nginx", "-c", str(nginx_conf(d, pki, up_port, nginx_port))])
    cfg = d / "proxy.yaml"
    cfg.write_text(f"""
listeners:
  - name: bench
    address: 127.0.0.1:{proxy_port}
    tls: {{certificates: [{{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}]}}
    mutual_tls: {{truststore_uri: {pki}/truststore.pem, forward_client_cert: [details]}}
    routes: [{{path_prefix: /, upstream: "http://127.0.0.1:{up_port}"}}]
admin: false
access_log: false
""")
    proxy = subprocess.Popen([sys.executable, "-m", "mtlsproxy", "run", "--config", str(cfg)])
    try:
        wait_port(nginx_port)
        wait_port(proxy_port)
        time.sleep(0.5)
        workers = [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True).stdout.split()]
        results: dict[str, list[tuple[float, float]]] = {"mtlsproxy": [], "nginx": []}
        for _ in range(args.rounds):
            for name, port, pids in (("mtlsproxy", proxy_port, [proxy.pid]),
                                     ("nginx", nginx_port, workers)):
                before = cpu_seconds(pids)
                rps = run_ab(port, combined, args.requests, args.concurrency)
                used = cpu_seconds(pids) - before
                results[name].append((rps, used / args.requests * 1e6))
        print(f"{'proxy':<10} {'req/s (median)':>15} {'CPU us/req (median)':>20}")
        med = {}
        for name, rows in results.items():
            med[name] = (statistics.median(r for r, _ in rows),
                         statistics.median(c for _, c in rows))
            print(f"{name:<10} {med[name][0]:>15.0f} {med[name][1]:>20.1f}")
        print(f"ratio mtlsproxy/nginx CPU per request: {med['mtlsproxy'][1] / med['nginx'][1]:.2f}")
    finally:
        proxy.send_signal(signal.SIGTERM)
        nginx.send_signal(signal.SIGQUIT)
        proxy.wait(30)
        nginx.wait(30)


if __name__ == "__main__":
    main()
