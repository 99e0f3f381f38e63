"""WebSocket through the proxy (issue 24, item 1): a real client (the ``websockets``
library, with its client certificate) and a real echo server behind a route, on both
event loops and both parsers. The upgrade request is admitted, stripped and given the
certificate headers like any request; after the upstream's 101 the proxy relays bytes
both ways until either side closes, the idle timeout passes, or admission says no."""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.harness import Harness
from tests.support.pki import make_cert
from tests.support.tools import wait_for

websockets = pytest.importorskip("websockets")
from websockets.asyncio.server import ServerConnection, serve  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402


async def echo(ws: ServerConnection) -> None:
    """Echoes messages; "headers?" answers with the upgrade request's headers."""
    async for message in ws:
        if message == "headers?":
            assert ws.request is not None
            await ws.send(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}))
        else:
            await ws.send(message)


@pytest.fixture
def ws_upstream(unstarted: Harness) -> Iterator[int]:
    async def start() -> Any:
        return await serve(echo, "127.0.0.1", 0, max_size=None, ping_interval=None)
    server = unstarted.loop.run(start())
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        async def stop() -> None:
            server.close()
            await server.wait_closed()
        unstarted.loop.run(stop())


def start(h: Harness, port: int, **route: Any) -> None:
    listener = route.pop("listener", {})
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{port}",
                              **route}], **listener))


def client(h: Harness, ctx: ssl.SSLContext | None = None, **kw: Any) -> Any:
    return connect(f"wss://localhost:{h.port}/chat?room=1", ssl=ctx or h.client_context(),
                   max_size=None, open_timeout=10, close_timeout=2, **kw)


def until_the_proxy_closes(ws: Any) -> None:
    """Keep talking through the tunnel until the proxy closes it (within 10 s)."""
    with pytest.raises(ConnectionClosed):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ws.send("still there?")
            ws.recv(timeout=1)
            time.sleep(0.1)


def tunnels(h: Harness) -> float:
    return h.metric("mtlsproxy_tunnels_active", listener="public", kind="websocket")


def test_messages_go_both_ways_with_the_certificate_headers_and_no_forged_ones(
        unstarted: Harness, ws_upstream: int) -> None:
    start(unstarted, ws_upstream)
    with client(unstarted, additional_headers={"X-Client-Cert-Subject": "CN=forged",
                                               "X-Forwarded-Client-Cert": "By=x"}) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=5) == b"\x00\x01binary"
        ws.send("headers?")
        headers = json.loads(ws.recv(timeout=5))
        assert tunnels(unstarted) == 1
    assert "CN=good-client" in headers["x-client-cert-subject"]
    # The proxy's own XFCC, never the client's.
    assert "By=x" not in headers.get("x-forwarded-client-cert", "")
    assert not any("forged" in v for v in headers.values())
    assert headers["upgrade"].lower() == "websocket"
    assert headers["x-forwarded-proto"] == "https"
    wait_for(lambda: tunnels(unstarted) == 0)


def test_the_tunnel_end_is_logged_with_bytes_each_way_and_counted_as_101(
        unstarted: Harness, ws_upstream: int) -> None:
    start(unstarted, ws_upstream)
    message = os.urandom(5000)  # incompressible (permessage-deflate is on)
    with client(unstarted) as ws:
        ws.send(message)
        assert ws.recv(timeout=5) == message

    def tunnel_records() -> list[dict[str, Any]]:
        records = [json.loads(line) for line in unstarted.access_lines]
        return [r for r in records if r["status"] == 101]
    wait_for(lambda: bool(tunnel_records()))
    (record,) = tunnel_records()
    assert record["bytes"] > 5000 and record["bytes_received"] > 5000
    assert record["path"] == "/chat?room=1" and record["upstream_status"] == 101
    assert unstarted.metric("mtlsproxy_requests_total", listener="public", route="/",
                            code="101") == 1


def test_a_client_the_route_rules_refuse_gets_403_and_no_tunnel(
        unstarted: Harness, ws_upstream: int) -> None:
    start(unstarted, ws_upstream, allow=[{"subject": {"CN": "someone-else"}}])
    with pytest.raises(InvalidStatus) as info:
        client(unstarted)
    assert info.value.response.status_code == 403
    assert tunnels(unstarted) == 0


