"""Requests at saturation beside nginx, in one run (issue 26, item 1): wrk with a Lua script
drives each proxy with heads like real traffic, identical or never repeating, and with each
certificate-header family.

    python bench/saturate.py [--rounds 3] [--seconds 10] [--only identical,unique,...]

Installs nothing. Needs nginx, wrk, gcc and libssl-dev (the client-certificate shim
bench/mtls_preload.c, built here: wrk has no client-certificate option).

Scenarios (wrk -t1 -c50, keep-alive, the 13-byte nginx upstream):
- identical: the same ~700-byte head on every request (a browser's or API client's fields:
  User-Agent, Accept*, a cookie, a bearer token, traceparent, X-Request-Id).
- unique: the same fields, but the path, query, cookie, token, trace and request ids
  differ on every request, as in real traffic.
- unique-rfc9440, unique-xfcc: unique heads, the client certificate forwarded whole
  (``forward_client_cert: [rfc9440]``, ~1 KB; nginx: ``$ssl_client_escaped_cert``) or in
  Envoy's XFCC (nginx: its subject and fingerprint, the nearest it has).
- unique_both: unique request heads, and response heads that never repeat either: the
  upstream echoes the request's X-Request-Id and sets a cookie with a new value on every
  response (an application server's answer), so no response head is seen twice.
- workers2: unique heads, mtlsproxy ``workers: 2`` against nginx ``worker_processes 2``,
  both unpinned, wrk on the same two cores (``-t2``): the generator shares the cores.
The other scenarios run with each proxy pinned to core 0 and wrk and the upstream on core
1. Reported: requests/s, and the proxy's CPU per request (user + system of its own
processes, from /proc), as ratios to nginx in the same round.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402

FIELDS = """
  headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 " ..
    "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"
  headers["Accept"] = "application/json, text/plain, */*"
  headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
  headers["Accept-Language"] = "en-GB,en-US;q=0.9,en;q=0.8"
  headers["Cookie"] = "session=" .. id .. "; theme=dark; consent=essential,analytics; lb=" ..
    (n % 7)
  headers["Authorization"] = "Bearer eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9." ..
    id .. id .. id .. id .. "." .. id .. id .. id
  headers["traceparent"] = "00-" .. id .. id .. "-" .. id .. "-01"
  headers["X-Request-Id"] = id .. "-" .. n
  return wrk.format("GET", "/api/v1/accounts/" .. n .. "/orders?page=" .. (n % 97) ..
    "&sort=-created&q=" .. id, headers)
"""

UNIQUE = """
local n = 0
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  n = n + 1
  local id = string.format("%08x%08x", math.random(0, 2147483647), n)
  local headers = {}
""" + FIELDS + "end\n"

IDENTICAL = """
request = function()
  local n = 4242
  local id = "5f0c1e2d3a4b5c6d"
  local headers = {}
""" + FIELDS + "end\n"


def unique_upstream_conf(d: Path, port: int) -> Path:
    """The 13-byte upstream, answering with two fields that differ on every response (what
    an application server sends: its request id, a session cookie)."""
    conf = d / "upstream-unique.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {d}/upstream-unique.pid;
error_log {d}/upstream-unique-error.log; worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port} backlog=4096; keepalive_requests 1000000;
           location / {{ add_header X-Request-Id $http_x_request_id;
                        add_header Set-Cookie "sid=$request_id; Path=/; Secure; HttpOnly";
                        return 200 "hello world!\\n"; }} }}
}}
""")
    return conf


def mtlsproxy_conf(d: Path, pki: Path, up: int, port: int, admin: int, family: str,
                   workers: int) -> Path:
    conf = d / f"mtlsproxy-sat-{port}.yaml"
    conf.write_text(f"""
workers: {workers}
listeners:
  - name: bench
    address: 127.0.0.1:{port}
    tls: {{certificates: [{{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}]}}
    mutual_tls: {{truststore_uri: {pki}/truststore.pem, forward_client_cert: [{family}]}}
    routes: [{{path_prefix: /, upstream: "http://127.0.0.1:{up}"}}]
    limits: {{max_connections: 20000}}
admin: {{address: "127.0.0.1:{admin}"}}
access_log: false
""")
    return conf


