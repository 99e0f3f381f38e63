"""Shared fixtures: generated PKI (trustme + a small cryptography helper for the bad
certificates trustme cannot make), an injectable clock, and a harness that runs the real
proxy and a real upstream on loopback in a background event loop (uvloop or asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
import uvloop
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry

from mtlsproxy.config import load_config
from mtlsproxy.dev.echo import start_echo
from mtlsproxy.dev.pki import DevPKI, write_dev_pki
from mtlsproxy.server.proxy_server import ProxyServer

T = TypeVar("T")
UTC = dt.UTC


# -- certificates -------------------------------------------------------------------------

@dataclass
class Cert:
    """A certificate and key as PEM, written to files on demand."""

    cert: x509.Certificate
    key: Any
    chain: list[x509.Certificate] = field(default_factory=list)  # intermediates after leaf

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in [self.cert, *self.chain])

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        c, k = directory / f"{name}.pem", directory / f"{name}.key"
        c.write_bytes(self.cert_pem())
        k.write_bytes(self.key_pem())
        return c, k


def make_cert(cn: str, issuer: Cert | None = None, *, key: Any = None, ca: bool = False,
              hash_alg: hashes.HashAlgorithm | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              eku: list[x509.ObjectIdentifier] | None = None, dns: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), ocsp_url: str | None = None) -> Cert:
    """The cryptography helper: any key type, hash, validity, EKU and SANs."""
    now = dt.datetime.now(UTC)
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtlsproxy tests"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer.cert.subject if issuer else subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or now - dt.timedelta(days=1))
         .not_valid_after(not_after or now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         # Key identifiers, as every real CA sets them: Python 3.13's default client
         # context (VERIFY_X509_STRICT) refuses a certificate without an AKI.
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             (issuer.key if issuer else key).public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ocsp_url:
        b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP,
            x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    signer = issuer.key if issuer else key
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        algo = None
    else:
        algo = hash_alg or hashes.SHA256()
    cert = b.sign(signer, algo)
    chain = [issuer.cert, *issuer.chain] if issuer else []
    # Roots are not sent by clients; keep only intermediates in the presented chain.
    chain = [c for c in chain if c.issuer != c.subject]
    return Cert(cert, key, chain)


def make_sha1_cert(cn: str, issuer: Cert, tmp: Path, ca: bool = False) -> Cert:
    """cryptography refuses to sign with SHA-1; the openssl binary still does."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    (tmp / "sha1.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    ca_cert, ca_key = issuer.write(tmp, "sha1-issuer")
    (tmp / "sha1.ext").write_text("basicConstraints=critical,CA:TRUE\n" if ca
                                  else "extendedKeyUsage=clientAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(tmp / "sha1.csr"), "-CA", str(ca_cert),
                    "-CAkey", str(ca_key), "-CAcreateserial", "-sha1", "-days", "30",
                    "-extfile", str(tmp / "sha1.ext"), "-out", str(tmp / "sha1.pem")],
                   check=True, capture_output=True)
    cert = x509.load_pem_x509_certificate((tmp / "sha1.pem").read_bytes())
    return Cert(cert, key, [issuer.cert, *issuer.chain])


def tamper(cert: Cert) -> Cert:
    """Flip one byte inside the subject CN: the DER still parses, the signature fails."""
    der = bytearray(cert.der)
    cn = b"tamper-me"
    i = bytes(der).find(cn)
    assert i > 0
    der[i] = ord("T")
    return Cert(x509.load_der_x509_certificate(bytes(der)), cert.key, cert.chain)


@dataclass
class PKI:
    directory: Path
    root: Cert
    inter: Cert
    server_cert: Path
    server_key: Path
    truststore: Path
    client: Cert

    def client_files(self, cert: Cert | None = None, name: str = "client") -> tuple[Path, Path]:
        return (cert or self.client).write(self.directory, name)