def test_a_route_without_upgrades_refuses_with_501(unstarted: Harness,
                                                   ws_upstream: int) -> None:
    start(unstarted, ws_upstream, upgrades=[])
    with pytest.raises(InvalidStatus) as info:
        client(unstarted)
    assert info.value.response.status_code == 501
    assert b"upgrade_not_allowed" in info.value.response.body


def test_a_tunnel_is_closed_when_its_ca_leaves_the_truststore(
        unstarted: Harness, ws_upstream: int) -> None:
    h = unstarted
    start(h, ws_upstream)
    with client(h) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        other = make_cert("Another CA", ca=True)
        store = h.pki.directory / "other-truststore.pem"
        store.write_bytes(other.cert_pem())
        raw = h.config(routes=[{"path_prefix": "/",
                                "upstream": f"http://127.0.0.1:{ws_upstream}"}],
                       mutual_tls={"truststore_uri": str(store)})
        assert h.reload(raw) == []
        until_the_proxy_closes(ws)
    wait_for(lambda: tunnels(h) == 0)
    assert h.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                    reason="untrusted") >= 1


def test_an_idle_tunnel_is_closed_after_timeouts_idle(unstarted: Harness,
                                                      ws_upstream: int) -> None:
    h = unstarted
    start(h, ws_upstream, listener={"timeouts": {"idle": 1}})
    with client(h) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)  # nothing is sent: the proxy ends it
    wait_for(lambda: tunnels(h) == 0)


def test_the_upstream_closing_closes_the_client_side(unstarted: Harness) -> None:
    h = unstarted

    async def close_at_once(ws: ServerConnection) -> None:
        await ws.send("bye")
        await ws.close(code=4000, reason="done")

    async def start_server() -> Any:
        return await serve(close_at_once, "127.0.0.1", 0, ping_interval=None)
    server = h.loop.run(start_server())

    async def stop() -> None:
        server.close()
        await server.wait_closed()
    try:
        start(h, int(server.sockets[0].getsockname()[1]))
        with client(h) as ws:
            assert ws.recv(timeout=5) == "bye"
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=5)
    finally:
        h.loop.run(stop())
    assert info.value.rcvd is not None and info.value.rcvd.code == 4000
    wait_for(lambda: tunnels(h) == 0)


def test_a_wss_upstream_carries_the_tunnel_over_tls(unstarted: Harness, tmp_path: Any) -> None:
    """``upstream: https://``: the upgrade and the tunnel go over the proxy's TLS
    connection to the upstream (tls/upstream.py), verified against its own CA."""
    import trustme
    h = unstarted
    ca = trustme.CA(organization_name="ws upstream CA")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ws-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def start_server() -> Any:
        return await serve(echo, "127.0.0.1", 0, ssl=server_ctx, ping_interval=None)
    server = h.loop.run(start_server())

    async def stop() -> None:
        server.close()
        await server.wait_closed()
    try:
        port = int(server.sockets[0].getsockname()[1])
        h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"https://127.0.0.1:{port}",
                                  "upstream_tls": {"ca_file": str(ca_file)}}]))
        with client(h) as ws:
            ws.send("over tls")
            assert ws.recv(timeout=5) == "over tls"
    finally:
        h.loop.run(stop())
    wait_for(lambda: tunnels(h) == 0)


