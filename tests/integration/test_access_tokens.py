"""Certificate-bound access tokens through the real proxy (issue 27, item 1:
``routes[].access_token``): tokens signed by a test issuer (keys made here), the JWKS
served over loopback https and from a file, bound (RFC 8705) to the client's certificate
or to another, on HTTP/1.1 (both parsers), HTTP/2, gRPC and a WebSocket upgrade."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.test_truststore_reload import Moto, moto  # noqa: F401 (fixture)
from tests.support.harness import Harness
from tests.support.pki import make_cert
from tests.support.tools import wait_for

ISSUER = "https://issuer.example.test"
AUDIENCE = "orders-api"


def thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class Issuer:
    """Signing keys by kid, and their JWKS (public parts)."""

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.published: list[str] = []
        self.add("k1")

    def add(self, kid: str, publish: bool = True) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        if publish:
            self.published.append(kid)

    def jwks(self) -> bytes:
        keys = []
        for kid in self.published:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})
        return json.dumps({"keys": keys}).encode()

    def token(self, kid: str = "k1", bound_to: bytes | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-orders",
                                "iat": now, "exp": now + 300, "scope": "orders:read"}
        if bound_to is not None:
            body["cnf"] = {"x5t#S256": thumbprint(bound_to)}
        body.update(claims)
        return jwt.encode(body, self.keys[kid], algorithm="ES256", headers={"kid": kid})


def localhost_context(h: Harness) -> ssl.SSLContext:
    """A server context with the test PKI's localhost certificate (the root verifies it)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(h.pki.server_cert), str(h.pki.server_key))
    return ctx


class JwksServer:
    """The issuer's JWKS over https on loopback (the test PKI's localhost certificate),
    counting fetches."""

    def __init__(self, h: Harness, issuer: Issuer) -> None:
        self.issuer = issuer
        self.fetches = 0
        self.lock = threading.Lock()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                with self.lock:
                    self.fetches += 1
                body = self.issuer.jwks()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self.port = h.serve(handle, tls=localhost_context(h))

    def uri(self) -> str:
        return f"https://localhost:{self.port}/.well-known/jwks.json"


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


def token_route(h: Harness, jwks: str, **token: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"jwks_uri": jwks, "issuer": ISSUER,
                                "audiences": [AUDIENCE],
                                "claims_to_headers": {"sub": "X-Token-Subject"}}
    if jwks.startswith("https://"):
        settings["jwks_ca_file"] = str(h.pki.directory / "root.pem")
    settings.update(token)
    return {"path_prefix": "/", "upstream": f"http://127.0.0.1:{h.start_echo()}",
            "access_token": settings}


def start_file(h: Harness, issuer: Issuer, tmp: Path, parser: str | None = None,
               **token: Any) -> None:
    jwks = tmp / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    h.start(h.config(routes=[token_route(h, str(jwks), **token)]), parser=parser)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tokens(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_access_tokens_total", listener="public", route="/",
                    result=result)


def refused(h: Harness, headers: dict[str, str], status: int = 401
            ) -> tuple[dict[str, str], dict[str, Any]]:
    got, response_headers, body = h.get("/orders/1", headers=headers)
    assert got == status, body
    answer = json.loads(body)
    assert "headers" not in answer  # ours, not the echo upstream's: it never got there
    return response_headers, answer


# -- HTTP/1.1 --------------------------------------------------------------------------------

