"""TLS to upstreams (issue 24, item 2) and unix-socket upstreams (item 4): a real TLS
server with its own CA behind the proxy, with and without upstream mTLS; verification,
names, ALPN h2 for gRPC, session resumption, client-certificate reload; and the echo
upstream on a unix socket. Both event loops."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.harness import Harness


class TLSUpstream:
    """An HTTPS/1.1 upstream with a CA of its own: answers each request with what its
    TLS layer saw (the client certificate's CN, whether the session was resumed)."""

    def __init__(self, h: Harness, tmp: Path, client_ca: trustme.CA | None = None) -> None:
        self.ca = trustme.CA(organization_name="upstream CA")
        self.ca_file = tmp / "upstream-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        cert = self.ca.issue_cert("upstream.test", "127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        if client_ca is not None:
            client_ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.handshakes: list[dict[str, Any]] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            obj = writer.get_extra_info("ssl_object")
            peer = obj.getpeercert() if obj is not None else None
            cn = next((v for rdn in (peer or {}).get("subject", ()) for k, v in rdn
                       if k == "commonName"), None)
            seen = {"client_cn": cn, "resumed": obj.session_reused, "version": obj.version()}
            self.handshakes.append(seen)
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    path = head.split(b" ")[1].decode()
                    body = json.dumps({"path": path, **seen}).encode()
                    close = "close=1" in path
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n%s\r\n" % (
                                     len(body), b"Connection: close\r\n" if close else b"")
                                 + body)
                    await writer.drain()
                    if close:
                        break
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self.port = h.serve(handle, tls=ctx)

    def route(self, **tls: Any) -> dict[str, Any]:
        return {"path_prefix": "/", "upstream": f"https://127.0.0.1:{self.port}",
                "upstream_tls": {"ca_file": str(self.ca_file), **tls}}


@pytest.fixture
def client_ca(tmp_path: Path) -> Iterator[tuple[trustme.CA, Path, Path]]:
    """The CA the upstream trusts for clients, and the proxy's client certificate."""
    ca = trustme.CA(organization_name="proxy clients")
    leaf = ca.issue_cert("proxy-client", common_name="proxy-client")
    cert, key = tmp_path / "proxy-client.pem", tmp_path / "proxy-client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    yield ca, cert, key


def upstream_errors(h: Harness, port: int, kind: str) -> float:
    return h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}", kind=kind)


def test_an_https_upstream_is_verified_against_its_own_ca(harness: Harness,
                                                          tmp_path: Path) -> None:
    up = TLSUpstream(harness, tmp_path)
    harness.start(harness.config(routes=[up.route()]))
    status, _, body = harness.get("/hello")
    assert status == 200, body
    doc = json.loads(body)
    assert doc["path"] == "/hello" and doc["client_cn"] is None
    assert doc["version"] in ("TLSv1.2", "TLSv1.3")


def test_upstream_mtls_presents_the_configured_client_certificate(
        harness: Harness, tmp_path: Path, client_ca: tuple[trustme.CA, Path, Path]) -> None:
    ca, cert, key = client_ca
    up = TLSUpstream(harness, tmp_path, client_ca=ca)
    harness.start(harness.config(routes=[up.route(cert_file=str(cert), key_file=str(key))]))
    status, _, body = harness.get("/")
    assert status == 200, body
    assert json.loads(body)["client_cn"] == "proxy-client"


def test_an_upstream_that_requires_a_client_certificate_refuses_a_proxy_without_one(
        harness: Harness, tmp_path: Path, client_ca: tuple[trustme.CA, Path, Path]) -> None:
    up = TLSUpstream(harness, tmp_path, client_ca=client_ca[0])
    harness.start(harness.config(routes=[up.route()]))
    status, _, body = harness.get("/")
    assert status == 502 and json.loads(body)["reason"] == "upstream_unavailable"


def test_an_upstream_certificate_from_another_ca_is_a_502_counted_as_tls(
        harness: Harness, tmp_path: Path) -> None:
    up = TLSUpstream(harness, tmp_path)
    route = up.route()
    route["upstream_tls"]["ca_file"] = str(harness.pki.directory / "root.pem")
    harness.start(harness.config(routes=[route]))
    status, _, body = harness.get("/")
    assert status == 502 and json.loads(body)["reason"] == "upstream_unavailable"
    assert upstream_errors(harness, up.port, "tls") == 1
    assert up.handshakes == []  # nothing was sent to it


def test_the_name_checked_is_server_name_when_given(harness: Harness,
                                                    tmp_path: Path) -> None:
    up = TLSUpstream(harness, tmp_path)
    harness.start(harness.config(routes=[
        {**up.route(server_name="upstream.test"), "path_prefix": "/good"},
        {**up.route(server_name="other.test"), "path_prefix": "/bad"}]))
    assert harness.get("/good")[0] == 200
    assert harness.get("/bad")[0] == 502
    assert upstream_errors(harness, up.port, "tls") == 1