def _trustme_to_cert(ca: trustme.CA) -> Cert:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    return Cert(cert, key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Root -> intermediate (trustme); server leaf for localhost; a good client leaf."""
    d = tmp_path_factory.mktemp("pki")
    root_ca = trustme.CA(organization_name="mtlsproxy tests root")
    inter_ca = root_ca.create_child_ca()
    server = inter_ca.issue_cert("localhost", "127.0.0.1", "api.example.test")
    server_cert, server_key = d / "server.pem", d / "server.key"
    server_cert.write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    server_key.write_bytes(server.private_key_pem.bytes())
    (d / "root.pem").write_bytes(root_ca.cert_pem.bytes())
    root = _trustme_to_cert(root_ca)
    inter = _trustme_to_cert(inter_ca)
    truststore = d / "truststore.pem"
    truststore.write_bytes(inter_ca.cert_pem.bytes() + root_ca.cert_pem.bytes())
    client = make_cert("good-client", inter, dns=("client.example.test",),
                       uris=("spiffe://prod.example.test/ns/payments/sa/api",))
    return PKI(d, root, inter, server_cert, server_key, truststore, client)


# -- small helpers shared by test modules -------------------------------------------------

def tool(name: str) -> str:
    """A console script of the test extras: beside this interpreter first (a fresh pyenv or
    venv may not have it on PATH yet), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def freeing_thread(obj: object) -> list[str]:
    """A list that receives the name of the thread on which ``obj`` is freed."""
    import weakref
    names: list[str] = []
    weakref.finalize(obj, lambda: names.append(threading.current_thread().name))
    return names


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll until ``predicate()``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


async def read_post_body(reader: asyncio.StreamReader) -> bytes:
    """The body of one Content-Length request, for the small servers tests run."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return await reader.readexactly(length)


# -- clock ------------------------------------------------------------------------------

class FakeClock:
    """Injected into the proxy: the policy's notion of now, moved by tests."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(UTC) + self.offset

    def advance(self, delta: dt.timedelta) -> None:
        self.offset += delta


# -- the harness --------------------------------------------------------------------------

class LoopThread:
    """An event loop of the requested kind running in a daemon thread."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        # What reached the loop's exception handler: an exception that escaped a protocol
        # callback or a task nobody awaited. The proxy must never let one escape
        # (``unhandled``; harness_for fails the test on any).
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._record)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _record(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)

    def unhandled(self) -> list[str]:
        """The exceptions that escaped, less cancellations (the teardown cancels every
        task, and 3.11's asyncio.streams re-raises a cancelled handler's CancelledError
        from a callback)."""
        return [f"{c.get('message')}: {c.get('exception')!r}" for c in self.errors
                if not isinstance(c.get("exception"), asyncio.CancelledError)]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper())

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        self.run(cancel_all())
        # A task freed with its exception unread reports it when collected: generation 0
        # is enough for the young garbage of one test (a full collection per test cost the
        # suite ~30 s).
        self.call(lambda: gc.collect(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()



def start_slow_upstream(loop: LoopThread, on_request: Callable[[], None],
                        delay: float = 1.5) -> tuple[asyncio.Server, int]:
    """An upstream that answers ``done`` ``delay`` seconds after each request head arrives;
    ``on_request`` runs (on the loop) when a head arrives. For drain tests."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        on_request()
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        writer.close()

    async def serve() -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        return server, int(server.sockets[0].getsockname()[1])
    return loop.run(serve())


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
                                      Coroutine[Any, Any, None]]) -> int:
        """A small server of the test's on loopback, closed with the harness; its port."""
        async def go() -> int:
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
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

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

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
        conn = self.https(ctx)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

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


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def harness_for(pki: PKI, tmp_path: Path) -> Iterator[Callable[[str], Harness]]:
    made: list[tuple[Harness, LoopThread]] = []

    def make(kind: str = "uvloop") -> Harness:
        loop = LoopThread(kind)
        h = Harness(loop, pki, tmp_path)
        made.append((h, loop))
        return h
    yield make
    for h, loop in made:
        h.stop()
        loop.stop()
    escaped = [e for _, loop in made for e in loop.unhandled()]
    if escaped:
        pytest.fail("exceptions escaped to the event loop: " + "; ".join(escaped))


@pytest.fixture
def harness(harness_for: Callable[[str], Harness], loop_kind: str) -> Harness:
    """A harness on each event loop kind (socket-level tests run on both)."""
    return harness_for(loop_kind)


@pytest.fixture(params=["httptools", "h11"])
def parser_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def unstarted(harness_for: Callable[[str], Harness], parser_kind: str,
              loop_kind: str) -> Harness:
    """A harness on each loop kind whose proxy will use each parser; not started yet."""
    h = harness_for(loop_kind)
    h.default_parser = parser_kind
    return h


@pytest.fixture
def proxy(harness_for: Callable[[str], Harness], parser_kind: str, loop_kind: str) -> Harness:
    """A started proxy with the default config, on each parser and each loop kind."""
    h = harness_for(loop_kind)
    h.start(parser=parser_kind)
    return h


# -- the CLI process tests (test_process.py, test_workers.py) ------------------------------

@pytest.fixture(scope="module")
def devpki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    """The PKI ``mtlsproxy dev-pki`` writes, as users get it."""
    return write_dev_pki(tmp_path_factory.mktemp("devpki"))


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[LoopThread, int]]:
    """An echo upstream on its own loop thread: (loop, port)."""
    loop = LoopThread("uvloop")
    echo = loop.run(start_echo())
    yield loop, int(echo.sockets[0].getsockname()[1])
    loop.call(echo.close)
    loop.stop()
