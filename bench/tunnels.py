"""Tunnels through mtlsproxy beside nginx and HAProxy, in one run (issue 24, item 5):
TCP mode against nginx's ``stream {}`` with ``ssl_verify_client`` and HAProxy's
``mode tcp`` with ``verify required`` (ghostunnel is not packaged for Debian), and
WebSocket echo against nginx's ``proxy_pass`` with the upgrade headers and HAProxy's
``mode http``.

    python bench/tunnels.py [--rounds 3] [--quick] [--only tcp,ws] [--no-haproxy]

Installs nothing. Needs nginx with its stream module (Debian: nginx libnginx-mod-stream),
haproxy (measured when installed), and the websockets package (the WebSocket peers,
bench/tunnel_peer.py).

Scenarios, each proxy in turn inside every round:
- tcp: 4 TLS connections each write 64 MiB (256 with --quick off: see --mib) to a TCP echo
  service and read it back at once; the proxy relays both directions.
- ws: 4 WebSocket connections each send 64 KiB binary messages (8 in flight) to an echo
  server and read the echoes.
Reported per proxy: payload MiB/s through the proxy (both directions) and the proxy's CPU
per MiB. With two cores the proxy is pinned to core 0 and the clients and echo servers
share core 1: the rates are bounded by those Python peers as much as by the proxies, so
compare CPU per MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402

PEER = str(Path(__file__).parent / "tunnel_peer.py")
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def mtlsproxy_conf(d: Path, pki: Path, echo: int, ws_echo: int, tcp: int, ws: int,
                   admin: int) -> Path:
    conf = d / "mtlsproxy-tunnels.yaml"
    common = f"""
    tls: {{certificates: [{{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}]}}
    mutual_tls: {{truststore_uri: {pki}/truststore.pem, forward_client_cert: [details]}}"""
    conf.write_text(f"""
workers: 1
listeners:
  - name: tcp
    address: 127.0.0.1:{tcp}{common}
    tcp: {{upstream: "127.0.0.1:{echo}"}}
    timeouts: {{idle: 300}}
  - name: ws
    address: 127.0.0.1:{ws}{common}
    routes: [{{path_prefix: /, upstream: "http://127.0.0.1:{ws_echo}"}}]
    timeouts: {{idle: 300}}
admin: {{address: "127.0.0.1:{admin}"}}
access_log: false
""")
    return conf


def nginx_conf(d: Path, pki: Path, echo: int, ws_echo: int, tcp: int, ws: int) -> Path:
    conf = d / "nginx-tunnels.conf"
    tls = f"""ssl_certificate {pki}/server.pem; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/truststore.pem; ssl_verify_client on; ssl_verify_depth 4;
    ssl_protocols TLSv1.2 TLSv1.3;"""
    conf.write_text(f"""
load_module {NGINX_STREAM_MODULE};
worker_processes 1; daemon off; pid {d}/nginx-tunnels.pid; error_log {d}/nginx-tunnels.log;
worker_rlimit_nofile 65536;
events {{ worker_connections 4096; }}
stream {{
  server {{ listen 127.0.0.1:{tcp} ssl; {tls}
           proxy_pass 127.0.0.1:{echo}; proxy_timeout 300s; }}
}}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{ws} ssl; {tls}
    location / {{ proxy_pass http://127.0.0.1:{ws_echo}; proxy_http_version 1.1;
                 proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade;
                 proxy_set_header X-Client-Cert-Subject $ssl_client_s_dn;
                 proxy_read_timeout 300s; }}
  }}
}}
""")
    return conf


def haproxy_conf(d: Path, pki: Path, echo: int, ws_echo: int, tcp: int, ws: int) -> Path:
    combined = d / "haproxy-server.pem"
    combined.write_bytes((pki / "server.pem").read_bytes() + (pki / "server.key").read_bytes())
    conf = d / "haproxy-tunnels.cfg"
    bind = f"ssl crt {combined} ca-file {pki}/truststore.pem verify required"
    conf.write_text(f"""
global
  maxconn 4096
  nbthread 1
defaults
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout tunnel 300s
frontend tcpfe
  mode tcp
  bind 127.0.0.1:{tcp} {bind}
  default_backend tcpbe
backend tcpbe
  mode tcp
  server echo 127.0.0.1:{echo}
frontend wsfe
  mode http
  bind 127.0.0.1:{ws} {bind}
  http-request set-header X-Client-Cert-Subject %[ssl_c_s_dn]
  default_backend wsbe
backend wsbe
  mode http
  server ws 127.0.0.1:{ws_echo}
