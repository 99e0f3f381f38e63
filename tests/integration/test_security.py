"""Attacks of a hostile client, through the real proxy, on both parsers and both loops
(issue 20): forged identity headers in every spelling a backend folds together, other
spellings of a refused path, addresses the client claims, an authorizer answer reused for
another request. Each test asserts what the UPSTREAM saw: a real echo upstream, and a real
WSGI server (wsgiref), which folds ``_`` and ``-`` into ``HTTP_*`` variables as every
WSGI, CGI, PHP and Rails backend does, and serves paths the way a normalising upstream
does.
"""

from __future__ import annotations

import json
import posixpath
import random
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from mtlsproxy.config import RouteConfig, parse_upstream
from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.normalize import normalize_target
from mtlsproxy.proxy.routing import Router
from tests.integration.test_forwarding import headers_of
from tests.support.harness import Harness

NOBODY = "00" * 32  # an allow rule no client matches: the route refuses everyone


@pytest.fixture(params=["httptools", "h11", "h2"])
def unstarted(harness_for: Any, loop_kind: str, request: pytest.FixtureRequest) -> Harness:
    """Each attack over HTTP/1.1 on both parsers, and over HTTP/2 (issue 23: everything
    the HTTP/1.1 path guarantees holds on the HTTP/2 path), on both loops."""
    h: Harness = harness_for(loop_kind)
    if request.param == "h2":
        h.protocol = "h2"
    else:
        h.default_parser = request.param
    return h


# -- a WSGI upstream ----------------------------------------------------------------------

def served_path(path_info: str) -> str:
    """The path a normalising upstream serves for PATH_INFO (already %-decoded by the
    server): Tomcat drops ;parameters, IIS and many frameworks take \\ as /, every one
    resolves dot-segments and empty segments."""
    segments = [s.split(";", 1)[0] for s in path_info.replace("\\", "/").split("/")]
    return posixpath.normpath("/" + "/".join(segments)).replace("//", "/")


class WSGIUpstream:
    """wsgiref on loopback in a thread: records each request's environ."""

    def __init__(self) -> None:
        self.environs: list[dict[str, str]] = []

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server: WSGIServer = make_server("127.0.0.1", 0, self.app, handler_class=Quiet)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen = {k: v for k, v in environ.items() if isinstance(v, str)
                and (k.startswith("HTTP_") or k in ("PATH_INFO", "QUERY_STRING"))}
        self.environs.append(seen)
        body = json.dumps({"served": served_path(environ["PATH_INFO"]), "environ": seen})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def wsgi() -> Iterator[WSGIUpstream]:
    upstream = WSGIUpstream()
    yield upstream
    upstream.close()


def start(h: Harness, wsgi: WSGIUpstream, top: dict[str, Any] | None = None,
          **listener: Any) -> None:
    listener.setdefault("routes", [{"path_prefix": "/", "upstream": f"http://127.0.0.1:"
                                                                    f"{wsgi.port}"}])
    h.start(h.config(top=top or {}, **listener))


def get(h: Harness, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, Any]]:
    status, _, body = h.get(path, headers=headers)
    return status, (json.loads(body) if body else {})


def raw_get(h: Harness, target: bytes, extra: bytes = b"", host: bytes = b"localhost",
            ctx: Any = None) -> bytes:
    """One request with a target, Host and header lines exactly as given (http.client
    would refuse or re-encode some of them). Over HTTP/2 the same target (:path), host
    (:authority) and fields, and the answer rendered as an HTTP/1.1 response's bytes, so
    one assertion reads both."""
    if h.protocol == "h2":
        fields = [tuple(line.decode("latin-1").split(":", 1)) for line in extra.split(b"\r\n")
                  if line]
        status, headers, body = h.h2_request(
            "GET", target.decode("latin-1"),
            [("host", host.decode("latin-1")), *((n, v.strip()) for n, v in fields)], ctx)
        head = "".join(f"{n}: {v}\r\n" for n, v in headers.items() if n[:1] != ":")
        return f"HTTP/1.1 {status} \r\n{head}\r\n".encode("latin-1") + body
    return h.raw(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra
                 + b"Connection: close\r\n\r\n", ctx)


def http1_only(h: Harness, why: str) -> None:
    """The attack is a spelling only HTTP/1.1 has (HTTP/2 frames it away or makes the
    request malformed: RFC 9113 section 8.2.2)."""
    if h.protocol == "h2":
        pytest.skip(f"HTTP/1.1 only: {why}")


