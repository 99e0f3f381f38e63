"""The callback fast path (proxy/session.py) and each of its hand-offs to the general path.

A request takes the fast path when it is bodyless, its verdict is current, its route has
no authorizer, and an idle pooled upstream connection is there: in these tests, the
second and later requests of a keep-alive connection. Everything the fast path cannot
finish from callbacks (a response in pieces, a silent or dying upstream, a client that
leaves, a drain) must end exactly as on the general path.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import pytest

from tests.support.harness import Harness
from tests.support.pki import make_cert
from tests.support.tools import wait_for

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def scripted(h: Harness, *answers: object) -> int:
    """An upstream whose Nth request on a connection gets answers[N] (bytes, a list of
    (bytes, delay) pieces, "silent", or "reset"); it counts requests per connection."""
    h.upstream_requests = []  # type: ignore[attr-defined]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                h.upstream_requests.append(seen)  # type: ignore[attr-defined]
                answer = answers[min(seen, len(answers) - 1)]
                seen += 1
                if answer == "silent":
                    await asyncio.sleep(30)
                elif answer == "reset":
                    writer.transport.abort()
                    return
                elif isinstance(answer, bytes):
                    writer.write(answer)
                else:
                    for piece, delay in answer:  # type: ignore[attr-defined]
                        writer.write(piece)
                        await writer.drain()
                        await asyncio.sleep(delay)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
    return h.serve(handler)


def pooled(h: Harness, *answers: object, **listener: object
           ) -> tuple[http.client.HTTPSConnection, int]:
    """A proxy before a scripted upstream, and a client connection whose first request
    (answered OK) left an idle pooled upstream connection: its next request is fast.
    Returns the connection and the upstream's port."""
    port = scripted(h, OK, *answers)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}", **listener))
    conn = h.https()
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"ok"
    return conn, port


def general_path_tasks(h: Harness) -> int:
    """Sessions' general-path tasks started so far: the fast path starts none."""
    return h.loop.call(lambda: h.loop.tasks_started["ProxySession.run"])


def test_later_requests_on_a_keep_alive_connection_take_the_fast_path(proxy: Harness) -> None:
    conn = proxy.https()
    for i in range(4):
        conn.request("GET", f"/{i}")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["path"] == f"/{i}"
    conn.close()
    # The first request opened the upstream connection (general path); three were fast.
    assert general_path_tasks(proxy) == 1
    assert proxy.metric("mtlsproxy_requests_total", listener="public", route="/",
                        code="200") == 4


def test_a_connection_alternating_routes_counts_each_request_on_its_route(
        unstarted: Harness) -> None:
    h = unstarted
    h.start_echo()
    upstream = f"http://127.0.0.1:{h.echo_port}"
    h.start(h.config(routes=[{"path_prefix": "/a", "upstream": upstream},
                             {"path_prefix": "/", "upstream": upstream}]))
    conn = h.https()
    for path in ("/a/1", "/b", "/a/2", "/a/3", "/b", "/b"):
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["path"] == path
    conn.close()
    assert general_path_tasks(h) == 1  # the later five were fast exchanges
    assert h.metric("mtlsproxy_requests_total", listener="public", route="/a",
                    code="200") == 3
    assert h.metric("mtlsproxy_requests_total", listener="public", route="/",
                    code="200") == 3


def test_fast_path_forwards_the_same_headers_as_the_general_path(proxy: Harness) -> None:
    conn = proxy.https()
    seen = []
    for _ in range(2):
        conn.request("GET", "/h", headers={"X-Forwarded-Client-Cert": "spoofed",
                                           "Connection": "keep-alive, X-Hop", "X-Hop": "1"})
        seen.append(json.loads(conn.getresponse().read())["headers"])
    conn.close()
    assert general_path_tasks(proxy) == 1
    # The same headers, each with an X-Request-Id of its own (generated: none came).
    ids = [[v for n, v in h if n == "x-request-id"] for h in seen]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    assert [h for h in seen[0] if h[0] != "x-request-id"] == \
        [h for h in seen[1] if h[0] != "x-request-id"]
    assert all(v != "spoofed" for _, v in seen[1]) and all(n != "x-hop" for n, _ in seen[1])