""")
    return conf


class TunnelBench(base.Bench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.echo = self.ws_echo = 0
        self.ws_ports: dict[str, int] = {}

    def start_targets(self) -> None:
        tcp, ws, admin = base.free_port(), base.free_port(), base.free_port()
        conf = mtlsproxy_conf(self.d, self.pki, self.echo, self.ws_echo, tcp, ws, admin)
        proc = self.start([self.args.python, "-m", "mtlsproxy", "run", "--config", str(conf)],
                          base.PROXY_CPU, tcp)
        base.wait_port(ws, proc)
        self.targets.append(base.Target("mtlsproxy", tcp, proc, False, admin))
        self.ws_ports["mtlsproxy"] = ws
        tcp, ws = base.free_port(), base.free_port()
        proc = self.start(["nginx", "-c", str(nginx_conf(self.d, self.pki, self.echo,
                                                         self.ws_echo, tcp, ws))],
                          base.PROXY_CPU, tcp)
        self.targets.append(base.Target("nginx", tcp, proc, True))
        self.ws_ports["nginx"] = ws
        if shutil.which("haproxy") and not self.args.no_haproxy:
            tcp, ws = base.free_port(), base.free_port()
            proc = self.start(["haproxy", "-db", "-f", str(haproxy_conf(
                self.d, self.pki, self.echo, self.ws_echo, tcp, ws))], base.PROXY_CPU, tcp)
            self.targets.append(base.Target("haproxy", tcp, proc, False))
            self.ws_ports["haproxy"] = ws
        else:
            print("haproxy: not measured (not installed, or --no-haproxy)")

    def _client(self, t: base.Target, mode: str, port: int, *extra: str) -> tuple[float, float]:
        out = subprocess.run([sys.executable, PEER, mode, f"127.0.0.1:{port}", str(self.pki),
                              *extra], capture_output=True, text=True,
                             preexec_fn=base.pinned(base.LOAD_CPU))
        if out.returncode != 0:
            raise SystemExit(f"{mode} through {t.name}: {out.stderr[-2000:]}")
        result = json.loads(out.stdout)
        return result["bytes"] / (1024 * 1024), result["seconds"]

    def tcp(self) -> None:
        mib = "64" if self.args.quick else str(self.args.mib)
        self.measured(f"TCP relay, 4 connections echoing {mib} MiB", "MiB",
                      lambda t: self._client(t, "tcp-client", t.port, "--mib", mib,
                                             "--conns", "4"))

    def ws(self) -> None:
        mib = "64" if self.args.quick else str(self.args.mib)
        self.measured(f"WebSocket echo, 4 connections, 64 KiB messages, {mib} MiB", "MiB",
                      lambda t: self._client(t, "ws-client", self.ws_ports[t.name],
                                             "--mib", mib, "--size", "65536",
                                             "--conns", "4"))


SCENARIOS = ("tcp", "ws")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="less data (a smoke run)")
    ap.add_argument("--mib", type=int, default=256, help="MiB each scenario sends")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs mtlsproxy (default: this one)")
    args = ap.parse_args()
    args.nginx_session_cache = False
    missing = [t for t in ("nginx", "pgrep") if shutil.which(t) is None]
    if missing or not NGINX_STREAM_MODULE.exists():
        print(f"missing: {' '.join(missing) or NGINX_STREAM_MODULE} (Debian: apt-get install "
              "nginx libnginx-mod-stream procps); nothing was installed", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    runtime = base.interpreter(args.python)
    bench = TunnelBench(args)
    try:
        bench.echo = bench.start_peer([sys.executable, PEER, "tcp-echo"], "tcp-echo")
        bench.ws_echo = bench.start_peer([sys.executable, PEER, "ws-echo"], "ws-echo")
        bench.start_targets()
        time.sleep(0.5)
        for name in SCENARIOS:
            if name in chosen:
                print(f"running {name} ...", flush=True)
                getattr(bench, name)()
        print()
        print("\n".join(line for line in base.versions(args.python, runtime, False).splitlines()
                        if not line.startswith(("- envoy", "- ab", "- openssl"))))
        if any(t.name == "haproxy" for t in bench.targets):
            v = subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
            print(f"- {v.stdout.splitlines()[0]}")
        from importlib.metadata import version
        print(f"- websockets {version('websockets')} (peers, Python on uvloop)")
        print(f"- {args.rounds} rounds, medians; proxies pinned to core {base.PROXY_CPU}, "
              f"clients and echo servers on core {base.LOAD_CPU}"
              if base.TWO_CORES else "- one core: no pinning")
        print()
        print(bench.table(("mtlsproxy", "nginx", "haproxy")))
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
