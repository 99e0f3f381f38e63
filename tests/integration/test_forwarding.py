"""Forwarding over real sockets, on both parsers (httptools and h11)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtlsproxy.tls import bio
from tests.support.harness import Harness
from tests.support.tools import wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def scripted_upstream(h: Harness, handler: Handler) -> tuple[int, list[bytes]]:
    """An upstream whose behaviour the test scripts; returns (port, raw bytes received)."""
    received: list[bytes] = []

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        orig = reader.read

        async def read(n: int = -1) -> bytes:
            data = await orig(n)
            received.append(data)
            return data
        reader.read = read  # type: ignore[method-assign]
        await wrapped(reader, writer)
    return h.serve(record), received


def headers_of(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        out.setdefault(name, []).append(value)
    return out


# -- certificate headers --------------------------------------------------------------------

def test_client_certificate_is_forwarded_in_rfc9440_xfcc_and_detail_headers(
        proxy: Harness) -> None:
    status, _, body = proxy.get("/cert")
    assert status == 200
    hdrs = headers_of(body)
    client = proxy.pki.client
    der = client.der
    assert hdrs["client-cert"] == [":" + base64.b64encode(der).decode() + ":"]
    chain = hdrs["client-cert-chain"][0].split(", ")
    inter_der = proxy.pki.inter.cert.public_bytes(serialization.Encoding.DER)
    assert chain[0] == ":" + base64.b64encode(inter_der).decode() + ":"  # issuer first
    fp = hashlib.sha256(der).hexdigest()
    xfcc = hdrs["x-forwarded-client-cert"][0]
    assert xfcc.startswith(f"Hash={fp};Subject=\"")
    assert "URI=spiffe://prod.example.test/ns/payments/sa/api" in xfcc
    assert "DNS=client.example.test" in xfcc
    assert hdrs["x-client-cert-subject"] == [client.cert.subject.rfc4514_string()]
    assert hdrs["x-client-cert-issuer"] == [client.cert.issuer.rfc4514_string()]
    assert hdrs["x-client-cert-serial"] == [format(client.cert.serial_number, "x")]
    assert hdrs["x-client-cert-fingerprint-sha256"] == [fp]
    assert hdrs["x-client-cert-not-after"] == [
        client.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")]
    assert hdrs["x-client-cert-not-before"][0].endswith("Z")
    assert hdrs["x-client-cert-san-dns"] == ["client.example.test"]
    assert hdrs["x-client-cert-san-uri"] == ["spiffe://prod.example.test/ns/payments/sa/api"]
    # The forwarded leaf is the one the client presented, byte for byte.
    assert x509.load_der_x509_certificate(base64.b64decode(
        hdrs["client-cert"][0].strip(":"))) == client.cert


def test_forward_client_cert_selects_header_families(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(mutual_tls={"truststore_uri": str(h.pki.truststore),
                                 "forward_client_cert": ["xfcc"]}))
    hdrs = headers_of(h.get("/")[2])
    assert "x-forwarded-client-cert" in hdrs
    assert "client-cert" not in hdrs and "x-client-cert-subject" not in hdrs


SPOOFED = {
    "Client-Cert": ":c3Bvb2Y=:",
    "Client-Cert-Chain": ":c3Bvb2Y=:",
    "X-Forwarded-Client-Cert": "Hash=00;Subject=\"CN=admin\"",
    "X-Client-Cert-Subject": "CN=admin",
    "X-Client-Cert-Fingerprint-SHA256": "00",
    "X-Client-Cert-Whatever": "x",
}


def test_spoofed_certificate_headers_never_reach_the_upstream(unstarted: Harness) -> None:
    h = unstarted
    # Even with forwarding off, a client's own certificate headers are dropped.
    h.start(h.config(mutual_tls={"truststore_uri": str(h.pki.truststore),
                                 "forward_client_cert": []}))
    hdrs = headers_of(h.get("/", headers=SPOOFED)[2])
    for name in SPOOFED:
        assert name.lower() not in hdrs
    assert not any(n.startswith("x-client-cert") for n in hdrs)


def test_spoofed_headers_are_replaced_not_merged(proxy: Harness) -> None:
    hdrs = headers_of(proxy.get("/", headers=SPOOFED)[2])
    assert hdrs["x-client-cert-subject"] != ["CN=admin"]
    assert len(hdrs["client-cert"]) == 1 and hdrs["client-cert"] != [":c3Bvb2Y=:"]
    assert len(hdrs["x-forwarded-client-cert"]) == 1


# -- request rewriting ----------------------------------------------------------------------

def test_hop_by_hop_headers_are_removed_and_forwarded_headers_set(proxy: Harness) -> None:
    hdrs = headers_of(proxy.get("/", headers={
        "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "300",
        "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-Proto": "http", "X-Keep": "yes"})[2])
    for gone in ("connection", "x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert gone not in hdrs
    assert hdrs["x-keep"] == ["yes"]
    assert hdrs["x-forwarded-for"] == ["10.9.9.9, 127.0.0.1"]
    assert hdrs["x-forwarded-proto"] == ["https"]
    assert hdrs["x-forwarded-host"] == [f"localhost:{proxy.port}"]
    assert hdrs["host"] == [f"localhost:{proxy.port}"]  # the client's Host goes upstream


def test_longest_prefix_wins_and_strip_prefix_rewrites_the_path(unstarted: Harness) -> None:
    h = unstarted
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[
        {"path_prefix": "/", "upstream": echo},
        {"path_prefix": "/api", "upstream": echo + "/v2", "strip_prefix": True},
        {"path_prefix": "/api/admin", "upstream": echo + "/admin"},
    ]))
    assert json.loads(h.get("/api/users?x=1")[2])["path"] == "/v2/users?x=1"
    assert json.loads(h.get("/api")[2])["path"] == "/v2/"
    assert json.loads(h.get("/api/admin/x")[2])["path"] == "/admin/api/admin/x"
    assert json.loads(h.get("/apix")[2])["path"] == "/apix"  # segment boundary
    assert h.metric("mtlsproxy_requests_total", listener="public", route="/api",
                    code="200") == 2


def test_an_absolute_form_request_is_routed_by_its_path_and_host(unstarted: Harness) -> None:
    # RFC 9112 section 3.2.2 (a server MUST accept it; nginx and Envoy do): the URI's
    # authority is the host, for host routes and for what the upstream sees.
    h = unstarted
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[
        {"path_prefix": "/", "upstream": echo},
        {"path_prefix": "/api", "host": "api.example", "upstream": echo + "/v2",
         "strip_prefix": True},
    ]))
    out = h.raw(b"GET https://api.example/api/users?x=1 HTTP/1.1\r\nHost: ignored\r\n"
                b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:80]
    echoed = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert echoed["path"] == "/v2/users?x=1"
    sent = headers_of(out.split(b"\r\n\r\n", 1)[1])
    assert sent["host"] == ["api.example"] and sent["x-forwarded-host"] == ["api.example"]


def test_request_without_a_route_gets_404(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(routes=[{"path_prefix": "/only",
                              "upstream": f"http://127.0.0.1:{h.start_echo()}"}]))
    status, _, body = h.get("/elsewhere")
    assert status == 404
    assert json.loads(body) == {"message": "Not Found", "reason": "no_route"}


# -- errors -----------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_upstream_gets_502_and_is_counted(unstarted: Harness) -> None:
    h = unstarted
    port = _closed_port()
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    status, _, body = h.get("/")
    assert status == 502 and json.loads(body)["reason"] == "upstream_unavailable"
    assert h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                    kind="connect_refused") == 1


def test_silent_upstream_gets_504(unstarted: Harness) -> None:
    h = unstarted

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(30)
    port, _ = scripted_upstream(h, silent)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}",
                     timeouts={"upstream_read": 0.3}))
    status, _, body = h.get("/")
    assert status == 504 and json.loads(body)["reason"] == "upstream_timeout"
    assert h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                    kind="timeout") == 1


def test_upstream_reset_before_responding_gets_502(unstarted: Harness) -> None:
    h = unstarted

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.transport.abort()
    port, _ = scripted_upstream(h, reset)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    assert h.get("/")[0] == 502


def test_an_upstream_closing_before_answering_a_request_with_a_body_gets_502(
        unstarted: Harness) -> None:
    # Not retried (a body went up), and the task pumping the body ends with it.
    h = unstarted

    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # and closes (the wrapper), a FIN
    port, _ = scripted_upstream(h, hangs_up)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    with h.tls() as t:
        t.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        got = b""
        while b"\r\n\r\n" not in got:
            got += t.recv(65536)
        assert got.startswith(b"HTTP/1.1 502 "), got[:80]

        def pumps() -> list[asyncio.Task[Any]]:
            # By name: a compiled coroutine's repr does not name it (mtlsproxy/compiled.py).
            return [task for task in asyncio.all_tasks()
                    if getattr(task.get_coro(), "__qualname__", "")
                    == "ProxySession._pump_body"]
        wait_for(lambda: h.loop.call(pumps) == [])  # with the client still connected


def test_malformed_request_gets_400_and_never_reaches_the_upstream(unstarted: Harness) -> None:
    h = unstarted

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
    port, received = scripted_upstream(h, record)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    for bad in (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: evil/..\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
        out = h.raw(bad)
        assert out.startswith(b"HTTP/1.1 400 "), out
        assert b'"reason":"bad_request"' in out
    assert received == []
    assert h.metric("mtlsproxy_requests_total", listener="public", route="", code="400") == 6


def test_a_client_gone_before_its_400_is_sent_is_closed_quietly(unstarted: Harness) -> None:
    # The client sends a bad request and closes at once. The 400 still goes out; the
    # client's kernel answers it with a reset (on loopback, within our send), and then the
    # lingering close's write_eof() raised ENOTCONN out of the request task on asyncio
    # (the harness fails a test on any exception that escapes to the loop).
    h = unstarted
    h.start()
    for _ in range(20):  # the reset must come before write_eof: most often it does
        with h.tls() as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")

    def sessions() -> int:
        assert h.server is not None
        return h.loop.call(lambda: len(h.server.listeners[0].sessions))  # type: ignore
    wait_for(lambda: sessions() == 0)
    assert h.metric("mtlsproxy_requests_total", listener="public", route="", code="400") == 20


def _until_eof(answer: bytes = b"") -> tuple[Handler, asyncio.Event]:
    """An upstream that reads (and drops) until the proxy closes its connection, then sets
    the event; with ``answer``, it sends that as soon as a head arrived (an early answer),
    else it never answers."""
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if answer:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        while await reader.read(65536):
            pass
        closed.set()
    return handler, closed


_EARLY_413 = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!"


def test_a_malformed_chunked_body_gets_400_and_its_upstream_connection_is_closed(
        unstarted: Harness) -> None:
    h = unstarted
    handler, closed = _until_eof()
    port, received = scripted_upstream(h, handler)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    with h.tls() as t:
        t.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n")
        # The body is on its way up (looked for after the head: its random request id
        # could spell "abc").
        wait_for(lambda: b"abc" in b"".join(received).partition(b"\r\n\r\n")[2])
        t.sendall(b"zz\r\n")  # not a chunk size
        out = b""
        while chunk := t.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 400 "), out[:80]
    h.loop.run(asyncio.wait_for(closed.wait(), 5))  # never left open for another request
    body = b"".join(received).partition(b"\r\n\r\n")[2]  # after the head (whose
    assert b"0\r\n\r\n" not in body  # request id may end in 0): never a whole body


def test_a_client_that_stops_sending_its_body_gets_408_not_an_upstream_error(
        unstarted: Harness) -> None:
    # nginx's client_body_timeout: 408, and the upstream is not blamed.
    h = unstarted
    handler, closed = _until_eof()
    port, _ = scripted_upstream(h, handler)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}", timeouts={"idle": 0.3}))
    out = h.raw(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    assert out.startswith(b"HTTP/1.1 408 "), out[:80]
    assert b'"reason":"request_timeout"' in out
    h.loop.run(asyncio.wait_for(closed.wait(), 5))
    assert h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                    kind="timeout") == 0
    assert h.metric("mtlsproxy_requests_total", listener="public", route="/",
                    code="408") == 1


def test_an_upstream_that_dies_mid_response_cuts_the_client_connection(
        unstarted: Harness) -> None:
    # After the head went out the only honest signal is the cut: the client must not take
    # a short body for a whole one.
    h = unstarted

    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
    port, _ = scripted_upstream(h, dies)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    conn = h.https()
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    conn.close()
    assert h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                    kind="reset") == 1


def _closes_its_first_connection_after_one_response() -> tuple[Handler, list[bytes]]:
    """An upstream whose first connection answers one request, then closes (a FIN) when
    the next one arrives: its keep-alive timeout racing the proxy's reuse. Every other
    connection answers normally. Returns the handler and each connection's requests."""
    requests: list[bytes] = []
    conns = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        first, conns = conns == 0, conns + 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            requests.append(head)
            if first and len(requests) > 1:
                return  # closed without a word (the wrapper closes the writer)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    return handler, requests