def test_a_token_bound_to_the_clients_certificate_is_admitted_with_its_claims(
        unstarted: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(unstarted, issuer, tmp_path)
    token = issuer.token(bound_to=unstarted.pki.client.der)
    # A client's own X-Token-Subject (any spelling) is dropped: only the proxy sets it.
    status, _, body = unstarted.get("/orders/1", headers={
        **bearer(token), "X-Token-Subject": "admin", "x_token_subject": "admin"})
    assert status == 200, body
    headers = json.loads(body)["headers"]
    assert [v for n, v in headers if n == "x-token-subject"] == ["svc-orders"]
    assert not any(n.replace("_", "-") == "x-token-subject" and v == "admin"
                   for n, v in headers)
    assert tokens(unstarted, "valid") == 1
    # Verified once, then from the cache until exp: the same again is admitted.
    assert unstarted.get("/orders/1", headers=bearer(token))[0] == 200
    assert tokens(unstarted, "valid") == 2


def test_a_token_bound_to_another_certificate_is_401_invalid_token(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path)
    other = make_cert("other-client", harness.pki.inter)
    headers, answer = refused(harness, bearer(issuer.token(bound_to=other.der)))
    assert answer["reason"] == "binding_mismatch"
    assert headers["www-authenticate"].startswith('Bearer realm="mtlsproxy", '
                                                  'error="invalid_token"')
    assert tokens(harness, "binding_mismatch") == 1


def test_the_same_token_is_refused_to_another_client_after_being_admitted(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    # The cache is per (token, certificate): a stolen token replayed from another client
    # the truststore admits is still refused.
    start_file(harness, issuer, tmp_path)
    token = issuer.token(bound_to=harness.pki.client.der)
    assert harness.get("/", headers=bearer(token))[0] == 200
    other = make_cert("other-client", harness.pki.inter)
    status, _, body = harness.get("/", harness.client_context(other, name="other"),
                                  headers=bearer(token))
    assert status == 401 and json.loads(body)["reason"] == "binding_mismatch"


def test_an_unbound_token_is_401_when_binding_is_required(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path)
    _, answer = refused(harness, bearer(issuer.token()))
    assert answer["reason"] == "unbound"
    assert tokens(harness, "unbound") == 1


def test_an_unbound_token_passes_when_binding_is_not_required(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path, require_binding=False)
    assert harness.get("/", headers=bearer(issuer.token()))[0] == 200


def test_an_expired_token_is_401(harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path)
    past = int(time.time()) - 3600
    _, answer = refused(harness, bearer(issuer.token(bound_to=harness.pki.client.der,
                                                     exp=past, iat=past - 60)))
    assert answer["reason"] == "expired"
    assert tokens(harness, "expired") == 1


@pytest.mark.parametrize("claims, result", [
    ({"aud": "another-api"}, "wrong_audience"),
    ({"iss": ISSUER + ".evil"}, "wrong_issuer"),
    ({"scope": "orders:write"}, "insufficient_scope"),
])
def test_claims_the_route_does_not_accept_are_refused(
        harness: Harness, issuer: Issuer, tmp_path: Path, claims: dict[str, Any],
        result: str) -> None:
    start_file(harness, issuer, tmp_path, scopes=["orders:read"])
    status = 403 if result == "insufficient_scope" else 401
    headers, answer = refused(harness, bearer(issuer.token(
        bound_to=harness.pki.client.der, **claims)), status)
    assert answer["reason"] == result
    error = "insufficient_scope" if status == 403 else "invalid_token"
    assert f'error="{error}"' in headers["www-authenticate"]
    assert tokens(harness, result) == 1


def test_the_none_algorithm_is_refused(harness: Harness, issuer: Issuer,
                                       tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300,
              "cnf": {"x5t#S256": thumbprint(harness.pki.client.der)}}

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    for alg in ("none", "None", "NONE"):
        unsigned = f"{b64({'alg': alg, 'typ': 'JWT', 'kid': 'k1'})}.{b64(claims)}."
        _, answer = refused(harness, bearer(unsigned))
        assert answer["reason"] == "bad_signature"
    # A token signed with a key the JWKS does not hold, under a published kid.
    forger = Issuer()
    _, answer = refused(harness, bearer(forger.token(bound_to=harness.pki.client.der)))
    assert answer["reason"] == "bad_signature"


def test_a_missing_token_is_401_with_a_bare_challenge_unless_optional(
        unstarted: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(unstarted, issuer, tmp_path)
    for sent in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        headers, answer = refused(unstarted, sent)
        assert answer["reason"] == "missing"
        # RFC 6750 section 3.1: no error code when the request carried no token.
        assert headers["www-authenticate"] == 'Bearer realm="mtlsproxy"'
    assert tokens(unstarted, "missing") == 2


def test_an_optional_token_admits_a_request_without_one_but_not_a_bad_one(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path, required=False)
    status, _, body = harness.get("/", headers={"X-Token-Subject": "admin"})
    assert status == 200
    assert not any(n == "x-token-subject" for n, _ in json.loads(body)["headers"])
    _, answer = refused(harness, bearer(issuer.token()))
    assert answer["reason"] == "unbound"


@pytest.mark.parametrize("value", [
    "Bearer", "Bearer ", "Bearer a b", "Bearer \tabc", "Bearer abc,def",
])
def test_malformed_bearer_credentials_are_401(harness: Harness, issuer: Issuer,
                                              tmp_path: Path, value: str) -> None:
    start_file(harness, issuer, tmp_path)
    status, _, body = harness.get("/", headers={"Authorization": value})
    assert status in (400, 401), body
    if status == 401:
        assert json.loads(body)["reason"] in ("bad_signature", "missing")


# -- the JWKS over https: refresh on an unknown kid, once per min_refresh ---------------------

def test_an_unknown_kid_triggers_one_jwks_refresh(harness: Harness, issuer: Issuer) -> None:
    server = JwksServer(harness, issuer)
    harness.start(harness.config(routes=[token_route(harness, server.uri())]))
    der = harness.pki.client.der
    assert harness.get("/", headers=bearer(issuer.token(bound_to=der)))[0] == 200
    assert server.fetches == 1
    issuer.add("k2")  # rotated in at the issuer
    assert harness.get("/", headers=bearer(issuer.token("k2", bound_to=der)))[0] == 200
    assert server.fetches == 2
    # Another unknown kid within min_refresh: no fetch, refused.
    issuer.add("k3")
    _, answer = refused(harness, bearer(issuer.token("k3", bound_to=der)))
    assert answer["reason"] == "bad_signature"
    assert server.fetches == 2
    # Known keys keep working without fetching.
    assert harness.get("/", headers=bearer(issuer.token("k2", bound_to=der)))[0] == 200
    assert server.fetches == 2


def test_an_https_jwks_that_redirects_is_not_followed(harness: Harness,
                                                      issuer: Issuer) -> None:
    # A redirect (here to plain http, where keys could be replaced on the way) is a failed
    # fetch: the configured URL is the only source of keys.
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:9/jwks\r\n"
                         b"content-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
    port = harness.serve(redirect, tls=localhost_context(harness))
    harness.start(harness.config(routes=[token_route(
        harness, f"https://localhost:{port}/jwks.json")]))
    status, _, body = harness.get("/", headers=bearer(issuer.token(
        bound_to=harness.pki.client.der)))
    assert status == 503 and json.loads(body)["reason"] == "jwks_unavailable"


def test_a_key_removed_from_the_jwks_stops_admitting_its_cached_tokens(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path, min_refresh=0.01)
    der = harness.pki.client.der
    token = issuer.token(bound_to=der)
    assert harness.get("/", headers=bearer(token))[0] == 200  # verified, and remembered
    issuer.published = ["k2"]
    issuer.add("k2")
    (tmp_path / "jwks.json").write_bytes(issuer.jwks())
    time.sleep(0.05)
    # A token of the new key makes the proxy read the set again: k1 is gone.
    assert harness.get("/", headers=bearer(issuer.token("k2", bound_to=der)))[0] == 200
    _, answer = refused(harness, bearer(token))
    assert answer["reason"] == "bad_signature"


def test_a_token_in_the_query_is_refused_and_not_logged(
        unstarted: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(unstarted, issuer, tmp_path, required=False)
    token = issuer.token(bound_to=unstarted.pki.client.der)
    status, _, body = unstarted.get(f"/orders?x=1&access_token={token}")
    assert status == 401 and json.loads(body)["reason"] == "bad_signature"
    wait_for(lambda: bool(unstarted.access_lines))
    assert token not in unstarted.access_lines[-1]
    assert "access_token=REDACTED" in unstarted.access_lines[-1]


def test_a_bearer_token_after_a_tab_is_checked_even_when_optional(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path, required=False)
    forged = Issuer().token(bound_to=harness.pki.client.der)
    conn = harness.https()
    try:
        conn.putrequest("GET", "/orders")
        conn.putheader("Authorization", f"Bearer\t{forged}")
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 401 and json.loads(r.read())["reason"] == "bad_signature"
    finally:
        conn.close()


def test_the_jwks_can_come_from_s3(harness: Harness, issuer: Issuer,
                                   moto: Moto) -> None:  # noqa: F811 (the fixture)
    # moto's S3 server on loopback, boto3 unpatched (AWS_ENDPOINT_URL, as the truststore).
    s3 = moto.client()
    s3.create_bucket(Bucket="keys")
    s3.put_object(Bucket="keys", Key="jwks.json", Body=issuer.jwks())
    harness.start(harness.config(routes=[token_route(harness, "s3://keys/jwks.json")]))
    der = harness.pki.client.der
    assert harness.get("/", headers=bearer(issuer.token(bound_to=der)))[0] == 200
    issuer.add("k2")
    s3.put_object(Bucket="keys", Key="jwks.json", Body=issuer.jwks())
    assert harness.get("/", headers=bearer(issuer.token("k2", bound_to=der)))[0] == 200


def test_no_jwks_at_all_is_503_jwks_unavailable(harness: Harness, issuer: Issuer) -> None:
    closed = harness.serve(lambda r, w: asyncio.sleep(0))  # a port, then closed
    for s in harness.servers:
        s.close()
    harness.start(harness.config(routes=[token_route(
        harness, f"https://localhost:{closed}/jwks.json", timeout=2)]))
    status, _, body = harness.get("/", headers=bearer(issuer.token(
        bound_to=harness.pki.client.der)))
    assert status == 503 and json.loads(body)["reason"] == "jwks_unavailable"
    assert tokens(harness, "jwks_unavailable") == 1


def test_a_bad_jwks_file_never_replaces_the_good_keys(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path, min_refresh=0.01)
    der = harness.pki.client.der
    assert harness.get("/", headers=bearer(issuer.token(bound_to=der)))[0] == 200
    (tmp_path / "jwks.json").write_text('{"keys": "not a list"}')
    time.sleep(0.05)
    issuer.add("k9", publish=False)
    # The unknown kid forces a re-read of the broken file; k1 still verifies after it.
    refused(harness, bearer(issuer.token("k9", bound_to=der)))
    assert harness.get("/", headers=bearer(issuer.token(bound_to=der, sub="again")))[0] == 200


# -- HTTP/2, gRPC, WebSocket: the same admission step -------------------------------------

def test_over_http2_a_bound_token_passes_and_another_is_401(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(harness, issuer, tmp_path)
    der = harness.pki.client.der
    status, _, body = harness.h2_request("GET", "/orders/1", list(bearer(
        issuer.token(bound_to=der)).items()))
    assert status == 200
    assert ["x-token-subject", "svc-orders"] in json.loads(body)["headers"]
    other = make_cert("other-client", harness.pki.inter)
    status, headers, body = harness.h2_request("GET", "/orders/1", list(bearer(
        issuer.token(bound_to=other.der)).items()))
    assert status == 401 and json.loads(body)["reason"] == "binding_mismatch"
    assert 'error="invalid_token"' in headers["www-authenticate"]


def test_grpc_calls_get_unauthenticated_and_permission_denied(
        harness: Harness, issuer: Issuer, tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from tests.integration.test_grpc import SERVICE, Recorder
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(rec.unary)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    try:
        harness.start(harness.config(routes=[{
            "path_prefix": "/", "upstream": f"http://127.0.0.1:{port}",
            "upstream_protocol": "h2", "access_token": {
                "jwks_uri": str(jwks), "issuer": ISSUER, "audiences": [AUDIENCE],
                "scopes": ["orders:read"]}}]))
        c, k = harness.pki.client_files()
        creds = grpc.ssl_channel_credentials(
            root_certificates=(harness.pki.directory / "root.pem").read_bytes(),
            private_key=k.read_bytes(), certificate_chain=c.read_bytes())
        with grpc.secure_channel(f"localhost:{harness.port}", creds,
                                 options=[("grpc.enable_http_proxy", 0)]) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Unary")
            der = harness.pki.client.der
            ok = issuer.token(bound_to=der)
            assert call(b"abc", metadata=(("authorization", f"Bearer {ok}"),),
                        timeout=10) == b"cba"
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert info.value.details() == "missing"
            narrow = issuer.token(bound_to=der, scope="orders:write")
            with pytest.raises(grpc.RpcError) as info:
                call(b"x", metadata=(("authorization", f"Bearer {narrow}"),), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert len(rec.metadata) == 1
    finally:
        server.stop(None).wait(5)


def test_a_websocket_upgrade_needs_the_token_too(
        unstarted: Harness, issuer: Issuer, tmp_path: Path) -> None:
    start_file(unstarted, issuer, tmp_path)
    upgrade = (b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    answer = unstarted.raw(upgrade, read_timeout=5)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"www-authenticate: bearer" in answer.lower()


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("token, where", [
    ({"algorithms": ["none"]}, "access_token.algorithms[0]"),
    ({"jwks_uri": "http://keys.example.test/jwks"}, "access_token.jwks_uri"),
    ({"claims_to_headers": {"sub": "Client-Cert"}}, "access_token.claims_to_headers.sub"),
    ({"claims_to_headers": {"sub": "Host"}}, "access_token.claims_to_headers.sub"),
    ({"audiences": []}, "access_token.audiences"),
    ({"surprise": 1}, "access_token.surprise"),
    ({"algorithms": []}, "access_token.algorithms"),
    ({"leeway": float("inf")}, "access_token.leeway"),
    ({"min_refresh": float("inf")}, "access_token.min_refresh"),
    ({"claims_to_headers": {"sub": "X-User", "uid": "x-user"}},
     "access_token.claims_to_headers.uid"),
])
def test_config_errors_name_the_key(harness: Harness, issuer: Issuer, tmp_path: Path,
                                    token: dict[str, Any], where: str) -> None:
    from mtlsproxy.config import ConfigError, parse_config
    jwks = tmp_path / "jwks.json"
    jwks.write_bytes(issuer.jwks())
    route = token_route(harness, str(jwks), **token)
    with pytest.raises(ConfigError) as info:
        parse_config(harness.config(routes=[route]), tmp_path)
    assert f"listeners[0].routes[0].{where}" in str(info.value)


def test_tokens_never_reach_the_logs(unstarted: Harness, issuer: Issuer, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    # Every JWT starts with "eyJ" (base64url of '{"'): none in any log line or access record.
    start_file(unstarted, issuer, tmp_path)
    der = unstarted.pki.client.der
    other = make_cert("other-client", unstarted.pki.inter)
    for token in (issuer.token(bound_to=der), issuer.token(bound_to=other.der),
                  issuer.token(), "eyJhbGciOiJub25lIn0.e30."):
        unstarted.get("/", headers=bearer(token))
    wait_for(lambda: len(unstarted.access_lines) >= 4)
    for line in [*unstarted.access_lines, *(r.getMessage() + str(getattr(r, "fields", ""))
                                             for r in caplog.records)]:
        assert "eyJ" not in line


def test_an_empty_access_token_is_a_config_error_not_an_open_route(harness: Harness,
                                                                   tmp_path: Path) -> None:
    from mtlsproxy.config import ConfigError, parse_config
    route = {"path_prefix": "/", "upstream": "http://127.0.0.1:9", "access_token": None}
    with pytest.raises(ConfigError) as info:
        parse_config(harness.config(routes=[route]), tmp_path)
    assert "listeners[0].routes[0].access_token: must be a mapping" in str(info.value)


def test_an_upper_case_https_jwks_uri_is_fetched_over_https(harness: Harness,
                                                            issuer: Issuer) -> None:
    server = JwksServer(harness, issuer)
    harness.start(harness.config(routes=[token_route(
        harness, server.uri().replace("https://", "HTTPS://"),
        jwks_ca_file=str(harness.pki.directory / "root.pem"))]))
    assert harness.get("/", headers=bearer(issuer.token(
        bound_to=harness.pki.client.der)))[0] == 200