def test_verify_false_accepts_any_certificate(harness: Harness, tmp_path: Path) -> None:
    up = TLSUpstream(harness, tmp_path)
    route = up.route(verify=False)
    del route["upstream_tls"]["ca_file"]
    harness.start(harness.config(routes=[route]))
    assert harness.get("/")[0] == 200


def test_new_connections_to_an_upstream_resume_the_tls_session(harness: Harness,
                                                              tmp_path: Path) -> None:
    up = TLSUpstream(harness, tmp_path)
    harness.start(harness.config(routes=[up.route()]))
    for _ in range(3):  # each answer closes its connection: the next one opens another
        assert harness.get("/?close=1")[0] == 200
    assert [hs["resumed"] for hs in up.handshakes] == [False, True, True]


def test_a_renewed_client_certificate_is_used_without_a_restart(
        harness: Harness, tmp_path: Path, client_ca: tuple[trustme.CA, Path, Path]) -> None:
    ca, cert, key = client_ca
    up = TLSUpstream(harness, tmp_path, client_ca=ca)
    harness.start(harness.config(routes=[up.route(cert_file=str(cert), key_file=str(key))]))
    assert json.loads(harness.get("/?close=1")[2])["client_cn"] == "proxy-client"
    renewed = ca.issue_cert("proxy-client-renewed", common_name="proxy-client-renewed")
    renewed.cert_chain_pems[0].write_to_path(str(cert))
    renewed.private_key_pem.write_to_path(str(key))
    assert harness.server is not None
    harness.server.pool.tls.check_interval = 0  # the next connection checks the files
    assert json.loads(harness.get("/?close=1")[2])["client_cn"] == "proxy-client-renewed"


def test_a_half_written_client_certificate_keeps_the_old_one(
        harness: Harness, tmp_path: Path, client_ca: tuple[trustme.CA, Path, Path]) -> None:
    ca, cert, key = client_ca
    up = TLSUpstream(harness, tmp_path, client_ca=ca)
    harness.start(harness.config(routes=[up.route(cert_file=str(cert), key_file=str(key))]))
    assert harness.get("/?close=1")[0] == 200
    cert.write_bytes(cert.read_bytes()[:100])
    assert harness.server is not None
    harness.server.pool.tls.check_interval = 0
    assert json.loads(harness.get("/?close=1")[2])["client_cn"] == "proxy-client"


def test_grpc_over_tls_to_the_upstream_negotiates_h2_by_alpn(harness: Harness,
                                                            tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures
    ca = trustme.CA(organization_name="grpc upstream CA")
    leaf = ca.issue_cert("grpc.test", "127.0.0.1")
    ca_file = tmp_path / "grpc-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1])})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems))])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        harness.start(harness.config(routes=[{
            "path_prefix": "/", "upstream": f"https://127.0.0.1:{port}",
            "upstream_protocol": "h2", "upstream_tls": {"ca_file": str(ca_file)}}]))
        c, k = harness.pki.client_files()
        channel = grpc.secure_channel(f"localhost:{harness.port}", grpc.ssl_channel_credentials(
            (harness.pki.directory / "root.pem").read_bytes(), k.read_bytes(), c.read_bytes()))
        try:
            call = channel.unary_unary("/test.Echo/Unary")
            assert call(b"abc", timeout=10) == b"cba"
        finally:
            channel.close()
    finally:
        server.stop(None).wait(5)


def test_a_unix_socket_upstream_carries_requests(harness: Harness, tmp_path: Path) -> None:
    from mtlsproxy.dev.echo import start_echo_unix
    path = str(tmp_path / "app.sock")

    async def go() -> None:
        harness.servers.append(await start_echo_unix(path))
    harness.loop.run(go())
    harness.start(harness.config(routes=[{"path_prefix": "/", "upstream": f"unix:{path}"}]))
    status, _, body = harness.get("/over/unix")
    assert status == 200, body
    doc = json.loads(body)
    assert doc["path"] == "/over/unix"
    assert any(n.lower() == "x-client-cert-subject" for n, _ in doc["headers"])
    assert harness.metric("mtlsproxy_requests_total", listener="public", route="/",
                          code="200", protocol="http1") == 1


def test_a_unix_socket_upstream_that_is_gone_is_a_502(harness: Harness,
                                                      tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    harness.start(harness.config(routes=[{"path_prefix": "/", "upstream": f"unix:{path}"}]))
    assert harness.get("/")[0] == 502
    assert harness.metric("mtlsproxy_upstream_errors_total", upstream=f"unix:{path}",
                          kind="connect_refused") == 1
