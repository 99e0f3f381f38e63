"""The external authorizer (issue #6, ``routes[].authorizer``) against a real HTTP server
the test runs: allow, deny, header injection, TTL, timeout fail-closed and fail-open,
coalescing of concurrent identical misses, and what one cached answer may decide (issue
#20: per request by default, per route when the answer says so, or a policy)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from mtlsproxy.admission.authorizer import Policy, Statement, parse_answer
from tests.support.harness import Harness
from tests.support.tools import read_post_body

Answer = dict[str, Any]


class FakeAuthorizer:
    """A real HTTP/1.1 server on loopback answering with a scripted decision."""

    def __init__(self, h: Harness, answer: Answer | Callable[[dict[str, Any]], Answer],
                 delay: float = 0.0) -> None:
        """``answer``: the same for every call, or computed from the request document."""
        self.answer, self.delay = answer, delay
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                doc = json.loads(await read_post_body(reader))
                with self.lock:
                    self.requests.append(doc)
                await asyncio.sleep(self.delay)
                answer = self.answer(doc) if callable(self.answer) else self.answer
                out = json.dumps(answer).encode()
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

    def asked(self) -> list[tuple[str, str]]:
        """(method, path) of every call, in order."""
        with self.lock:
            return [(d["request"]["method"], d["request"]["path"]) for d in self.requests]


def start(h: Harness, auth: FakeAuthorizer, **authorizer: Any) -> None:
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": echo,
                              "authorizer": {"url": auth.url, **authorizer}}]))


def calls(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_authorizer_requests_total", route="/", result=result)


def send(h: Harness, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request on a new connection: the status and the JSON body (echo's or ours)."""
    conn = h.https()
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


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


# -- what one cached answer decides (issue #20 item 4) ----------------------------------

def read_only(doc: dict[str, Any]) -> Answer:
    """An authorizer whose decision depends on the method and the path."""
    req = doc["request"]
    allow = req["method"] == "GET" and req["path"].startswith("/r/read")
    return {"allow": allow, "ttl": 60}


@pytest.mark.parametrize("order", [["/r/read", "/r/admin"], ["/r/admin", "/r/read"]],
                         ids=["read-first", "admin-first"])
def test_an_answer_for_one_path_is_not_reused_for_another_and_each_is_cached(
        harness: Harness, order: list[str]) -> None:
    auth = FakeAuthorizer(harness, read_only)
    start(harness, auth)
    expected = {"/r/read": 200, "/r/admin": 403}
    for path in order + order:
        assert send(harness, "GET", path)[0] == expected[path], path
    assert sorted(auth.asked()) == [("GET", "/r/admin"), ("GET", "/r/read")]
    assert calls(harness, "allow") == 1 and calls(harness, "deny") == 1
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="unauthorized") == 2


def test_an_answer_for_one_method_is_not_reused_for_another(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, read_only)
    start(harness, auth)
    assert send(harness, "GET", "/r/read")[0] == 200
    assert send(harness, "POST", "/r/read")[0] == 403
    assert auth.asked() == [("GET", "/r/read"), ("POST", "/r/read")]


def test_the_query_is_not_part_of_the_cache_key(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, read_only)
    start(harness, auth)
    assert send(harness, "GET", "/r/read")[0] == 200
    assert send(harness, "GET", "/r/read?x=1")[0] == 200
    assert auth.asked() == [("GET", "/r/read")]


def test_scope_route_caches_one_answer_for_every_request_on_the_route(
        harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": True, "ttl": 60, "scope": "route",
                                    "headers": {"X-Tenant": "acme"}})
    start(harness, auth)
    for method, path in [("GET", "/a"), ("GET", "/b"), ("POST", "/c")]:
        status, body = send(harness, method, path)
        assert status == 200 and dict(body["headers"])["x-tenant"] == "acme"
    assert auth.asked() == [("GET", "/a")]
    assert calls(harness, "allow") == 1


def test_a_route_scoped_entry_is_looked_up_before_the_request_scoped_one(
        harness: Harness) -> None:
    def answer(doc: dict[str, Any]) -> Answer:
        if doc["request"]["path"] == "/a":
            return {"allow": False, "ttl": 60}
        return {"allow": True, "ttl": 60, "scope": "route"}
    auth = FakeAuthorizer(harness, answer)
    start(harness, auth)
    assert send(harness, "GET", "/a")[0] == 403
    assert send(harness, "GET", "/b")[0] == 200
    # The later route-wide answer now decides /a too: the authorizer said so.
    assert send(harness, "GET", "/a")[0] == 200
    assert auth.asked() == [("GET", "/a"), ("GET", "/b")]


def test_a_policy_answer_decides_later_requests_of_the_client_without_another_call(
        harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {
        "allow": [{"methods": ["GET"], "path_prefix": "/r/read"}], "ttl": 60,
        "headers": {"X-Tenant": "acme"}})
    start(harness, auth)
    for method, path, status in [("GET", "/r/read", 200), ("GET", "/r/read/x", 200),
                                 ("GET", "/r/admin", 403), ("POST", "/r/read", 403),
                                 ("GET", "/r/readme", 403)]:
        got, body = send(harness, method, path)
        assert got == status, (method, path)
        if status == 200:
            assert dict(body["headers"])["x-tenant"] == "acme"
        else:
            assert body["reason"] == "unauthorized"
    assert auth.asked() == [("GET", "/r/read")]
    assert calls(harness, "allow") == 1 and calls(harness, "deny") == 0
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="unauthorized") == 3