@pytest.mark.parametrize("method, retried", [("GET", True), ("POST", False)])
def test_a_pooled_connection_closed_before_answering_is_retried_for_idempotent_methods(
        unstarted: Harness, method: str, retried: bool) -> None:
    # nginx retries a request that met a closing keep-alive connection before any byte of
    # the answer (proxy_next_upstream error), but not a POST, PATCH or LOCK: the upstream
    # may have acted on it ("proxy_next_upstream non_idempotent" is off by default).
    h = unstarted
    handler, requests = _closes_its_first_connection_after_one_response()
    port, _ = scripted_upstream(h, handler)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    conn = h.https()
    conn.request("GET", "/1")
    assert conn.getresponse().read() == b"ok"
    conn.request(method, "/2")
    r = conn.getresponse()
    body = r.read()
    conn.close()
    if retried:
        assert (r.status, body) == (200, b"ok")
        assert [r.split(b" ")[1] for r in requests] == [b"/1", b"/2", b"/2"]
    else:
        assert r.status == 502 and json.loads(body)["reason"] == "upstream_unavailable"
        assert [r.split(b" ")[1] for r in requests] == [b"/1", b"/2"]
    assert h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                    kind="reset") == (0 if retried else 1)


def _upload(h: Harness, head: bytes, size: int) -> bytes:
    """Send ``head`` and ``size`` body bytes while reading the answer (an asyncio client:
    one thread, writes and reads interleaved); returns what was read until the proxy
    closed. The upload stops where the proxy stops taking it."""
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", h.port, ssl=h.client_context(), server_hostname="localhost")

        async def send() -> None:
            writer.write(head)
            block = b"x" * 65536
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()
        sender = asyncio.create_task(send())
        out = b""
        try:
            while chunk := await reader.read(65536):
                out += chunk
        except (ssl.SSLError, ConnectionError):
            pass
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.transport.abort()
        return out
    return asyncio.run(asyncio.wait_for(go(), 20))


