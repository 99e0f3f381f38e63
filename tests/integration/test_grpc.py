"""gRPC through the proxy (issue 23, items 2 and 3): a real grpcio client, with its
client certificate, calling a real grpcio server behind an ``upstream_protocol: h2``
route; the four call kinds, metadata and trailers intact, and the proxy's own errors as
gRPC statuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

from tests.support.harness import Harness
from tests.support.tools import wait_for

grpc = pytest.importorskip("grpc")

SERVICE = "test.Echo"


class Recorder:
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def seen(self, context: Any) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata()
                              if isinstance(v, str)})

    def unary(self, request: bytes, context: Any) -> bytes:
        self.seen(context)
        context.set_trailing_metadata((("x-trailer", "t1"),))
        return request[::-1]

    def server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        self.seen(context)
        count, size = (int(x) for x in request.decode().split(","))
        block = b"x" * size
        for _ in range(count):
            yield block

    def client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        self.seen(context)
        return b"%d" % sum(len(r) for r in requests)

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self.seen(context)
        for r in requests:
            yield r.upper()

    def fail(self, request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""


@pytest.fixture
def grpc_server() -> Iterator[tuple[int, Recorder]]:
    rec = Recorder()
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(rec.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(rec.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(rec.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(rec.bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(rec.fail),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, rec
    finally:
        server.stop(None).wait(5)


def start(h: Harness, port: int, **route: Any) -> None:
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{port}",
                              "upstream_protocol": "h2", **route}]))


@pytest.fixture
def channel(harness: Harness) -> Iterator[Any]:
    holder: dict[str, Any] = {}

    def make(cert: Any = None, name: str = "client") -> Any:
        c, k = harness.pki.client_files(cert, name)
        creds = grpc.ssl_channel_credentials(
            root_certificates=(harness.pki.directory / "root.pem").read_bytes(),
            private_key=k.read_bytes(), certificate_chain=c.read_bytes())
        ch = grpc.secure_channel(f"localhost:{harness.port}", creds,
                                 options=[("grpc.enable_http_proxy", 0)])
        holder.setdefault("all", []).append(ch)
        return ch
    yield make
    for ch in holder.get("all", []):
        ch.close()


def test_a_unary_call_carries_metadata_up_and_trailers_down(
        harness: Harness, grpc_server: tuple[int, Recorder], channel: Any) -> None:
    port, rec = grpc_server
    start(harness, port)
    call = channel().unary_unary(f"/{SERVICE}/Unary")
    reply, info = call.with_call(b"hello", metadata=(("x-meta", "m1"),), timeout=10)
    assert reply == b"olleh"
    assert info.code() == grpc.StatusCode.OK
    assert ("x-trailer", "t1") in tuple(info.trailing_metadata())
    (seen,) = rec.metadata
    assert seen["x-meta"] == "m1"
    assert "CN=good-client" in seen["x-client-cert-subject"]  # the identity, from mTLS
    wait_for(lambda: bool(harness.access_lines))
    record = json.loads(harness.access_lines[-1])
    assert record["grpc_status"] == "0" and record["protocol"] == "HTTP/2"


def test_a_server_stream_of_many_messages_arrives_whole(
        harness: Harness, grpc_server: tuple[int, Recorder], channel: Any) -> None:
    port, _ = grpc_server
    start(harness, port)
    call = channel().unary_stream(f"/{SERVICE}/ServerStream")
    sizes = [len(m) for m in call(b"200,50000", timeout=30)]
    assert sizes == [50000] * 200  # 10 MB through the windows both ways


def test_a_client_stream_and_a_bidirectional_stream(
        harness: Harness, grpc_server: tuple[int, Recorder], channel: Any) -> None:
    port, _ = grpc_server
    start(harness, port)
    ch = channel()
    total = ch.stream_unary(f"/{SERVICE}/ClientStream")(
        iter([b"a" * 1000] * 300), timeout=30)
    assert total == b"300000"
    replies = list(ch.stream_stream(f"/{SERVICE}/Bidi")(iter([b"a", b"b", b"c"]),
                                                          timeout=10))
    assert replies == [b"A", b"B", b"C"]


def test_an_upstream_status_reaches_the_client(
        harness: Harness, grpc_server: tuple[int, Recorder], channel: Any) -> None:
    port, _ = grpc_server
    start(harness, port)
    with pytest.raises(grpc.RpcError) as info:
        channel().unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"


def test_a_client_the_rules_refuse_gets_permission_denied(
        harness: Harness, grpc_server: tuple[int, Recorder], channel: Any) -> None:
    port, rec = grpc_server
    start(harness, port, allow=[{"fingerprint_sha256": "0" * 64}])
    with pytest.raises(grpc.RpcError) as info:
        channel().unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "unauthorized"
    assert rec.metadata == []


def test_no_route_is_unimplemented(harness: Harness, grpc_server: tuple[int, Recorder],
                                   channel: Any) -> None:
    """UNIMPLEMENTED, as gRPC's HTTP-to-status mapping reads a 404: the service or
    method is not there (NOT_FOUND would mean an entity the call names)."""
    port, _ = grpc_server
    start(harness, port, path_prefix="/other.Service")
    with pytest.raises(grpc.RpcError) as info:
        channel().unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_an_upstream_down_is_unavailable(harness: Harness, channel: Any) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    start(harness, dead)
    with pytest.raises(grpc.RpcError) as info:
        channel().unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_expired_since_the_handshake_is_unauthenticated(
        harness: Harness, grpc_server: tuple[int, Recorder], channel: Any) -> None:
    import datetime as dt

    from tests.support.pki import make_cert
    port, _ = grpc_server
    start(harness, port)
    cert = make_cert("soon-expired", harness.pki.inter,
                     not_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    ch = channel(cert, "soon")
    assert ch.unary_unary(f"/{SERVICE}/Unary")(b"ab", timeout=10) == b"ba"
    harness.clock.advance(dt.timedelta(hours=2))
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(f"/{SERVICE}/Unary")(b"ab", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_http11_client_on_an_h2_route_is_translated(
        harness: Harness, grpc_server: tuple[int, Recorder]) -> None:
    """HTTP/1.1 in, HTTP/2 to the upstream: the framing is translated (the response
    body, of no declared length there, comes back chunked)."""
    port, rec = grpc_server
    start(harness, port)
    conn = harness.https()
    message = b"\x00\x00\x00\x00\x05hello"  # a gRPC length-prefixed message
    conn.request("POST", f"/{SERVICE}/Unary", body=message,
                 headers={"Content-Type": "application/grpc", "TE": "trailers"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 200 and r.getheader("content-type") == "application/grpc"
    assert body == b"\x00\x00\x00\x00\x05olleh"
    assert "CN=good-client" in rec.metadata[0]["x-client-cert-subject"]


def test_a_100_mb_server_stream_passes_with_bounded_proxy_memory(
        devpki: Any, grpc_server: tuple[int, Recorder], tmp_path: Any) -> None:
    """The proxy as its own process, so its peak RSS is its own: 100 MB of messages
    relayed as they come, never held (flow control both ways)."""
    from tests.support.proxyproc import start_proxy, stop_proxy
    port, _ = grpc_server
    pp = start_proxy(devpki, port, tmp_path, routes=[{
        "path_prefix": "/", "upstream": f"http://127.0.0.1:{port}",
        "upstream_protocol": "h2"}])
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=devpki.root_cert.read_bytes(),
            private_key=devpki.client_key.read_bytes(),
            certificate_chain=devpki.client_cert.read_bytes())
        before = pp.rss_hwm_kib()
        with grpc.secure_channel(f"localhost:{pp.port}", creds,
                                 options=[("grpc.enable_http_proxy", 0)]) as ch:
            count, size = 1600, 65536  # 100 MiB (104.9 MB)
            received = 0
            for message in ch.unary_stream(f"/{SERVICE}/ServerStream")(
                    b"%d,%d" % (count, size), timeout=300):
                received += len(message)
        assert received == count * size
        growth_mib = (pp.rss_hwm_kib() - before) / 1024
        # A proxy that held the stream would grow by 100 MiB.
        assert growth_mib < 32, f"proxy peak RSS grew by {growth_mib:.1f} MiB"
    finally:
        stop_proxy(pp)
