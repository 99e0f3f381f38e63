"""Sends deferred to the end of the event loop's pass (mtlsproxy/runtime/writes.py).

What must hold: nothing is sent during the pass that wrote it, everything is sent right
after it (in order, on both loop kinds), one broken connection keeps no other's bytes,
a connection that closes or aborts sends what it deferred first, and the proxy uses the
batch for both of its directions.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from mtlsproxy.http.parser import HttptoolsResponseParser
from mtlsproxy.proxy.upstream import UpstreamConnection, UpstreamState
from mtlsproxy.runtime.writes import WriteBatch
from mtlsproxy.tls.bio import TLSConnection
from tests.support.harness import Harness
from tests.support.pki import PKI

T = TypeVar("T")


def run(kind: str, coro: Coroutine[Any, Any, T]) -> T:
    loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class Recorder:
    def __init__(self, name: str, sent: list[str], fail: bool = False) -> None:
        self.name, self.sent, self.fail = name, sent, fail

    def flush_deferred(self) -> None:
        if self.fail:
            raise OSError("broken")
        self.sent.append(self.name)


def test_sends_of_one_pass_go_out_together_right_after_it(loop_kind: str) -> None:
    async def go() -> None:
        batch, sent = WriteBatch(), list[str]()
        a, b = Recorder("a", sent), Recorder("b", sent)
        batch.add(a)
        batch.add(b)
        batch.add(a)  # a second write of one connection in the same pass
        assert sent == []  # nothing during the pass
        await asyncio.sleep(0)
        assert sent == ["a", "b", "a"]  # one flush, in order
        batch.add(b)
        await asyncio.sleep(0)
        assert sent == ["a", "b", "a", "b"]
        assert repr(batch) == "<WriteBatch pending=0>"
    run(loop_kind, go())


def test_a_failing_send_keeps_no_other_connections_bytes(
        loop_kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        batch, sent = WriteBatch(), list[str]()
        batch.add(Recorder("broken", sent, fail=True))
        batch.add(Recorder("b", sent))
        await asyncio.sleep(0)
        assert sent == ["b"]
    with caplog.at_level(logging.ERROR, logger="mtlsproxy"):
        run(loop_kind, go())
    assert "deferred write" in caplog.text


def test_an_upstream_connection_sends_its_deferred_bytes_before_closing(
        loop_kind: str) -> None:
    async def go() -> None:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await reader.read())  # everything, up to EOF
            writer.close()
        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        batch = WriteBatch()
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: UpstreamConnection("u", HttptoolsResponseParser(), batch),
            "127.0.0.1", port)
        conn.set_state(UpstreamState.ACTIVE)
        conn.write(b"GET / HTTP/1.1\r\n")
        conn.write(b"host: u\r\n\r\n")
        conn.close()  # in the same pass: the deferred bytes must still leave first
        assert await asyncio.wait_for(received, 5) == b"GET / HTTP/1.1\r\nhost: u\r\n\r\n"
        server.close()
        await server.wait_closed()
    run(loop_kind, go())


def test_the_proxy_defers_the_sends_of_both_directions(proxy: Harness) -> None:
    # Client connections and upstream connections share the process's one batch, whose
    # deferral the tests above hold; requests go through it both ways.
    assert proxy.server is not None
    batch = proxy.server.writes
    conn = proxy.https()
    for path in ("/a", "/b"):
        conn.request("GET", path)
        assert conn.getresponse().read()
    conn.close()
    assert proxy.server.pool.writes is batch
    assert proxy.server.listeners[0].writes is batch


def test_an_abort_in_the_pass_that_wrote_still_sends_what_was_written(
        loop_kind: str, pki: PKI) -> None:
    """A TLS connection that writes and aborts in the same callback (a response cut short
    after its head: proxy/session.py's _UpstreamAfterHead) sends the bytes first, as it did
    when writes were not deferred: the client sees the response cut short, not nothing."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    client_ctx = ssl.create_default_context(cafile=str(pki.directory / "root.pem"))

    class CutShort:
        def __init__(self, conn: TLSConnection) -> None:
            self.conn = conn

        def context(self, server_name: str | None) -> ssl.SSLContext:
            return server_ctx

        def handshake_done(self, conn: TLSConnection) -> None:
            pass

        def handshake_failed(self, conn: TLSConnection, reason: str,
                             exc: BaseException) -> None:
            pass

        def plaintext_received(self, data: bytes) -> None:
            self.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            self.conn.abort()  # same callback, same pass

        def response_pending(self) -> bool:
            return False

        def eof_received(self) -> None:
            pass

        def connection_lost(self, exc: BaseException | None) -> None:
            pass

    async def go() -> bytes:
        batch = WriteBatch()
        server = await asyncio.get_running_loop().create_server(
            lambda: TLSConnection(CutShort, writes=batch), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        received = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                received += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()
        server.close()
        return received
    received = run(loop_kind, go())
    assert received == b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