def test_an_upstream_that_stops_reading_a_request_body_gets_504(unstarted: Harness) -> None:
    # The body waits on the upstream's socket no longer than upstream_read (nginx's
    # proxy_send_timeout, which it also calls a gateway timeout).
    h = unstarted

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head, and then nothing more is read
        await asyncio.sleep(30)
    port, _ = scripted_upstream(h, deaf)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}", timeouts={"upstream_read": 0.3}))
    size = 64 * 1024 * 1024  # far more than the socket buffers and the inbox hold
    out = _upload(h, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size,
                  size)
    assert out.startswith(b"HTTP/1.1 504 "), out[:80]
    assert h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                    kind="timeout") == 1


def test_an_answer_before_the_whole_body_is_forwarded_and_ends_both_connections(
        unstarted: Harness) -> None:
    # An upstream may refuse a body early (413, 401): its answer reaches the client, and
    # neither connection can carry another request (the rest of the body is unread).
    h = unstarted
    early, closed = _until_eof(_EARLY_413)
    port, _ = scripted_upstream(h, early)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    size = 64 * 1024 * 1024
    out = _upload(h, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size,
                  size)
    assert out.startswith(b"HTTP/1.1 413 ") and out.endswith(b"big!"), out[:200]
    h.loop.run(asyncio.wait_for(closed.wait(), 5))  # not pooled half-read
    assert h.metric("mtlsproxy_requests_total", listener="public", route="/",
                    code="413") == 1