def test_response_in_pieces_on_a_pooled_connection_is_streamed_whole(
        unstarted: Harness) -> None:
    pieces = [(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", 0.1), (b"world", 0)]
    conn, _ = pooled(unstarted, pieces)
    conn.request("GET", "/b")
    assert conn.getresponse().read() == b"helloworld"
    conn.request("GET", "/c")  # and the connection still serves
    assert conn.getresponse().read() == b"helloworld"
    conn.close()


def test_silent_upstream_on_a_pooled_connection_gets_504(unstarted: Harness) -> None:
    h = unstarted
    conn, port = pooled(h, "silent", timeouts={"upstream_read": 0.3})
    conn.request("GET", "/")
    r = conn.getresponse()
    assert r.status == 504 and json.loads(r.read())["reason"] == "upstream_timeout"
    conn.close()
    wait_for(lambda: h.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                              kind="timeout") == 1)


def test_pooled_connection_reset_after_a_get_is_retried_once_on_a_fresh_one(
        unstarted: Harness) -> None:
    h = unstarted
    conn, _ = pooled(h, "reset")
    conn.request("GET", "/")
    # The upstream closed before a byte of the answer (as when its keep-alive timeout
    # races the reuse): an idempotent request goes once more, on a fresh connection (RFC
    # 9110 section 9.2.2; nginx's proxy_next_upstream error), handed to the general path.
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"ok")
    conn.close()
    assert h.upstream_requests == [0, 1, 0]  # type: ignore[attr-defined]


def test_pooled_connection_reset_after_a_post_gets_502(unstarted: Harness) -> None:
    h = unstarted
    conn, _ = pooled(h, "reset")
    conn.request("POST", "/")  # bodyless (Content-Length: 0), so it takes the fast path
    # The request may have been acted on: 502 and no second attempt.
    r = conn.getresponse()
    assert r.status == 502 and json.loads(r.read())["reason"] == "upstream_unavailable"
    conn.close()
    assert h.upstream_requests == [0, 1]  # type: ignore[attr-defined]
    # Counted just after the response is written: the client may read it first.
    wait_for(lambda: h.metric("mtlsproxy_requests_total", listener="public", route="/",
                              code="502") == 1)


def test_client_leaving_during_a_fast_exchange_is_counted_499(unstarted: Harness) -> None:
    h = unstarted
    port = scripted(h, OK, "silent")
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    ctx = h.client_context()
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            first = b""
            while not first.endswith(b"ok"):
                first += t.recv(65536)
            t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            wait_for(lambda: len(h.upstream_requests) == 2)  # type: ignore[attr-defined]
    wait_for(lambda: h.metric("mtlsproxy_requests_total", listener="public",
                              route="/", code="499") == 1)
    assert h.server is not None
    wait_for(lambda: h.loop.call(lambda: not h.server.listeners[0].sessions))  # type: ignore[union-attr]