# -- 1. forged identity headers ------------------------------------------------------------

FORGED = "CN=admin,O=forged"
# Every spelling a hostile client tries: our own families with _ for -, other proxies'
# and load balancers' identity headers, case games. A WSGI backend folds each of them
# into some HTTP_* variable.
FORGED_NAMES = [
    "Client_Cert", "client-cert", "CLIENT-CERT-CHAIN", "Client_Cert_Chain",
    "X_Forwarded_Client_Cert", "x-forwarded-client-cert", "X-Client-Cert_Subject",
    "X-Client-Cert-Subject", "x_client_cert_fingerprint_sha256", "ssl_client_cert",
    "SSL-Client-Verify", "SSL-Client-S-DN", "SSL_CLIENT_I_DN", "X-SSL-Cert",
    "X-SSL-Client-Cert", "X_SSL_CLIENT_S_DN", "X-Amzn-Mtls-Clientcert",
    "X-Amzn-Mtls-Clientcert-Leaf", "x-amzn-mtls-clientcert-subject",
    "X_Amzn_Mtls_Clientcert_Serial_Number", "X-Forwarded-Tls-Client-Cert",
    "X-Client-Verify", "X-Client-DN", "X-ARR-ClientCert", "Cf-Client-Cert-Sha256",
    "l5d-client-id", "X-Client-Certificate", "WL-Proxy-Client-Cert", "WL-Proxy-SSL",
    "$WSCC", "$WSIS", "Proxy-auth-cert", "Proxy-ssl-id", "X-Forwarded-SSL-Client-Cert",
    "X-Client-Subject", "X-Client-Crt", "X-Cert", "SSLClientCert",
]


def forged_headers() -> dict[str, str]:
    return {name: FORGED for name in FORGED_NAMES}


