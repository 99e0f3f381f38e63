"""The harness: the real proxy and a real upstream on loopback, driven from a test."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client import CollectorRegistry

from mtlsproxy.config import load_config
from mtlsproxy.dev.echo import start_echo
from mtlsproxy.server.proxy_server import ProxyServer
from tests.support.clock import FakeClock
from tests.support.loops import LoopThread
from tests.support.pki import PKI, Cert

T = TypeVar("T")


class Harness:
    def __init__(self, loop: LoopThread, pki: PKI, tmp: Path) -> None:
        self.loop = loop
        self.pki = pki
        self.tmp = tmp
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.server: ProxyServer | None = None
        self.echo: asyncio.Server | None = None
        self.echo_port = 0
        self.access_lines: list[str] = []
        self.servers: list[asyncio.Server] = []  # extra upstreams the tests start
        self.default_parser = "httptools"
        # How ``get`` talks to the proxy: "http1", or "h2" (tests parametrised over both).
        self.protocol = "http1"
        self.config_file = tmp / "proxy.yaml"

    def start_echo(self) -> int:
        async def go() -> int:
            self.echo = await start_echo()
            return int(self.echo.sockets[0].getsockname()[1])
        self.echo_port = self.loop.run(go())
        return self.echo_port

    def config(self, **listener: Any) -> dict[str, Any]:
        """A one-listener config dict; keyword arguments override listener keys."""
        if not self.echo_port:
            self.start_echo()
        upstream = listener.pop("upstream", None) or f"http://127.0.0.1:{self.echo_port}"
        top = listener.pop("top", {})
        base: dict[str, Any] = {
            "name": "public",
            "address": "127.0.0.1:0",
            "tls": {"certificates": [{"cert_file": str(self.pki.server_cert),
                                      "key_file": str(self.pki.server_key)}]},
            "mutual_tls": {"truststore_uri": str(self.pki.truststore)},
            "routes": [{"path_prefix": "/", "upstream": upstream}],
        }
        base.update(listener)
        return {"listeners": [base], "admin": {"address": "127.0.0.1:0"}, **top}

    def start(self, raw: dict[str, Any] | None = None, parser: str | None = None) -> ProxyServer:
        if not self.echo_port:
            self.start_echo()
        raw = raw or self.config()
        raw.setdefault("parser", parser or self.default_parser)
        self.config_file.write_text(yaml.safe_dump(raw))
        config = load_config(self.config_file)

        class Sink:
            def write(s, text: str) -> int:  # noqa: N805
                self.access_lines.extend(t for t in text.splitlines() if t)
                return len(text)

            def flush(s) -> None:  # noqa: N805
                pass

        async def go() -> ProxyServer:
            server = ProxyServer(config, self.registry, self.clock, Sink())  # type: ignore[arg-type]
            await server.start()
            return server
        self.server = self.loop.run(go())
        return self.server

    def serve(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Coroutine[Any, Any, None]],
              rcvbuf: int | None = None, tls: ssl.SSLContext | None = None) -> int:
        """A small server of the test's on loopback, closed with the harness; its port.
        ``rcvbuf``: its sockets' receive buffer, small to make a sender's writes back up
        soon. ``tls``: the server's context, for an https upstream or key server."""
        async def go() -> int:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if rcvbuf is not None:  # inherited by accepted sockets (socket(7))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind(("127.0.0.1", 0))
            server = await asyncio.start_server(handler, sock=sock, ssl=tls)
            self.servers.append(server)
            return int(server.sockets[0].getsockname()[1])
        return self.loop.run(go())

    def reload(self, raw: dict[str, Any]) -> list[str]:
        """Rewrite the config file and reload it, as SIGHUP does."""
        raw.setdefault("parser", self.default_parser)
        self.config_file.write_text(yaml.safe_dump(raw))
        assert self.server is not None
        return self.loop.run(self.server.reload_from_file())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.loop.call(lambda: self.server.listeners[0].bound_port)  # type: ignore[union-attr]

    @property
    def admin_port(self) -> int:
        assert self.server is not None and self.server.admin is not None
        return self.server.admin.bound_port

    # Labels a test may leave out, and the value they then mean: ``domain=""`` (as in
    # PromQL, where an empty label is no label: a listener without domains) and
    # ``protocol="http1"`` (a request over HTTP/1.1).
    DEFAULT_LABELS = {"domain": "", "protocol": "http1"}

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value (0 when absent); see ``DEFAULT_LABELS``."""
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name != name:
                    continue
                extra = sample.labels.keys() - labels.keys()
                if all(sample.labels.get(k) == v for k, v in labels.items()) and all(
                        self.DEFAULT_LABELS.get(k, None) == sample.labels[k] for k in extra):
                    return float(sample.value)
        return 0.0

    def client_context(self, cert: Cert | None = None, *, with_cert: bool = True,
                       name: str = "client", **kw: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.directory / "root.pem"))
        # The client side must be able to PRESENT weak certificates: the server judges them.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        if with_cert:
            c, k = self.pki.client_files(cert, name)
            ctx.load_cert_chain(str(c), str(k))
        for attr, value in kw.items():
            setattr(ctx, attr, value)
        return ctx

    def https(self, ctx: ssl.SSLContext | None = None, timeout: float = 10
              ) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("localhost", self.port,
                                           context=ctx or self.client_context(),
                                           timeout=timeout)

    def get(self, path: str = "/", ctx: ssl.SSLContext | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.protocol == "h2":
            return self.h2_request("GET", path, list((headers or {}).items()), ctx)
        conn = self.https(ctx)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def h2_request(self, method: str, target: str, headers: list[tuple[str, str]],
                   ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request over HTTP/2 (ALPN h2), as ``get`` makes over HTTP/1.1: a Host
        among ``headers`` becomes :authority; names go lower-case, as HTTP/2 requires.
        (0, {}, b"") when the proxy ended the connection instead of answering."""
        from tests.support.h2client import H2Client
        authority = f"localhost:{self.port}"  # what http.client sends as Host
        fields = []
        for name, value in headers:
            if name.lower() == "host":
                authority = value
            else:
                fields.append((name.lower(), value))
        client = H2Client(self.port, ctx or self.client_context())
        try:
            r = client.get(target, method=method, authority=authority, headers=fields)
        finally:
            client.close()
        return r.status, {n.decode(): v.decode("latin-1") for n, v in r.headers}, r.body

    def echo_json(self, path: str = "/", **kw: Any) -> dict[str, Any]:
        status, _, body = self.get(path, **kw)
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def tls(self, ctx: ssl.SSLContext | None = None, timeout: float = 10,
            host: str = "127.0.0.1") -> Iterator[ssl.SSLSocket]:
        """A raw mTLS socket to the listener: the test writes and reads the bytes."""
        with socket.create_connection((host, self.port), timeout=timeout) as s:
            with (ctx or self.client_context()).wrap_socket(s, server_hostname="localhost") as t:
                yield t

    def raw(self, data: bytes, ctx: ssl.SSLContext | None = None, read_timeout: float = 10,
            host: str = "127.0.0.1") -> bytes:
        """Send raw bytes over an mTLS connection; return all bytes until the server closes."""
        with self.tls(ctx, read_timeout, host) as t:
            t.sendall(data)
            out = b""
            while True:
                try:
                    chunk = t.recv(65536)
                except (ssl.SSLError, ConnectionError):
                    break
                if not chunk:
                    break
                out += chunk
            return out

    def stop(self) -> None:
        async def go() -> None:
            if self.server is not None:
                self.server.draining = True
                for periodic in self.server._periodics():
                    periodic.stop()
                for lr in self.server.listeners:
                    lr.stop_accepting()
                    lr.stop_ticker()
                    for s in list(lr.sessions):
                        s.conn.abort()
                self.server.pool.close_all()
                if self.server.admin is not None:
                    self.server.admin.close()
            for srv in [*self.servers, *([self.echo] if self.echo else [])]:
                srv.close()
        self.loop.run(go())