def test_drain_during_a_fast_exchange_answers_it_then_closes(unstarted: Harness) -> None:
    h = unstarted
    slow = [(b"", 0.3), (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow", 0)]
    conn, _ = pooled(h, slow)
    conn.request("GET", "/")
    wait_for(lambda: len(h.upstream_requests) == 2)  # type: ignore[attr-defined]
    assert h.server is not None
    h.loop.call(lambda: h.server.listeners[0].begin_drain())  # type: ignore[union-attr]
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"slow"
    assert r.getheader("connection") == "close"
    conn.close()


def test_idle_timeout_after_a_fast_exchange_closes_quietly(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(timeouts={"idle": 0.3}))
    conn = h.https()
    for _ in range(2):
        conn.request("GET", "/")
        conn.getresponse().read()
    assert general_path_tasks(h) == 1
    assert conn.sock is not None
    conn.sock.settimeout(5)
    try:
        assert conn.sock.recv(10) == b""
    finally:
        conn.close()


def _twice_on_one_connection(h: Harness, answer: bytes) -> list[bytes]:
    """Start the proxy before an upstream that gives every request ``answer`` (ending in
    "ok"); send two requests on one client connection, the first on the general path and
    the second on a pooled upstream connection, the fast one; return both responses."""
    port = scripted(h, answer)
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    out = []
    with h.tls() as t:
        for _ in range(2):
            t.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            got = b""
            while not got.endswith(b"ok"):
                got += t.recv(65536)
            out.append(got)
    return out


def _response_headers(raw: bytes) -> dict[bytes, bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return {n.strip().lower(): v.strip() for n, _, v in
            (line.partition(b":") for line in head.split(b"\r\n")[1:])}


@pytest.mark.parametrize("connection", [b"keep-alive", b"keep-alive, X-Up-Hop"])
def test_hop_by_hop_response_headers_are_removed_on_both_paths(
        unstarted: Harness, connection: bytes) -> None:
    # RFC 9110 section 7.6.1: the upstream's hop-by-hop fields (and those its Connection
    # names) stop at the proxy; look-alike names (a hop-by-hop name as a prefix or a
    # suffix) and everything else reach the client. The first request takes the general
    # path, the second the fast one.
    h = unstarted
    answer = (b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: " + connection + b"\r\n"
              b"Keep-Alive: timeout=5\r\nX-Up-Hop: 1\r\nPROXY-AUTHENTICATE: Basic\r\n"
              b"upgrade: h2c\r\nTrailer: X-T\r\nTE: trailers\r\nX-Connection: kept\r\n"
              b"Keep-Alive-X: kept\r\nX-Kept:\tyes \r\nContent-Length: 2\r\n\r\nok")
    for got in _twice_on_one_connection(h, answer):
        headers = _response_headers(got)
        assert {b"keep-alive", b"proxy-authenticate", b"upgrade", b"trailer",
                b"te"}.isdisjoint(headers), got
        assert (b"x-up-hop" in headers) is (connection == b"keep-alive"), got
        assert headers[b"x-kept"] == b"yes" and headers[b"server"] == b"up"
        assert headers[b"x-connection"] == headers[b"keep-alive-x"] == b"kept"
        assert headers[b"content-length"] == b"2" and b"connection" not in headers
    assert h.upstream_requests == [0, 1]  # type: ignore[attr-defined]
    assert general_path_tasks(h) == 1


def test_bytes_after_a_complete_response_never_reach_the_next_request(
        unstarted: Harness) -> None:
    # An upstream that answers once and then some: a second response in the same write.
    # Pooled, the connection would hand those bytes to the next request, another client's
    # perhaps, as its answer (h11 kept them buffered for the next cycle). The connection
    # is closed instead, as nginx does; each request gets its own answer.
    h = unstarted
    twice = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
             b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nSMUGGLED!")
    port = scripted(h, twice, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    for _ in range(3):
        conn = h.https()
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"first"
        conn.close()
    assert h.upstream_requests == [0, 0, 0]  # type: ignore[attr-defined]


def test_a_body_sent_after_a_head_answer_never_reaches_the_next_request(
        unstarted: Harness) -> None:
    # An upstream that sends a body with its answer to HEAD (RFC 9110 section 9.3.2: it
    # must not). The client gets the head only; the connection is not pooled with those
    # bytes in it, so the next request (a GET) gets its own answer.
    h = unstarted
    head_with_body = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nSMUGGLED!"
    port = scripted(h, head_with_body, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.start(h.config(upstream=f"http://127.0.0.1:{port}"))
    conn = h.https()
    conn.request("HEAD", "/")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"" and r.getheader("content-length") == "9"
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"SMUGGLED!"  # a fresh connection: its answer 0
    conn.close()
    assert h.upstream_requests == [0, 0]  # type: ignore[attr-defined]


def test_interim_responses_from_the_upstream_are_dropped_on_both_paths(
        unstarted: Harness) -> None:
    # 103 Early Hints (or a stray 100) before the final answer: only the final one reaches
    # the client, as with nginx. The first request takes the general path, the second
    # (a pooled connection) the fast one.
    h = unstarted
    interim = (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
               b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    for got in _twice_on_one_connection(h, interim):
        assert got.startswith(b"HTTP/1.1 200 ") and b"103" not in got, got
    assert h.upstream_requests == [0, 1]  # type: ignore[attr-defined]


# -- identical heads from two clients ---------------------------------------------------

def test_identical_requests_from_two_clients_carry_each_its_own_identity(
        proxy: Harness) -> None:
    other = make_cert("other-client", proxy.pki.inter, dns=("other.example.test",))
    clients = [proxy.https(), proxy.https(proxy.client_context(other, name="other"))]
    seen: list[list[dict[str, str]]] = [[], []]
    for _ in range(6):
        for i, conn in enumerate(clients):  # byte-identical requests, interleaved
            conn.request("GET", "/same")
            r = conn.getresponse()
            assert r.status == 200
            seen[i].append({n: v for n, v in json.loads(r.read())["headers"]
                            if n != "x-request-id"})  # generated per request
    for conn in clients:
        conn.close()
    assert general_path_tasks(proxy) <= 2  # the first request of each client only
    for own in seen:
        assert all(headers == own[0] for headers in own)
    subjects = [{v for n, v in own[0].items() if "subject" in n or n == "client-cert"}
                for own in seen]
    assert subjects[0] and subjects[1] and subjects[0] != subjects[1]
    assert any("good-client" in v for v in subjects[0])
    assert any("other-client" in v for v in subjects[1])