NGINX_HEADERS = {
    "details": "proxy_set_header X-Client-Cert-Subject $ssl_client_s_dn;",
    "rfc9440": "proxy_set_header Client-Cert $ssl_client_escaped_cert;",
    "xfcc": ('proxy_set_header X-Forwarded-Client-Cert '
             '"Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";'),
}


def nginx_conf(d: Path, pki: Path, up: int, port: int, family: str, workers: int) -> Path:
    conf = d / f"nginx-sat-{port}.conf"
    conf.write_text(f"""
worker_processes {workers}; daemon off; pid {d}/nginx-sat-{port}.pid;
error_log {d}/nginx-sat.log; worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096 {"reuseport" if workers > 1 else ""};
    keepalive_requests 1000000;
    ssl_certificate {pki}/server.pem; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/truststore.pem; ssl_verify_client on; ssl_verify_depth 4;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://up; proxy_http_version 1.1;
                 proxy_set_header Connection ""; {NGINX_HEADERS[family]} }}
  }}
}}
""")
    return conf


class SaturateBench(base.Bench):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.shim = self.d / "mtls_preload.so"
        self.scripts = {"identical": self.d / "identical.lua", "unique": self.d / "unique.lua"}
        self.scripts["identical"].write_text(IDENTICAL)
        self.scripts["unique"].write_text(UNIQUE)

    def build_shim(self) -> None:
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(self.shim),
                        str(Path(__file__).parent / "mtls_preload.c"), "-ldl", "-lssl"],
                       check=True)

    def pair(self, family: str, workers: int, up: int | None = None) -> list[base.Target]:
        """mtlsproxy and nginx for one family and worker count (pinned when 1 worker), in
        front of the upstream on port ``up`` (default: the 13-byte one)."""
        cpu = base.PROXY_CPU if workers == 1 else None
        up = self.up if up is None else up
        port, admin = base.free_port(), base.free_port()
        proc = self.start([self.args.python, "-m", "mtlsproxy", "run", "--config",
                           str(mtlsproxy_conf(self.d, self.pki, up, port, admin, family,
                                              workers))], cpu, port)
        ours = base.Target("mtlsproxy", port, proc, workers > 1, admin)
        for _ in range(200):
            try:
                if ours.metric("mtlsproxy_ready") >= 1 and (
                        workers == 1 or len(ours.pids()) == workers):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        port = base.free_port()
        proc = self.start(["nginx", "-c", str(nginx_conf(self.d, self.pki, up, port,
                                                         family, workers))], cpu, port)
        return [ours, base.Target("nginx", port, proc, True)]

    def wrk(self, t: base.Target, script: Path, threads: int,
            pinned: bool) -> tuple[float, int]:
        """(requests/s, requests) of one wrk run."""
        env = {"LD_PRELOAD": str(self.shim), "MTLS_CERT": str(self.pki / "client.pem"),
               "MTLS_KEY": str(self.pki / "client.key"), "PATH": os.environ["PATH"]}
        out = subprocess.run(
            ["wrk", f"-t{threads}", "-c50", f"-d{self.args.seconds}s", "-s", str(script),
             f"https://127.0.0.1:{t.port}/"], capture_output=True, text=True, env=env,
            preexec_fn=base.pinned(base.LOAD_CPU) if pinned else None)
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
        count = re.search(r"(\d+) requests in", out.stdout)
        if not rate or not count or "Non-2xx" in out.stdout or "Socket errors" in out.stdout:
            raise SystemExit(f"wrk against {t.name}:\n{out.stdout}{out.stderr}")
        return float(rate.group(1)), int(count.group(1))

    def scenario(self, label: str, family: str, script: str, workers: int = 1,
                 up: int | None = None) -> None:
        targets = self.pair(family, workers, up)
        rate = self.row(label, "requests/s", lower_is_better=False)
        cpu = self.row(label, "proxy CPU us/request")
        # The same CPU split in two: the kernel's share (sockets, TCP on loopback) is much
        # the same for both proxies; the user share is where they differ.
        user = self.row(label, "- of which user us/request")
        system = self.row(label, "- of which system us/request")
        pinned = workers == 1
        for t in targets:  # warm-up: connections, caches
            self.wrk(t, self.scripts[script], 1 if pinned else 2, pinned)
        for _ in self.rounds():
            for t in targets:
                u0, s0 = base.cpu_split(t.pids())
                r, requests = self.wrk(t, self.scripts[script], 1 if pinned else 2, pinned)
                u1, s1 = base.cpu_split(t.pids())
                rate.add(t.name, r)
                cpu.add(t.name, (u1 - u0 + s1 - s0) / requests * 1e6)
                user.add(t.name, (u1 - u0) / requests * 1e6)
                system.add(t.name, (s1 - s0) / requests * 1e6)
        for t in targets:
            t.proc.terminate()
            t.proc.wait(30)

    def identical(self) -> None:
        self.scenario("identical heads, details", "details", "identical")

    def unique(self) -> None:
        self.scenario("unique heads, details", "details", "unique")

    def unique_rfc9440(self) -> None:
        self.scenario("unique heads, rfc9440 (nginx: escaped cert)", "rfc9440", "unique")

    def unique_xfcc(self) -> None:
        self.scenario("unique heads, xfcc", "xfcc", "unique")

    def unique_both(self) -> None:
        up = base.free_port()
        self.start(["nginx", "-c", str(unique_upstream_conf(self.d, up))], base.LOAD_CPU, up)
        self.scenario("unique request and response heads, details", "details", "unique",
                      up=up)

    def workers2(self) -> None:
        self.scenario("unique heads, 2 workers each, unpinned, wrk -t2 beside them",
                      "details", "unique", workers=2)