def test_a_policy_that_refuses_the_asking_request_is_counted_as_a_deny(
        harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": [{"path_prefix": "/r/read"}], "ttl": 60})
    start(harness, auth)
    assert send(harness, "GET", "/r/admin")[0] == 403
    assert send(harness, "GET", "/r/read")[0] == 200
    assert auth.asked() == [("GET", "/r/admin")]
    assert calls(harness, "deny") == 1 and calls(harness, "allow") == 0


def test_a_malformed_policy_is_an_authorizer_error_and_fails_closed(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, {"allow": [{"path": "/r/read"}], "ttl": 60})
    start(harness, auth, failure_mode="closed")
    for _ in range(2):
        status, body = send(harness, "GET", "/r/read")
        assert status == 503 and body["reason"] == "authorizer_unavailable"
    assert len(auth.asked()) == 2  # a failure is never cached
    assert calls(harness, "error") == 2


@pytest.mark.parametrize("answer", [
    {"allow": {"methods": ["GET"]}},                      # not a list
    {"allow": ["GET"]},                                   # not a list of mappings
    {"allow": [[]]},                                      # would otherwise match all
    {"allow": [{"paths": "/r"}]},                         # unknown key
    {"allow": [{"methods": "GET"}]},                      # wrong type
    {"allow": [{"methods": ["GE T"]}]},                   # not a method name
    {"allow": [{"path_prefix": 7}]},                      # wrong type
    {"allow": [{"path_prefix": "r/read"}]},               # not starting with /
    {"allow": [{"path_prefix": "/\u0100"}]},             # not latin-1, as targets arrive
    {"allow": [{}], "scope": "request"},                  # a policy is route-scoped
    {"allow": True, "scope": "listener"},                 # no such scope
], ids=lambda a: json.dumps(a))
def test_a_malformed_answer_is_refused(answer: Answer) -> None:
    with pytest.raises(ValueError):
        parse_answer(200, json.dumps(answer).encode())


def test_policy_statements_match_methods_exactly_and_paths_on_segment_boundaries() -> None:
    def policy(statement: dict[str, Any]) -> Statement:
        entry = parse_answer(200, json.dumps({"allow": [statement]}).encode()).entry
        assert isinstance(entry, Policy)
        [parsed] = entry.statements
        return parsed
    read = policy({"path_prefix": "/r/read/"})
    assert read.matches(b"GET", b"/r/read") and read.matches(b"DELETE", b"/r/read/x")
    assert not read.matches(b"GET", b"/r/readme") and not read.matches(b"GET", b"/r")
    everything = policy({"path_prefix": "/"})
    assert everything.matches(b"GET", b"/") and everything.matches(b"PUT", b"/any/thing")
    assert policy({}).matches(b"PATCH", b"/x")
    get = policy({"methods": ["GET", "HEAD"]})
    assert get.matches(b"HEAD", b"/x") and not get.matches(b"get", b"/x")
    assert not policy({"methods": []}).matches(b"GET", b"/")


# -- an attack round: which route a cached answer belongs to --------------------------------

def test_two_routes_with_one_name_never_share_a_cached_answer(harness: Harness) -> None:
    # A host route "api.example.test" + "/" and its domain's catch-all "/" are both named
    # "api.example.test/": one's cached answer must not decide for the other.
    lenient = FakeAuthorizer(harness, {"allow": True, "ttl": 60, "scope": "route"})
    strict = FakeAuthorizer(harness, {"allow": False, "ttl": 60, "scope": "route"})
    echo = f"http://127.0.0.1:{harness.start_echo()}"
    raw = harness.config()
    listener = raw["listeners"][0]
    listener["domains"] = [{
        "names": ["api.example.test", "localhost"],
        "certificates": listener.pop("tls")["certificates"],
        "mutual_tls": listener.pop("mutual_tls"),
        "routes": [
            {"host": "api.example.test", "path_prefix": "/", "upstream": echo,
             "authorizer": {"url": lenient.url}},
            {"path_prefix": "/", "upstream": echo, "authorizer": {"url": strict.url}},
        ]}]
    del listener["routes"]
    harness.start(raw)
    assert harness.get("/", headers={"Host": "api.example.test"})[0] == 200
    status, _, _ = harness.get("/", headers={"Host": "localhost"})
    assert status == 403
    assert len(lenient.requests) == 1 and len(strict.requests) == 1


def test_a_reload_that_changes_the_authorizer_drops_its_cached_answers(
        harness: Harness) -> None:
    lenient = FakeAuthorizer(harness, {"allow": True, "ttl": 300, "scope": "route"})
    strict = FakeAuthorizer(harness, {"allow": False, "ttl": 300, "scope": "route"})
    echo = f"http://127.0.0.1:{harness.start_echo()}"

    def config(url: str) -> dict[str, Any]:
        return harness.config(routes=[{"path_prefix": "/", "upstream": echo,
                                       "authorizer": {"url": url}}])
    harness.start(config(lenient.url))
    assert harness.get("/orders/1")[0] == 200
    assert harness.reload(config(strict.url)) == []
    assert harness.get("/orders/1")[0] == 403
    assert len(strict.requests) == 1
