"""The external authorizer (issue #6, ``routes[].authorizer``) against a real HTTP server
the test runs: allow, deny, header injection, TTL, timeout fail-closed and fail-open, and
coalescing of concurrent identical misses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from typing import Any

from tests.conftest import Harness, read_post_body


class FakeAuthorizer:
    """A real HTTP/1.1 server on loopback answering with a scripted decision."""

    def __init__(self, h: Harness, answer: dict[str, Any], delay: float = 0.0) -> None:
        self.answer, self.delay = answer, delay
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                body = await read_post_body(reader)
                with self.lock:
                    self.requests.append(json.loads(body))
                await asyncio.sleep(self.delay)
                out = json.dumps(self.answer).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(out), out))
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.port = h.serve(handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/authorize"


def start(h: Harness, auth: FakeAuthorizer, **authorizer: Any) -> None:
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": echo,
                              "authorizer": {"url": auth.url, **authorizer}}]))


def calls(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_authorizer_requests_total", route="/", result=result)


def test_allow_forwards_with_the_authorizer_headers(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": True, "ttl": 0, "headers": {
        "X-Tenant": "acme", "Client-Cert": ":forged:", "Content-Length": "1"}})
    start(harness, auth, forward_headers=["x-request-id"])
    status, _, body = harness.get("/pay?x=1", headers={"X-Request-Id": "r1", "X-Other": "no"})
    assert status == 200
    headers = dict(json.loads(body)["headers"])
    assert headers["x-tenant"] == "acme"
    assert headers["client-cert"] != ":forged:"  # certificate headers stay ours
    doc = auth.requests[0]
    cert = doc["client_certificate"]
    assert cert["fingerprint_sha256"] == hashlib.sha256(harness.pki.client.der).hexdigest()
    assert cert["pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert cert["san_uri"] == ["spiffe://prod.example.test/ns/payments/sa/api"]
    assert len(cert["chain"]) == 2 and "CN=good-client" in cert["subject"]
    assert doc["request"]["method"] == "GET" and doc["request"]["path"] == "/pay?x=1"
    assert doc["request"]["headers"] == {"x-request-id": "r1"}
    assert calls(harness, "allow") == 1


def test_deny_gets_403_unauthorized(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": False})
    start(harness, auth)
    status, _, body = harness.get("/")
    assert status == 403 and json.loads(body)["reason"] == "unauthorized"
    assert calls(harness, "deny") == 1
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="unauthorized") == 1


def test_decisions_are_cached_for_their_ttl(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": True, "ttl": 60})
    start(harness, auth)
    for _ in range(3):
        assert harness.get("/")[0] == 200
    assert len(auth.requests) == 1


def test_ttl_zero_asks_every_time(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": True, "ttl": 0})
    start(harness, auth)
    for _ in range(3):
        assert harness.get("/")[0] == 200
    assert len(auth.requests) == 3


def test_a_slow_authorizer_fails_closed_by_default(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": True}, delay=2)
    start(harness, auth, timeout=0.2)
    status, _, body = harness.get("/")
    assert status == 503 and json.loads(body)["reason"] == "authorizer_unavailable"
    assert calls(harness, "timeout") == 1


def test_a_slow_authorizer_fails_open_when_configured(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": False}, delay=2)
    start(harness, auth, timeout=0.2, failure_mode="open")
    assert harness.get("/")[0] == 200
    assert calls(harness, "timeout") == 1


def test_an_unreachable_authorizer_is_an_error(harness: Harness) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    echo = f"http://127.0.0.1:{harness.start_echo()}"
    harness.start(harness.config(routes=[{"path_prefix": "/", "upstream": echo, "authorizer": {
        "url": f"http://127.0.0.1:{port}/"}}]))
    assert harness.get("/")[0] == 503
    assert calls(harness, "error") == 1


def test_concurrent_identical_misses_share_one_call(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": True, "ttl": 0}, delay=0.5)
    start(harness, auth)
    statuses: list[int] = []
    ctx = harness.client_context()

    def one() -> None:
        statuses.append(harness.get("/", ctx=ctx)[0])
    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert statuses == [200] * 5
    assert len(auth.requests) == 1