def test_a_50_mb_message_passes_with_bounded_proxy_memory(devpki: Any, tmp_path: Any) -> None:
    """The proxy as its own process, so its peak RSS is its own: a 50 MB message each
    way relayed with back-pressure, never held whole."""
    import threading

    from websockets.sync.server import serve as sync_serve

    from tests.support.proxyproc import start_proxy, stop_proxy

    def sync_echo(ws: Any) -> None:
        for message in ws:
            ws.send(message)

    server = sync_serve(sync_echo, "127.0.0.1", 0, max_size=None, compression=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        pp = start_proxy(devpki, server.socket.getsockname()[1], tmp_path)
        try:
            ctx = ssl.create_default_context(cafile=str(devpki.root_cert))
            ctx.load_cert_chain(str(devpki.client_cert), str(devpki.client_key))
            before = pp.rss_hwm_kib()
            message = os.urandom(50 * 1024 * 1024)
            with connect(f"wss://localhost:{pp.port}/big", ssl=ctx, max_size=None,
                         compression=None, open_timeout=10, close_timeout=5) as ws:
                ws.send(message)
                assert ws.recv(timeout=120) == message
            growth_mib = (pp.rss_hwm_kib() - before) / 1024
            # A proxy that held the message would grow by 50 MiB (100 with both ways).
            assert growth_mib < 32, f"proxy peak RSS grew by {growth_mib:.1f} MiB"
        finally:
            stop_proxy(pp)
    finally:
        server.shutdown()
        thread.join(10)


def test_drain_lets_a_tunnel_run_until_drain_timeout_then_closes_it(
        unstarted: Harness, ws_upstream: int) -> None:
    h = unstarted
    start(h, ws_upstream)
    assert h.server is not None
    listeners = h.server.listeners
    with client(h) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
        h.loop.call(lambda: [lr.begin_drain() for lr in listeners])
        ws.send("still here")  # a drain does not cut a tunnel at once
        assert ws.recv(timeout=5) == "still here"

        async def wait() -> list[bool]:
            return [await lr.wait_drained(0.5) for lr in listeners]
        assert h.loop.run(wait()) == [False]  # it was still open at the drain's end
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    wait_for(lambda: tunnels(h) == 0)


def test_a_reload_that_drops_the_upgrade_closes_open_tunnels(
        unstarted: Harness, ws_upstream: int) -> None:
    h = unstarted
    start(h, ws_upstream)
    with client(h) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        assert h.reload(h.config(routes=[{
            "path_prefix": "/", "upstream": f"http://127.0.0.1:{ws_upstream}",
            "upgrades": []}])) == []
        until_the_proxy_closes(ws)
    wait_for(lambda: tunnels(h) == 0)


async def _event() -> Any:
    import asyncio
    return asyncio.Event()


UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def test_bytes_after_an_upgrade_request_are_held_only_up_to_a_bound(
        unstarted: Harness) -> None:
    """Until the upstream answers, what the client sends after its upgrade request waits,
    never parsed: no more than a bound, then reading from the client pauses."""
    import socket as socketlib
    h = unstarted

    answer = h.loop.run(_event())
    done: list[bool] = []

    async def silent(reader: Any, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await answer.wait()  # no answer while the client sends
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        done.append(True)
    port = h.serve(silent)
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{port}"}],
                     timeouts={"upstream_read": 30}))
    raw = socketlib.create_connection(("127.0.0.1", h.port), timeout=10)
    s = h.client_context().wrap_socket(raw, server_hostname="localhost")
    s.sendall(UPGRADE)
    s.settimeout(3)
    sent = 0
    block = b"x" * 65536
    with pytest.raises((TimeoutError, OSError)):
        while sent < 200 * 1024 * 1024:  # far past what socket buffers take
            s.sendall(block)
            sent += len(block)
    assert sent < 100 * 1024 * 1024, sent
    h.loop.call(answer.set)
    wait_for(lambda: bool(done))
    s.close()


def test_a_request_with_an_empty_upgrade_never_leaves_the_connection_hanging(
        unstarted: Harness, parser_kind: str) -> None:
    """An empty Upgrade with Connection: upgrade is served as a plain request. A parser
    that holds what follows it (h11 as the seam reads it) must end the connection after
    the answer; one that parses on answers the next request: never a connection that
    neither reads the next request nor closes."""
    h = unstarted
    h.start(parser=parser_kind)
    with h.tls(None, 5) as t:
        t.sendall(b"GET /a HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\n"
                  b"Upgrade: \r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\n\r\n")
        out, closed = b"", False
        while out.count(b"HTTP/1.1 200") < 2:
            chunk = t.recv(65536)  # a TimeoutError here is the hang
            if not chunk:
                closed = True
                break
            out += chunk
    assert out.count(b"HTTP/1.1 200") == 2 or (closed and out.count(b"HTTP/1.1 200") == 1)


def test_an_upstream_connection_that_carried_a_refused_upgrade_is_not_reused(
        unstarted: Harness) -> None:
    import asyncio
    h = unstarted
    connections: list[int] = []

    async def plain(reader: Any, writer: Any) -> None:
        connections.append(1)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    port = h.serve(plain)
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{port}"}]))
    out = h.raw(UPGRADE, read_timeout=5)
    assert out.startswith(b"HTTP/1.1 200"), out[:100]
    assert h.get("/next")[0] == 200
    assert len(connections) == 2