@pytest.mark.parametrize("client", ["silent", "sending"])
def test_a_lingering_close_ends_for_a_client_that_never_closes(
        unstarted: Harness, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    # Lingering is bounded like nginx's: LINGERING_TIMEOUT without a byte, LINGERING_TIME
    # in all (shortened here).
    monkeypatch.setattr(bio, "LINGERING_TIMEOUT", 0.2)
    monkeypatch.setattr(bio, "LINGERING_TIME", 0.6)
    h = unstarted
    port, _ = scripted_upstream(h, _until_eof(_EARLY_413)[0])
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    active = {"listener": "public"}
    with h.tls() as t:
        t.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
        t.sendall(b"x" * 65536)
        got = b""
        while not got.endswith(b"big!"):
            got += t.recv(65536)
        assert got.startswith(b"HTTP/1.1 413 ")
        if client == "sending":  # (a silent one may already be past 0.2 s here)
            assert h.metric("mtlsproxy_connections_active", **active) == 1  # lingering
        start = time.monotonic()
        while h.metric("mtlsproxy_connections_active", **active) != 0:
            assert time.monotonic() - start < 5, "still lingering"
            if client == "sending":
                try:
                    t.sendall(b"x" * 1024)  # more body, never enough to end it
                except OSError:
                    pass
            time.sleep(0.05)


def test_a_client_that_leaves_mid_response_frees_the_upstream_connection_and_counts_499(
        unstarted: Harness) -> None:
    h = unstarted
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            closed.set()
    port, _ = scripted_upstream(h, endless)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    with h.tls() as t:
        t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        got = b""
        while len(got) < 1024 * 1024:
            got += t.recv(65536)
    assert got.startswith(b"HTTP/1.1 200 ")
    h.loop.run(asyncio.wait_for(closed.wait(), 5))  # the endless answer stopped
    wait_for(lambda: h.metric("mtlsproxy_requests_total", listener="public", route="/",
                              code="499") == 1)


def test_oversized_headers_get_431(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(limits={"max_header_bytes": 4096}))
    out = h.raw(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 "), out[:80]


def test_an_upgrade_the_upstream_does_not_take_is_an_ordinary_answer_then_close(
        proxy: Harness) -> None:
    """The echo upstream answers 200, not 101: forwarded as a response, and the connection
    ends there (nothing after an upgrade request is parsed as HTTP)."""
    out = proxy.raw(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:80]
    assert b"connection: close" in out.lower()
    assert out.count(b"HTTP/1.1 ") == 1 and b"/second" not in out


@pytest.mark.parametrize("upgrade", [b"h2c", b"foo", b"websocket/13, h2c"])
def test_upgrades_a_route_does_not_tunnel_are_refused_or_ignored(proxy: Harness,
                                                                 upgrade: bytes) -> None:
    out = proxy.raw(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nUpgrade: " + upgrade
                    + b"\r\n\r\n")
    if upgrade == b"h2c":
        # h2c: served as a plain request (RFC 9110 section 7.8 lets a server ignore
        # Upgrade); nothing of the upgrade reaches the upstream.
        assert out.startswith(b"HTTP/1.1 200 "), out[:80]
        lowered = out.lower()
        assert b"http2-settings" not in lowered and b'"upgrade"' not in lowered
    elif upgrade == b"foo":
        assert out.startswith(b"HTTP/1.1 501 ") and b"upgrade_not_allowed" in out, out[:200]
    else:  # websocket first: tried upstream, which answers 200 (no switch)
        assert out.startswith(b"HTTP/1.1 200 "), out[:80]


def test_http10_keep_alive_clients_get_several_responses_on_one_connection(
        proxy: Harness) -> None:
    # ab -k's requests: HTTP/1.0 with "Connection: Keep-Alive"; each answer says keep-alive.
    with proxy.tls() as t:
        buf = b""
        for i in range(3):
            t.sendall(b"GET /k%d HTTP/1.0\r\nConnection: Keep-Alive\r\n"
                      b"Host: a\r\n\r\n" % i)
            while b"\r\n\r\n" not in buf:
                buf += t.recv(65536)
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(buf) < length:
                buf += t.recv(65536)
            body, buf = buf[:length], buf[length:]
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"connection: keep-alive" in head.lower()
            assert json.loads(body)["path"] == f"/k{i}"


def test_slow_request_headers_get_408(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(timeouts={"request_headers": 0.3}))
    ctx = h.client_context()
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never finishes the head
            start = time.monotonic()
            data = b""
            while chunk := t.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - start < 5


def test_idle_keep_alive_connection_is_closed_quietly(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(timeouts={"idle": 0.3}))
    conn = h.https()
    conn.request("GET", "/")
    conn.getresponse().read()
    assert conn.sock is not None
    conn.sock.settimeout(5)
    try:
        assert conn.sock.recv(10) == b""  # closed by the proxy, no stray bytes
    finally:
        conn.close()


def test_a_client_close_notify_is_answered_with_close_notify(proxy: Harness) -> None:
    # A clean TLS closure both ways (RFC 8446 section 6.1): the client's unwrap() returns
    # only once the proxy's close_notify arrived.
    with proxy.tls() as t:
        t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or not got.endswith(b"}"):
            got += t.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ")
        with t.unwrap() as plain:
            assert plain.recv(10) == b""  # and then the TCP connection closes


def test_a_request_followed_by_close_notify_is_still_answered(proxy: Harness) -> None:
    # The client closed its sending side after its request (a TLS half-close): the answer
    # still goes out, then the proxy closes.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        ctx = proxy.client_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outgoing.read())
                incoming.write(s.recv(65536))
        tls.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            tls.unwrap()  # close_notify, in the same flight as the request
        except ssl.SSLWantReadError:
            pass
        s.sendall(outgoing.read())
        got = b""
        while data := s.recv(65536):
            incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    got += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
    assert got.startswith(b"HTTP/1.1 200 "), got[:80]
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["path"] == "/"


def test_connections_over_the_limit_are_refused(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(limits={"max_connections": 1}))
    first = h.https()
    first.request("GET", "/")
    assert first.getresponse().status == 200
    second = h.https()
    try:
        second.request("GET", "/")
        second.getresponse()
        raise AssertionError("the second connection should have been refused")
    except (ConnectionError, OSError):
        pass
    first.close()


# -- keep-alive, bodies ---------------------------------------------------------------------

def test_keep_alive_on_both_sides_reuses_one_upstream_connection(proxy: Harness) -> None:
    conn = proxy.https()
    for i in range(5):
        conn.request("GET", f"/{i}")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["path"] == f"/{i}"
    conn.close()
    assert proxy.server is not None and proxy.server.pool.opened == 1
    assert proxy.metric("mtlsproxy_tls_handshakes_total", listener="public",
                        resumed="false") == 1


def test_content_length_and_chunked_bodies_are_streamed_upstream(proxy: Harness) -> None:
    body = b"hello world" * 1000
    conn = proxy.https()
    conn.request("POST", "/cl", body=body)
    r = json.loads(conn.getresponse().read())
    assert r["body_bytes"] == len(body) and r["body_sha256"] == hashlib.sha256(body).hexdigest()
    conn.request("POST", "/chunked", body=iter([body[:5000], body[5000:]]),
                 encode_chunked=True)
    r = json.loads(conn.getresponse().read())
    assert r["body_bytes"] == len(body) and r["body_sha256"] == hashlib.sha256(body).hexdigest()
    conn.close()


def test_chunked_response_is_streamed_back(proxy: Harness) -> None:
    status, headers, body = proxy.get("/bytes/300000")
    assert status == 200 and len(body) == 300000
    assert headers.get("transfer-encoding") == "chunked"


def test_chunked_bodies_with_trailers_pass_without_the_trailers(unstarted: Harness) -> None:
    # RFC 9112 section 7.1.2 trailers, both ways: the body arrives whole and re-framed, the
    # trailer fields are dropped (as nginx does), and the connections carry on.
    h = unstarted
    seen: list[bytes] = []

    async def trailing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            if b"chunked" in head.lower():
                while (line := await reader.readuntil(b"\r\n")) != b"0\r\n":
                    body += (await reader.readexactly(int(line, 16) + 2))[:-2]
                await reader.readuntil(b"\r\n")  # the proxy sends no trailers: one CRLF
            seen.append(body)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\n\r\n")
            await writer.drain()
    port, _ = scripted_upstream(h, trailing)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    with h.tls() as t:
        for _ in range(2):
            t.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n")
            got = b""
            while not got.endswith(b"0\r\n\r\n"):
                got += t.recv(65536)
            assert got.startswith(b"HTTP/1.1 200 "), got
            assert got.endswith(b"\r\n\r\n2\r\nok\r\n0\r\n\r\n"), got
            assert b"grpc-status" not in got.lower()
    assert seen == [b"hello", b"hello"]


def test_expect_100_continue_is_answered_by_the_proxy(proxy: Harness) -> None:
    out = proxy.raw(b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n\r\nhello")
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    assert b'"body_bytes": 5' in out
    assert b"expect" not in out.split(b"\r\n\r\n", 2)[2].lower()


def test_head_and_204_responses_have_no_body(unstarted: Harness) -> None:
    h = unstarted

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
    port, _ = scripted_upstream(h, answer)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    conn = h.https()
    conn.request("HEAD", "/")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-length") == "1234" and r.read() == b""
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 204 and r.read() == b""
    conn.request("HEAD", "/")  # the same connections still work after both
    assert conn.getresponse().status == 200
    conn.close()


def test_close_delimited_upstream_response_is_rechunked(unstarted: Harness) -> None:
    h = unstarted

    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
        await writer.drain()
    port, _ = scripted_upstream(h, old_style)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    status, headers, body = h.get("/")
    assert status == 200 and body == b"until close"
    assert headers.get("transfer-encoding") == "chunked"


def test_access_log_has_one_json_line_per_request(proxy: Harness) -> None:
    proxy.get("/logged")
    deadline = time.monotonic() + 3
    while not proxy.access_lines and time.monotonic() < deadline:
        time.sleep(0.05)
    record = json.loads(proxy.access_lines[-1])
    assert record["path"] == "/logged" and record["status"] == 200
    assert record["listener"] == "public" and record["client"] == "127.0.0.1"
    assert record["client_cert_fingerprint"] == hashlib.sha256(proxy.pki.client.der).hexdigest()
    assert "CN=good-client" in record["client_cert_subject"]
    for key in ("time", "method", "bytes", "duration_ms", "upstream", "resumed"):
        assert key in record


def test_access_log_names_the_request_and_its_tls(proxy: Harness) -> None:
    proxy.get("/who", headers={"User-Agent": "probe/1.0", "X-Request-Id": "req-42",
                               "Host": "api.example.test"})
    wait_for(lambda: bool(proxy.access_lines))
    record = json.loads(proxy.access_lines[-1])
    assert (record["host"], record["user_agent"], record["request_id"]) == (
        "api.example.test", "probe/1.0", "req-42")
    assert record["protocol"] == "HTTP/1.1"
    assert record["tls_version"] == "TLSv1.3" and record["tls_cipher"].startswith("TLS_")
    assert record["upstream_status"] == 200
    assert 0 <= record["upstream_duration_ms"] <= record["duration_ms"]


def test_a_request_without_x_request_id_gets_one_forwarded_and_logged(proxy: Harness) -> None:
    """nginx's $request_id (32 hex digits), forwarded as Envoy forwards its own: the
    upstream's log line and the proxy's share it."""
    body = proxy.echo_json("/traced")
    (forwarded,) = [v for n, v in body["headers"] if n == "x-request-id"]
    assert len(forwarded) == 32 and int(forwarded, 16) >= 0
    wait_for(lambda: bool(proxy.access_lines))
    assert json.loads(proxy.access_lines[-1])["request_id"] == forwarded
    again = proxy.echo_json("/traced")
    assert [v for n, v in again["headers"] if n == "x-request-id"] != [forwarded]


def test_a_client_x_request_id_is_forwarded_unchanged_and_alone(proxy: Harness) -> None:
    body = proxy.echo_json("/traced", headers={"X-Request-Id": "client-7"})
    assert [v for n, v in body["headers"] if n == "x-request-id"] == ["client-7"]


def test_access_log_has_the_sni_name_and_the_bytes_received(proxy: Harness) -> None:
    payload = b"x" * 1000
    conn = proxy.https()
    conn.request("POST", "/upload", body=payload)
    conn.getresponse().read()
    conn.request("GET", "/small")
    conn.getresponse().read()
    conn.close()
    wait_for(lambda: len(proxy.access_lines) >= 2)
    first, second = (json.loads(line) for line in proxy.access_lines[-2:])
    assert first["sni"] == "localhost"
    # The head and the body the client sent: more than the body, less than twice it.
    assert 1000 < first["bytes_received"] < 1400, first
    assert 30 < second["bytes_received"] < 300, second


def test_access_log_has_no_upstream_status_when_the_proxy_answered(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(routes=[{"path_prefix": "/only",
                              "upstream": f"http://127.0.0.1:{h.start_echo()}"}]))
    assert h.get("/elsewhere")[0] == 404
    wait_for(lambda: bool(h.access_lines))
    record = json.loads(h.access_lines[-1])
    assert (record["status"], record["upstream_status"], record["upstream_duration_ms"]) == (
        404, None, None)


def test_access_log_durations_have_sub_millisecond_resolution(proxy: Harness) -> None:
    # uvloop's clock moves in whole milliseconds: durations read from it were 0.0, 1.0,
    # 2.0. Measured with perf_counter, some of ten keep-alive requests show a fraction.
    conn = proxy.https()
    for i in range(10):
        conn.request("GET", f"/{i}")
        conn.getresponse().read()
    conn.close()
    wait_for(lambda: len(proxy.access_lines) >= 10)
    durations = [json.loads(line)["duration_ms"] for line in proxy.access_lines]
    assert any(d != int(d) for d in durations), durations


def test_ipv6_loopback_listener_and_upstream(unstarted: Harness) -> None:
    # ::1 on both sides: the client address reaches X-Forwarded-For as is, and the upstream
    # label is bracketed like a URL's ([::1]:port).
    h = unstarted

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        xff = [line.split(b": ", 1)[1] for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-forwarded-for:")]
        body = b",".join(xff)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def serve6() -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(answer, "::1", 0)
        return server, int(server.sockets[0].getsockname()[1])
    server, up = h.loop.run(serve6())
    try:
        h.start(h.config(address="[::1]:0", upstream=f"http://[::1]:{up}"))
        got = h.raw(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", host="::1")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n::1"), got
        assert h.metric("mtlsproxy_requests_total", listener="public", route="/",
                        code="200") == 1
        assert h.server is not None
        assert h.server.config.listeners[0].routes[0].upstream.key == f"[::1]:{up}"
    finally:
        server.close()