def test_no_forged_identity_header_reaches_a_wsgi_upstream_in_any_spelling(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    start(h, wsgi)
    status, body = get(h, "/", headers=forged_headers())
    assert status == 200
    environ = body["environ"]
    assert not [k for k, v in environ.items() if FORGED in v], environ
    # The real identity is there, once, from the TLS layer.
    assert environ["HTTP_CLIENT_CERT"].startswith(":") and "," not in environ[
        "HTTP_CLIENT_CERT"]
    assert environ["HTTP_X_CLIENT_CERT_SUBJECT"].startswith("CN=good-client")


def test_no_forged_identity_header_reaches_the_echo_upstream_even_with_allow(
        unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(top={"headers_with_underscores": "allow"}))
    status, _, body = h.get("/", headers={**forged_headers(), "X_Plain_Underscore": "ok"})
    assert status == 200
    seen = headers_of(body)
    assert not [n for n, vs in seen.items() if any(FORGED in v for v in vs)], seen
    assert seen["x_plain_underscore"] == ["ok"]  # allow forwards the others


def test_underscore_headers_are_dropped_by_default_and_counted(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    start(h, wsgi)
    status, body = get(h, "/", headers={"X_Tenant": "evil", "X-Tenant": "good",
                                        "Client_Cert": "forged"})
    assert status == 200
    assert body["environ"]["HTTP_X_TENANT"] == "good"  # not "good,evil"
    assert h.metric("mtlsproxy_headers_dropped_total", listener="public",
                    reason="underscore") == 2
    assert h.metric("mtlsproxy_headers_dropped_total", listener="public",
                    reason="identity") == 0


def test_identity_headers_are_dropped_and_counted(unstarted: Harness) -> None:
    h = unstarted
    h.start()
    for _ in range(6):  # identical requests are each counted
        status, _, body = h.get("/", headers={"X-SSL-Client-S-DN": FORGED,
                                              "X-Amzn-Mtls-Clientcert": FORGED})
        assert status == 200 and FORGED.encode() not in body
    assert h.metric("mtlsproxy_headers_dropped_total", listener="public",
                    reason="identity") == 12


def test_headers_with_underscores_reject_answers_400_and_nothing_reaches_the_upstream(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    start(h, wsgi, top={"headers_with_underscores": "reject"})
    out = raw_get(h, b"/", b"X_Tenant: evil\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out[:80]
    assert b'"reason":"header_with_underscores"' in out
    assert wsgi.environs == []
    assert get(h, "/", headers={"X-Tenant": "good"})[0] == 200  # others pass


def test_allow_still_drops_underscore_spellings_of_the_proxys_own_headers(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    start(h, wsgi, top={"headers_with_underscores": "allow"})
    status, body = get(h, "/", headers={"X_Forwarded_For": "10.6.6.6",
                                        "X_Forwarded_Proto": "http",
                                        "X_Forwarded_Host": "evil.example",
                                        "Content_Length": "99"})
    assert status == 200
    environ = body["environ"]
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert "evil" not in environ["HTTP_X_FORWARDED_HOST"]
    assert "HTTP_CONTENT_LENGTH" not in environ


def test_strip_headers_removes_the_operators_names_and_prefixes_in_every_spelling(
        unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(strip_headers=["X-User-Id", "X-Internal-*"],
                     top={"headers_with_underscores": "allow"}))
    _, _, body = h.get("/", headers={"x-user-id": "1", "X_User_Id": "2",
                                     "X-Internal-Role": "admin", "x_internal_team": "a",
                                     "X-Userid": "kept"})
    seen = headers_of(body)
    assert [n for n in seen if "internal" in n or "user-id" in n or "user_id" in n] == []
    assert seen["x-userid"] == ["kept"]
    assert h.metric("mtlsproxy_headers_dropped_total", listener="public",
                    reason="strip_headers") == 4


def test_forwarded_headers_append_keeps_the_chain_and_the_last_hop_is_the_proxys(
        unstarted: Harness) -> None:
    h = unstarted
    h.start()
    _, _, body = h.get("/", headers={"X-Forwarded-For": "203.0.113.9",
                                     "Forwarded": "for=203.0.113.9;proto=http",
                                     "X-Real-IP": "203.0.113.9"})
    seen = headers_of(body)
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["forwarded"] == [f'for=203.0.113.9;proto=http, for=127.0.0.1;'
                                 f'host="localhost:{h.port}";proto=https']
    assert seen["x-real-ip"] == ["203.0.113.9"]  # append trusts the hop before


def test_a_malformed_forwarded_list_cannot_swallow_the_proxys_element(
        unstarted: Harness) -> None:
    h = unstarted
    h.start()
    # An unclosed quote would make the appended element part of the client's value.
    _, _, body = h.get("/", headers={"Forwarded": 'for="203.0.113.9'})
    assert headers_of(body)["forwarded"] == [
        f'for=127.0.0.1;host="localhost:{h.port}";proto=https']


def test_forwarded_headers_replace_states_only_the_peer(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    start(h, wsgi, forwarded_headers="replace")
    status, body = get(h, "/", headers={
        "X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9",
        "X-Real-IP": "203.0.113.9", "True-Client-IP": "203.0.113.9",
        "X-Forwarded-Port": "80", "X-Forwarded-Prefix": "/admin"})
    assert status == 200
    environ = body["environ"]
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert not [k for k, v in environ.items() if "203.0.113.9" in v or v == "/admin"], environ
    assert "HTTP_FORWARDED" not in environ


# -- 2. other spellings of a refused path ----------------------------------------------------

# Each is /pay (or below) to a normalising upstream; the client is refused on /pay.
PAY_SPELLINGS = [
    b"/pay", b"/pay/", b"/pay/x", b"/x/../pay", b"/./pay", b"/%70ay", b"/%70%61%79",
    b"//pay", b"///pay//x", b"/x/%2e%2e/pay", b"/x/%2E%2E/pay", b"/x/.%2e/pay",
    b"/pay;jsessionid=1", b"/pay;x/charge", b"/x/..;/pay", b"/x/.;/../pay", b"/%2e/pay",
    b"/x/..%2fpay", b"/x%2f..%2fpay", b"/x/..%5cpay", b"/x\\..\\pay", b"/pay#frag",
    b"/%2e%2e/pay", b"/../pay", b"/pay/%2e%2e/pay", b"/x/./../pay?q=/../",
    b"/pay%00", b"/x/%252e%252e/pay",
]


def test_no_spelling_of_a_refused_path_is_served_by_a_normalising_upstream(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    up = f"http://127.0.0.1:{wsgi.port}"
    start(h, wsgi, routes=[{"path_prefix": "/", "upstream": up},
                           {"path_prefix": "/pay", "upstream": up,
                            "allow": [{"fingerprint_sha256": NOBODY}]}])
    refused = 0
    for target in PAY_SPELLINGS:
        before = len(wsgi.environs)
        out = raw_get(h, target)
        status = int(out[9:12])
        if status in (400, 403):
            refused += 1
            assert len(wsgi.environs) == before, (target, wsgi.environs[before:])
            continue
        # Served: then not as /pay (a double encoding is "%2e%2e" to a single decoder).
        served = json.loads(out.split(b"\r\n\r\n", 1)[1])["served"]
        assert status == 200 and not (served == "/pay" or served.startswith("/pay/")), (
            target, served)
    assert refused == len(PAY_SPELLINGS) - 1
    # The same client is served elsewhere, so the refusals above were about /pay.
    status, body = get(h, "/payments/../public")
    assert status == 200 and body["served"] == "/public"


def test_the_upstream_receives_the_normalised_path_and_the_query_as_it_came(
        unstarted: Harness) -> None:
    h = unstarted
    h.start()
    out = raw_get(h, b"/a/./b/../%63%2d%7e//d/?q=%2e%2E/../x&r=%41")
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/a/c-~/d/?q=%2e%2E/../x&r=%41"


@pytest.mark.parametrize("target, why", [
    (b"/../etc/passwd", b"bad_path"), (b"/a/%2e%2e/%2e%2e/x", b"bad_path"),
    (b"/a%2fb", b"bad_path"), (b"/a%5Cb", b"bad_path"), (b"/a\\b", b"bad_path"),
    (b"/a%00", b"bad_path"), (b"/a%zz", b"bad_path"), (b"/a%4", b"bad_path"),
    (b"/a/..;/b", b"bad_path"), (b"/a#b", b"bad_path"),
])
def test_paths_that_cannot_be_normalised_get_400_and_never_reach_the_upstream(
        unstarted: Harness, target: bytes, why: bytes) -> None:
    h = unstarted
    h.start()
    out = raw_get(h, target)
    assert out.startswith(b"HTTP/1.1 400 ") and b'"reason":"' + why + b'"' in out, out[:200]


def test_escaped_slashes_keep_forwards_them_as_one_segment(unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(escaped_slashes="keep"))
    body = json.loads(raw_get(h, b"/a%2fb/%5c").split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/a%2Fb/%5C"


def test_escaped_slashes_unescape_routes_and_forwards_them_as_slashes(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    up = f"http://127.0.0.1:{wsgi.port}"
    start(h, wsgi, escaped_slashes="unescape",
          routes=[{"path_prefix": "/", "upstream": up},
                  {"path_prefix": "/pay", "upstream": up,
                   "allow": [{"fingerprint_sha256": NOBODY}]}])
    assert raw_get(h, b"/x%2f..%2fpay").startswith(b"HTTP/1.1 403 ")
    assert wsgi.environs == []
    out = raw_get(h, b"/a%2Fb\\c")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["environ"]["PATH_INFO"] == "/a/b/c"


def test_merge_slashes_false_forwards_empty_segments_but_never_a_leading_one(
        unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(merge_slashes=False))
    # "//a/..." would be the host "a" to a URL parser (RFC 3986 section 4.2).
    body = json.loads(raw_get(h, b"//a//b/./c").split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/a//b/c"


def test_a_host_route_wins_over_every_host_less_route(unstarted: Harness) -> None:
    h = unstarted
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[
        {"path_prefix": "/api/v1/pay", "upstream": echo + "/any"},
        {"path_prefix": "/", "host": "Api.Example.Test.", "upstream": echo + "/vhost"},
    ]))
    for host in (b"api.example.test", b"API.EXAMPLE.TEST:443", b"api.example.test.",
                 b"Api.Example.Test.:8443"):
        out = raw_get(h, b"/api/v1/pay/x", host=host)
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["path"] == "/vhost/api/v1/pay/x", host
    out = raw_get(h, b"/api/v1/pay/x", host=b"other.example")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["path"] == "/any/api/v1/pay/x"


# A differential property: for generated paths, the route taken and the decision made
# are those of the normalised path, and the normalised path is stable.

def _routes() -> tuple[RouteConfig, ...]:
    up = parse_upstream("http://127.0.0.1:1")
    return tuple(RouteConfig(p, up) for p in ("/", "/pay", "/pay/admin", "/a/b", "/%41x"))


def _generated_paths(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    pieces = [b"pay", b"admin", b"a", b"b", b".", b"..", b"", b"%2e", b"%2E%2e", b"%70ay",
              b"p%61y", b"%2f", b"%5c", b"\\", b";x", b"..;", b"%41x", b"Ax", b"%7e",
              b"%zz", b"%", b"x?y", b"#", b"%00", b"pay;v=1"]
    for _ in range(count):
        yield b"/" + b"/".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))


@pytest.mark.parametrize("escaped", ["reject", "keep", "unescape"])
@pytest.mark.parametrize("merge", [True, False])
def test_routing_a_spelling_is_routing_its_normalised_path(escaped: str, merge: bool) -> None:
    router = Router(_routes())
    checked = 0
    for target in _generated_paths(seed=2026, count=3000):
        try:
            normal = normalize_target(target, merge, escaped)
        except RemoteProtocolError:
            continue  # 400: never routed
        checked += 1
        assert normalize_target(normal, merge, escaped) == normal, target
        path = normal.partition(b"?")[0]
        segments = path.split(b"/")[1:]
        assert b"." not in segments and b".." not in segments, (target, normal)
        if escaped != "keep":
            assert b"\\" not in path and b"%2F" not in path and b"%5C" not in path, target
        if merge:
            assert b"//" not in path, (target, normal)
        # The proxy routes the normalised target and forwards it as it is (no strip, no
        # base here): the route of any spelling is the route of its normalised path.
        match = router.match(b"h", normal)
        assert match is not None and match[1] == normal
        # A normalising upstream (Tomcat-like: decodes, drops ;parameters, resolves dots)
        # serves a path whose route is the one the proxy chose: its rules were applied.
        if b"%" not in path:
            served = served_path(urllib.parse.unquote(path.decode("latin-1")))
            theirs = router.match(b"h", served.encode("latin-1"))
            assert theirs is not None and theirs[0] is match[0], (target, normal, served)
    assert checked > 500


# -- 4. an authorizer answer is not reused for another request -------------------------------

def test_the_authorizer_is_asked_about_the_normalised_path_of_each_request(
        unstarted: Harness) -> None:
    import asyncio
    h = unstarted
    asked: list[str] = []

    async def authorizer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from tests.support.tools import read_post_body
        doc = json.loads(await read_post_body(reader))
        path = doc["request"]["path"]
        asked.append(path)
        answer = json.dumps({"allow": path.startswith("/r/read"), "ttl": 60}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()
    port = h.serve(authorizer)
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[{"path_prefix": "/r", "upstream": echo, "authorizer": {
        "url": f"http://127.0.0.1:{port}/authorize"}}]))
    assert h.get("/r/read")[0] == 200
    assert h.get("/r/read/../admin")[0] == 403
    assert h.get("/r/read/%2e%2e/admin")[0] == 403
    assert h.get("/r/read")[0] == 200  # cached: not asked again
    assert asked == ["/r/read", "/r/admin"]


def test_naming_host_in_connection_cannot_change_the_host_the_upstream_sees(
        unstarted: Harness) -> None:
    h = unstarted
    http1_only(h, "Connection is a malformed field in HTTP/2")
    h.start()
    out = h.raw(b"GET / HTTP/1.1\r\nHost: api.example.test\r\n"
                b"Connection: close, host, x-forwarded-for\r\nX-Forwarded-For: 10.6.6.6\r\n\r\n")
    seen = headers_of(out.split(b"\r\n\r\n", 1)[1])
    assert seen["host"] == ["api.example.test"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


def test_the_authorizer_never_sees_forged_identity_nor_sets_folded_proxy_headers(
        unstarted: Harness) -> None:
    import asyncio
    h = unstarted
    documents: list[dict[str, Any]] = []

    async def authorizer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from tests.support.tools import read_post_body
        documents.append(json.loads(await read_post_body(reader)))
        answer = json.dumps({"allow": True, "ttl": 0, "headers": {
            "X_Forwarded_For": "10.6.6.6", "x_client_cert_subject": FORGED,
            "Forwarded": "for=10.6.6.6", "X-Tenant": "acme"}}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()
    port = h.serve(authorizer)
    h.start(h.config(top={"headers_with_underscores": "allow"},
                     routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:"
                                                              f"{h.start_echo()}",
                              "authorizer": {"url": f"http://127.0.0.1:{port}/a",
                                             "forward_headers": ["x-client-cert-subject",
                                                                 "ssl-client-s-dn",
                                                                 "x-tenant"]}}]))
    status, _, body = h.get("/", headers={"X-Client-Cert-Subject": FORGED,
                                          "SSL_Client_S_DN": FORGED, "X-Tenant": "t"})
    assert status == 200
    assert documents[0]["request"]["headers"] == {"x-tenant": "t"}
    seen = headers_of(body)
    assert seen["x-forwarded-for"] == ["127.0.0.1"] and "forwarded" not in seen
    assert seen["x-tenant"] == ["acme"]
    assert not [n for n, vs in seen.items() if any(FORGED in v for v in vs)], seen


# -- 3. a client-sent intermediate outside the truststore --------------------------------------

def test_a_client_of_a_sub_ca_it_sends_itself_never_reaches_the_upstream(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    from tests.integration.test_client_intermediates import sub_ca_client
    h = unstarted
    start(h, wsgi)
    out = raw_get(h, b"/", ctx=h.client_context(sub_ca_client(h.pki), name="sub-ca-client"))
    assert out.startswith(b"HTTP/1.1 403 ") and b'"reason":"untrusted"' in out, out[:120]
    assert wsgi.environs == []


# -- 5. PROXY protocol from anyone -------------------------------------------------------------

def test_a_proxy_header_from_an_untrusted_peer_never_reaches_the_upstream(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    import socket
    h = unstarted
    start(h, wsgi, proxy_protocol={"trusted_sources": ["10.0.0.0/8"]})
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
        try:
            s.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 51000 443\r\n")
            out = s.recv(65536)  # closed at accept: no TLS byte comes back
        except ConnectionError:
            out = b""
    assert out == b"" and wsgi.environs == []
    assert h.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                    reason="protocol") == 1



def test_headers_that_rewrite_the_path_or_method_never_reach_the_upstream(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    start(h, wsgi)
    status, body = get(h, "/public", headers={
        "X-Original-URL": "/pay", "X-Rewrite-URL": "/pay", "X_Original_URL": "/pay",
        "X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE",
        "X-Method-Override": "DELETE"})
    assert status == 200
    assert not [k for k, v in body["environ"].items() if v in ("/pay", "DELETE")]
    assert h.metric("mtlsproxy_headers_dropped_total", listener="public",
                    reason="override") == 5  # and one underscore drop


def test_a_proxy_v1_address_cannot_inject_header_lines(unstarted: Harness,
                                                       wsgi: WSGIUpstream) -> None:
    import socket
    h = unstarted
    start(h, wsgi, proxy_protocol={"trusted_sources": ["127.0.0.0/8"]})
    # ipaddress takes an IPv6 scope id of any bytes; str() keeps them.
    header = (b"PROXY TCP6 fe80::1%\nClient-Cert::Zm9yZ2Vk:\nX-Client-Cert-Subject:CN=admin"
              b" ::1 1234 443\r\n")
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
        s.sendall(header)
        try:
            out = s.recv(65536)
        except ConnectionError:
            out = b""
    assert b"admin" not in out and wsgi.environs == []
    assert h.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                    reason="protocol") == 1


@pytest.mark.parametrize("host", [
    b"x@admin.example.test", b"admin%2eexample.test", b"admin.example.test?",
    b"admin.example.test#", b"admin.example.test,x", b"x,admin.example.test",
    b"admin.example.test;x", b"admin.example.test\\x",
])
def test_host_spellings_that_parsers_read_as_another_host_get_400(
        unstarted: Harness, host: bytes) -> None:
    h = unstarted
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[
        {"path_prefix": "/", "upstream": echo},
        {"path_prefix": "/", "host": "admin.example.test", "upstream": echo,
         "allow": [{"fingerprint_sha256": NOBODY}]}]))
    out = raw_get(h, b"/", host=host)
    assert out.startswith(b"HTTP/1.1 400 "), (host, out[:100])
    if h.protocol == "h2":
        return  # an HTTP/2 :path is origin-form: the rest is HTTP/1.1's absolute form
    # As an absolute-form authority: refused, or cut where a URL parser cuts it ("?")
    # and routed to the host route, whose rules refuse this client.
    out = h.raw(b"GET http://" + host + b"/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 403 ")), (host, out[:100])


@pytest.mark.parametrize("authority", [b"admin.example.test..", b".admin.example.test",
                                       b"admin..example.test", b":443"])
def test_an_http10_absolute_form_authority_is_checked_like_a_host_without_one(
        unstarted: Harness, authority: bytes) -> None:
    """HTTP/1.0 may come without a Host: the authority is then the Host forwarded, and it
    gets the Host's checks (an attacker's run found ``admin.example.test..`` forwarded)."""
    h = unstarted
    http1_only(h, "absolute-form targets and HTTP/1.0")
    h.start(h.config())
    out = h.raw(b"GET https://" + authority + b"/ HTTP/1.0\r\n\r\n")
    # The proxy's own 400 (its JSON reason), not the upstream's answer to that Host.
    assert out.startswith(b"HTTP/1.1 400 ") and b'"reason":"bad_request"' in out, (
        authority, out[:200])


def test_case_and_leading_slashes_meet_the_rules_of_the_route_they_spell(
        unstarted: Harness, wsgi: WSGIUpstream) -> None:
    h = unstarted
    up = f"http://127.0.0.1:{wsgi.port}"
    start(h, wsgi, merge_slashes=False,
          routes=[{"path_prefix": "/", "upstream": up},
                  {"path_prefix": "/pay", "upstream": up,
                   "allow": [{"fingerprint_sha256": NOBODY}]}])
    for target in (b"/PAY", b"/Pay/x", b"/pAy;v=1", b"//pay", b"/x/..//pay"):
        assert raw_get(h, target).startswith(b"HTTP/1.1 403 "), target
    assert wsgi.environs == []
    # "//x/pay" is the host "x" to a URL parser; here it is the path /x/pay.
    out = raw_get(h, b"//x/pay")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["environ"]["PATH_INFO"] == "/x/pay"


def test_an_authorizer_answer_is_not_reused_for_another_host_or_forwarded_header(
        unstarted: Harness) -> None:
    import asyncio
    h = unstarted
    asked: list[tuple[str, dict[str, str]]] = []

    async def authorizer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from tests.support.tools import read_post_body
        doc = json.loads(await read_post_body(reader))["request"]
        asked.append((doc["host"], doc["headers"]))
        allow = doc["headers"].get("x-tenant") == "acme" and doc["host"].startswith("public")
        answer = json.dumps({"allow": allow, "ttl": 60}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()
    port = h.serve(authorizer)
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[{"path_prefix": "/r", "upstream": echo, "authorizer": {
        "url": f"http://127.0.0.1:{port}/a", "forward_headers": ["x-tenant"]}}]))

    def status(host: str, tenant: str) -> int:
        out = raw_get(h, b"/r/data", b"X-Tenant: " + tenant.encode() + b"\r\n",
                      host=host.encode())
        return int(out[9:12])
    assert status("public.example.test", "acme") == 200
    assert status("public.example.test", "evil") == 403
    assert status("admin.example.test", "acme") == 403
    assert status("public.example.test", "acme") == 200  # cached
    assert len(asked) == 3


def test_a_policy_statement_meets_encoded_slashes_as_routes_do(unstarted: Harness) -> None:
    import asyncio
    h = unstarted

    async def authorizer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from tests.support.tools import read_post_body
        await read_post_body(reader)
        answer = json.dumps({"allow": [{"path_prefix": "/r/read", "methods": ["GET"]}],
                             "ttl": 60}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(answer), answer))
        await writer.drain()
        writer.close()
    port = h.serve(authorizer)
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(escaped_slashes="keep", routes=[
        {"path_prefix": "/r", "upstream": echo,
         "authorizer": {"url": f"http://127.0.0.1:{port}/a"}}]))
    assert raw_get(h, b"/r/read/x").startswith(b"HTTP/1.1 200 ")
    for target in (b"/r/read/x%2F..%2F..%2Fadmin", b"/r/read/x\\..\\..\\admin",
                   b"/r/read;x/..%2f..%2fadmin"):
        # Refused by the policy, or (read as /admin) by having no route at all.
        assert raw_get(h, target).startswith((b"HTTP/1.1 403 ", b"HTTP/1.1 404 ")), target
    assert raw_get(h, b"/R/READ/y").startswith(b"HTTP/1.1 200 ")