SCENARIOS = ("identical", "unique", "unique_rfc9440", "unique_xfcc", "unique_both",
             "workers2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs mtlsproxy (default: this one)")
    args = ap.parse_args()
    args.nginx_session_cache = False
    missing = [t for t in ("nginx", "wrk", "gcc", "pgrep") if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {' '.join(missing)} (Debian: apt-get install nginx wrk gcc "
              "libssl-dev procps); nothing was installed", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    runtime = base.interpreter(args.python)
    bench = SaturateBench(args)
    try:
        bench.build_shim()
        bench.start(["nginx", "-c", str(base.nginx_upstream_conf(bench.d, bench.up))],
                    base.LOAD_CPU, bench.up)
        for name in SCENARIOS:
            if name in chosen:
                print(f"running {name} ...", flush=True)
                getattr(bench, name)()
        print()
        print("\n".join(line for line in base.versions(args.python, runtime, False)
                        .splitlines() if not line.startswith(("- envoy", "- ab", "- openssl"))))
        compiled = subprocess.run(
            [args.python, "-c", "from mtlsproxy.http import speedups; print(speedups.COMPILED)"],
            capture_output=True, text=True).stdout.strip()
        print(f"- mtlsproxy's compiled head split and upstream head (http/_speedups.pyx): "
              f"{'in use' if compiled == 'True' else 'not in use (pure Python)'}")
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        print(f"- {(wrk.stdout or wrk.stderr).splitlines()[0]}")
        print(f"- {args.rounds} rounds of {args.seconds} s, medians; wrk -c50 keep-alive")
        print()
        print(bench.table(("mtlsproxy", "nginx")))
    finally:
        bench.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
