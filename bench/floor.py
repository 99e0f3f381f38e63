"""The floor under mtlsproxy: a bare Python forwarder, timed beside mtlsproxy and nginx.

    python bench/floor.py [--rounds 6] [--only keepalive,resumed]

The forwarder (this file with ``--serve``) pays what any Python proxy on this stack pays
and nothing more: uvloop, TLS through ``ssl.MemoryBIO`` with mtlsproxy's own server context
(the same certificate, client verification, ticket and cipher settings and session cache),
llhttp both ways, pooled keep-alive upstream connections. It does no routing, identity
check, header rewriting, metrics or limits: it sends the request target upstream with a
fixed head and answers with the upstream's body. What mtlsproxy costs above it is its own
work per request or connection (docs/performance.md, "Where the time goes").

Each proxy runs alone on the proxy core, as in run.py, with the same upstream and load;
rounds alternate between them and the table shows medians of the proxy's CPU per
operation. Needs what run.py needs (nginx, ab, openssl); installs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    PROXY_CPU,
    ab,
    cpu_split,
    free_port,
    mtlsproxy_conf,
    nginx_proxy_conf,
    nginx_upstream_conf,
    pinned,
    s_time,
    stop_processes,
    wait_port,
    write_dev_pki,
)

UPSTREAM_CONNECTIONS = 64  # more than the 50 keep-alive clients; no pool growth needed


# -- the forwarder ------------------------------------------------------------------------

class _Upstream(asyncio.Protocol):
    """A pooled keep-alive connection to the upstream."""

    def __init__(self, pool: list[_Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: _Client | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        body, self.body = b"".join(self.body), []
        self.pool.append(self)
        if client is not None:
            client.reply(body)


class _Client(asyncio.Protocol):
    """One client connection: handshake, requests, answers."""

    def __init__(self, ctx: ssl.SSLContext, pool: list[_Upstream]) -> None:
        self.ctx, self.pool = ctx, pool
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.parser = httptools.HttpRequestParser(self)
        self.open = False
        self.url = b""
        self.keep = True

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")  # as a proxy needs for logs
        self.tls = self.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.open:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.transport.write(self.outgoing.read())
                return
            except ssl.SSLError:
                self.transport.close()
                return
            self.open = True
            self.tls.getpeercert(True)  # the identity a proxy forwards
            if not self.incoming.pending and self.outgoing.pending:
                self.transport.write(self.outgoing.read())
        try:
            while self.incoming.pending or self.tls.pending():
                data = self.tls.read(16384)
                if not data:
                    self.transport.close()
                    return
                self.parser.feed_data(data)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        self.keep = self.parser.should_keep_alive()
        up = self.pool.pop()
        up.client = self
        up.transport.write(b"GET " + self.url + b" HTTP/1.1\r\nhost: upstream\r\n"
                           b"x-client-cert-subject: CN=client\r\n\r\n")

    def reply(self, body: bytes) -> None:
        # The connection stated either way: HTTP/1.0 clients (ab) keep it only when told.
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: %s\r\n\r\n" % (
            len(body), b"keep-alive" if self.keep else b"close")
        self.tls.write(head + body)
        if not self.keep:
            try:
                self.tls.unwrap()  # close_notify, as mtlsproxy sends
            except ssl.SSLError:
                pass
        self.transport.write(self.outgoing.read())
        if not self.keep:
            self.transport.close()


def serve(config: Path, upstream: int) -> None:
    import uvloop

    from mtlsproxy.config import load_config
    from mtlsproxy.tls.contexts import build_server_contexts
    from mtlsproxy.truststore.bundle import parse_bundle

    listener = load_config(config).listeners[0]
    bundle = parse_bundle(listener.mutual_tls.truststore_path.read_bytes())
    ctx = build_server_contexts(listener.tls, bundle, listener.name).default

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool: list[_Upstream] = []  # idle upstream connections (they return when answered)
        for _ in range(UPSTREAM_CONNECTIONS):
            _, proto = await loop.create_connection(lambda: _Upstream(pool), "127.0.0.1",
                                                    upstream)
            pool.append(proto)
        await loop.create_server(lambda: _Client(ctx, pool), listener.host, listener.port,
                                 backlog=1024)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- the comparison -----------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--only", default="keepalive,resumed")
    p.add_argument("--serve", nargs=2, metavar=("CONFIG", "UPSTREAM_PORT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return 0
    scenarios = args.only.split(",")
    d = Path(tempfile.mkdtemp(prefix="mtlsproxy-floor-"))
    pki = write_dev_pki(d / "pki").directory
    client = d / "client-combined.pem"
    client.write_bytes((pki / "client.pem").read_bytes() + (pki / "client.key").read_bytes())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up = free_port()
        procs.append(subprocess.Popen(["nginx", "-c", str(nginx_upstream_conf(d, up))]))
        wait_port(up, procs[-1])
        ports = [free_port() for _ in range(4)]
        confs = [mtlsproxy_conf(d, pki, up, port, ports[3], pki / "truststore.pem")
                 for port in ports[:2]]
        cmds = {
            "mtlsproxy": [sys.executable, "-m", "mtlsproxy", "run", "--config", str(confs[0])],
            "floor": [sys.executable, __file__, "--serve", str(confs[1]), str(up)],
            "nginx": ["nginx", "-c", str(nginx_proxy_conf(d, pki, up, ports[2],
                                                            pki / "truststore.pem"))],
        }
        targets: dict[str, tuple[int, int]] = {}
        for (name, cmd), port in zip(cmds.items(), ports, strict=False):
            proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL,
                                    preexec_fn=pinned(PROXY_CPU))
            procs.append(proc)
            for _ in range(100):
                try:
                    wait_port(port, proc)
                    break
                except SystemExit:
                    time.sleep(0.1)
            pid = proc.pid
            if name == "nginx":  # the worker does the work
                time.sleep(0.3)
                pid = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
            targets[name] = (port, pid)

        def once(scenario: str, port: int) -> int:
            if scenario == "keepalive":
                ab(port, client, 30000, 50, tmp=d)
                return 30000
            return s_time(port, pki, 4, True, 8)[0]

        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for scenario in scenarios:
            for port, _ in targets.values():
                once(scenario, port)  # warm: pools, session caches
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for scenario in scenarios:
                for name in order:
                    port, pid = targets[name]
                    u0, s0 = cpu_split([pid])
                    ops = once(scenario, port)
                    u1, s1 = cpu_split([pid])
                    results.setdefault((scenario, name), []).append(
                        ((u1 - u0) * 1e6 / ops, (s1 - s0) * 1e6 / ops))
        print(f"{args.rounds} alternating rounds, medians of the proxy's CPU per operation")
        print("| scenario | proxy | CPU us | user us | system us | x nginx |")
        print("|---|---|---|---|---|---|")
        for scenario in scenarios:
            base = statistics.median(u + s for u, s in results[(scenario, "nginx")])
            for name in targets:
                v = results[(scenario, name)]
                total = statistics.median(u + s for u, s in v)
                print(f"| {scenario} | {name} | {total:.1f} | "
                      f"{statistics.median(u for u, _ in v):.1f} | "
                      f"{statistics.median(s for _, s in v):.1f} | {total / base:.2f} |")
    finally:
        stop_processes(procs)
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
