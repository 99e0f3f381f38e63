"""``routes[].authorizer.format: apigateway`` (issue #27): the real proxy, a real authorizer
on loopback answering in the AWS API Gateway policy shape, real client connections. The
event it receives has the gateway's REQUEST shape; its policy is cached per client and
route and evaluated for each later request's method ARN (a Deny wins; no Allow refuses);
its context goes upstream as X-Authorizer-* headers no client can forge."""

from __future__ import annotations

import importlib.util
import json
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsproxy.admission.apigateway import gateway_serial, gateway_time
from mtlsproxy.config import load_config, parse_config
from mtlsproxy.errors import ConfigError
from tests.integration.test_authorizer import FakeAuthorizer
from tests.support.h2client import H2Client
from tests.support.harness import Harness
from tests.support.pki import PKI, make_cert

PREFIX = "arn:aws:execute-api:eu-west-1:123456789012:abcdef123/prod"
GATEWAY_DATE = re.compile(r"^[A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4} GMT$")


def orders_policy(event: dict[str, Any]) -> dict[str, Any]:
    """A gateway authorizer's answer: GET on /orders/* allowed, DELETE on it denied."""
    stem = event["methodArn"].split("/", 2)  # arn...:abcdef123, prod, GET/orders/1
    base = f"{stem[0]}/{stem[1]}"
    cert = event["requestContext"]["identity"]["clientCert"]
    return {
        "principalId": cert["subjectDN"],
        "policyDocument": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "execute-api:Invoke",
             "Resource": f"{base}/GET/orders/*"},
            {"Effect": "Deny", "Action": ["execute-api:Invoke"],
             "Resource": [f"{base}/DELETE/orders/*"]},
        ]},
        "context": {"tenant": "acme", "level": 3, "admin": False},
    }


def start(h: Harness, auth: FakeAuthorizer, top: dict[str, Any] | None = None,
          **authorizer: Any) -> None:
    echo = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(top=top or {}, routes=[{
        "path_prefix": "/", "upstream": echo,
        "authorizer": {"url": auth.url, "format": "apigateway", "arn_prefix": PREFIX,
                       **authorizer}}]))


def calls(h: Harness, result: str) -> float:
    return h.metric("mtlsproxy_authorizer_requests_total", route="/", result=result)


def exchange(conn: Any, method: str, path: str,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn.request(method, path, headers=headers or {})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def upstream_headers(body: dict[str, Any]) -> dict[str, str]:
    """The headers the echo upstream received, by lower-case name."""
    return {name.lower(): value for name, value in body["headers"]}


def test_a_policy_admits_get_then_refuses_delete_on_the_same_connection_with_one_call(
        harness: Harness) -> None:
    auth = FakeAuthorizer(harness, orders_policy)
    # Underscored names allowed through, so that only the X-Authorizer-* rule can stop
    # x_authorizer_foo.
    start(harness, auth, top={"headers_with_underscores": "allow"},
          forward_headers=["x-request-id"])
    conn = harness.https()
    try:
        status, body = exchange(conn, "GET", "/orders/1?x=1&x=2&y=", {
            "X-Request-Id": "r1", "X-Authorizer-Principal": "CN=admin",
            "x_authorizer_foo": "forged", "X-AUTHORIZER-TENANT": "evil"})
        assert status == 200, body
        seen = upstream_headers(body)
        assert seen["x-authorizer-tenant"] == "acme"
        assert seen["x-authorizer-level"] == "3" and seen["x-authorizer-admin"] == "false"
        assert seen["x-authorizer-principalid"].startswith("CN=good-client")
        folded = [name.replace("_", "-") for name, _ in body["headers"]]
        assert "x-authorizer-principal" not in folded and "x-authorizer-foo" not in folded
        assert [v for n, v in body["headers"] if n.lower() == "x-authorizer-tenant"] == \
            ["acme"]

        status, body = exchange(conn, "DELETE", "/orders/1")  # the same client connection
        assert status == 403 and body["reason"] == "unauthorized"
        status, body = exchange(conn, "GET", "/admin")  # no statement covers it
        assert status == 403 and body["reason"] == "unauthorized"
        status, body = exchange(conn, "GET", "/orders/2")  # still within the ttl
        assert status == 200
    finally:
        conn.close()
    assert len(auth.requests) == 1
    assert calls(harness, "allow") == 1 and calls(harness, "deny") == 0
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="unauthorized") == 2


def test_the_authorizer_receives_the_gateways_request_event(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, orders_policy)
    start(harness, auth, forward_headers=["x-request-id"])
    status, _, _ = harness.get("/orders/1?x=1&x=2&y=", headers={"X-Request-Id": "r1",
                                                                "User-Agent": "t/1"})
    assert status == 200
    [event] = auth.requests
    assert event["type"] == "REQUEST"
    assert event["methodArn"] == f"{PREFIX}/GET/orders/1"
    assert event["resource"] == event["path"] == "/orders/1"
    assert event["httpMethod"] == "GET"
    assert event["headers"] == {"x-request-id": "r1"}  # only forward_headers
    assert event["queryStringParameters"] == {"x": "2", "y": ""}  # the last value
    assert event["multiValueQueryStringParameters"] == {"x": ["1", "2"], "y": [""]}
    context = event["requestContext"]
    assert (context["accountId"], context["apiId"], context["stage"]) == \
        ("123456789012", "abcdef123", "prod")
    assert context["httpMethod"] == "GET" and context["resourcePath"] == "/orders/1"
    assert context["protocol"] == "HTTP/1.1"
    assert context["identity"]["userAgent"] == "t/1"
    client = harness.pki.client.cert
    cert = context["identity"]["clientCert"]
    assert cert["clientCertPem"] == ssl.DER_cert_to_PEM_cert(harness.pki.client.der)
    assert cert["subjectDN"] == client.subject.rfc4514_string()
    assert cert["issuerDN"] == client.issuer.rfc4514_string()
    assert cert["serialNumber"] == gateway_serial(format(client.serial_number, "x"))
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2})*", cert["serialNumber"])
    validity = cert["validity"]
    assert GATEWAY_DATE.match(validity["notBefore"]) and GATEWAY_DATE.match(validity["notAfter"])
    assert validity["notBefore"] == gateway_time(client.not_valid_before_utc)
    assert validity["notAfter"] == gateway_time(client.not_valid_after_utc)


def test_the_policy_is_evaluated_over_http2_too(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, orders_policy)
    start(harness, auth)
    client = H2Client(harness.port, harness.client_context())
    try:
        ok = client.get("/orders/7", headers=[("x-authorizer-principal", "CN=admin")])
        assert ok.status == 200, ok.body
        seen = upstream_headers(json.loads(ok.body))
        assert seen["x-authorizer-tenant"] == "acme"
        assert seen["x-authorizer-principalid"].startswith("CN=good-client")
        assert "x-authorizer-principal" not in seen
        refused = client.get("/orders/7", method="DELETE")
        assert refused.status == 403 and json.loads(refused.body)["reason"] == "unauthorized"
    finally:
        client.close()
    assert len(auth.requests) == 1
    assert auth.requests[0]["requestContext"]["protocol"] == "HTTP/2.0"


@pytest.mark.parametrize("answer", [
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": "*",
         "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}]}},
    {"principalId": "p", "policyDocument": {"Statement": [
        {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": "*"}]},
     "context": {"roles": ["admin"]}},
    {"allow": True, "ttl": 60},  # the mtlsproxy format's answer
], ids=["condition", "context-array", "native-answer"])
def test_a_malformed_policy_fails_closed_and_is_never_cached(
        harness: Harness, answer: dict[str, Any]) -> None:
    auth = FakeAuthorizer(harness, answer)
    start(harness, auth)
    for _ in range(2):
        status, _, body = harness.get("/orders/1")
        assert status == 503 and json.loads(body)["reason"] == "authorizer_unavailable"
    assert len(auth.requests) == 2
    assert calls(harness, "error") == 2


def test_ttl_zero_asks_for_every_request(harness: Harness) -> None:
    auth = FakeAuthorizer(harness, orders_policy)
    start(harness, auth, ttl=0)
    for _ in range(2):
        assert harness.get("/orders/1")[0] == 200
    assert len(auth.requests) == 2


def test_x_authorizer_headers_of_a_client_never_go_upstream_on_any_route(
        harness: Harness) -> None:
    harness.start(harness.config(top={"headers_with_underscores": "allow"}))
    status, _, body = harness.get("/", headers={"X-Authorizer-Principal": "CN=admin",
                                                "x_authorizer_foo": "1", "X-Other": "kept"})
    assert status == 200
    names = [n.lower().replace("_", "-") for n, _ in json.loads(body)["headers"]]
    assert "x-other" in names and not [n for n in names if n.startswith("x-authorizer-")]


# -- the configuration --------------------------------------------------------------------

def load_problems(pki: PKI, tmp_path: Path, authorizer: dict[str, Any]) -> list[str]:
    raw = {"listeners": [{
        "name": "public", "address": "127.0.0.1:8443",
        "tls": {"certificates": [{"cert_file": str(pki.server_cert),
                                  "key_file": str(pki.server_key)}]},
        "mutual_tls": {"truststore_uri": str(pki.truststore)},
        "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:8080"},
                   {"path_prefix": "/orders", "upstream": "http://127.0.0.1:8080",
                    "authorizer": {"url": "http://127.0.0.1:9000/", **authorizer}}]}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        config = load_config(path)
    except ConfigError as exc:
        return exc.problems
    auth = config.listeners[0].routes[1].authorizer
    assert auth is not None
    return [f"loaded {auth.format} {auth.arn_prefix} {auth.ttl}"]


WHERE = "listeners[0].routes[1].authorizer"


@pytest.mark.parametrize("authorizer, expected", [
    ({"format": "apigateway", "arn_prefix": PREFIX},
     f"loaded apigateway {PREFIX} 300.0"),
    ({"format": "apigateway", "arn_prefix": PREFIX, "ttl": 0}, f"loaded apigateway {PREFIX} 0.0"),
    ({}, "loaded mtlsproxy  300.0"),
    ({"format": "apigateway"}, f"{WHERE}.arn_prefix: required"),
    ({"format": "apigateway", "arn_prefix": PREFIX + "/"}, f"{WHERE}.arn_prefix: must be"),
    ({"format": "apigateway", "arn_prefix": PREFIX + "/GET"}, f"{WHERE}.arn_prefix: must be"),
    ({"format": "apigateway", "arn_prefix": "arn:aws:execute-api:*:123456789012:a/prod"},
     f"{WHERE}.arn_prefix: must be"),
    ({"format": "apigateway", "arn_prefix": PREFIX, "ttl": -1}, f"{WHERE}.ttl: must be 0"),
    ({"format": "lambda"}, f"{WHERE}.format: must be one of mtlsproxy, apigateway"),
    ({"arn_prefix": PREFIX}, f"{WHERE}.arn_prefix: only with format: apigateway"),
    ({"ttl": 60}, f"{WHERE}.ttl: only with format: apigateway"),
], ids=lambda v: json.dumps(v)[:50])
def test_the_configuration_names_the_key_path(pki: PKI, tmp_path: Path,
                                              authorizer: dict[str, Any],
                                              expected: str) -> None:
    found = load_problems(pki, tmp_path, authorizer)
    assert any(p.startswith(expected) for p in found), found


# -- examples/apigateway-authorizer, behind the real proxy --------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "apigateway-authorizer"


@pytest.fixture
def example_app(monkeypatch: pytest.MonkeyPatch, pki: PKI) -> Iterator[tuple[str, list[str]]]:
    """The example's wrapper and handler on loopback, ORDER_CLIENTS naming the test client:
    (its URL, the methodArn of every call)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))  # app.py imports handler.py as a script does
    spec = importlib.util.spec_from_file_location("apigateway_authorizer_app",
                                                  EXAMPLE / "app.py")
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    monkeypatch.setenv("ORDER_CLIENTS", pki.client.cert.subject.rfc4514_string())
    asked: list[str] = []
    handler = app.lambda_handler

    def counting(event: dict[str, Any], context: object) -> dict[str, Any]:
        asked.append(event["methodArn"])
        return handler(event, context)  # type: ignore[no-any-return]
    monkeypatch.setattr(app, "lambda_handler", counting)
    server = app.make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_example_authorizer_runs_behind_the_proxy(
        harness_for: Any, example_app: tuple[str, list[str]], pki: PKI) -> None:
    url, asked = example_app
    h: Harness = harness_for("uvloop")
    # The example's own route configuration, pointed at this test's servers.
    [route] = yaml.safe_load((EXAMPLE / "mtlsproxy.yaml").read_text())["listeners"][0]["routes"]
    route["authorizer"]["url"] = url
    route["upstream"] = f"http://127.0.0.1:{h.start_echo()}"
    h.start(h.config(routes=[route]))
    conn = h.https()
    try:
        status, body = exchange(conn, "GET", "/orders/1")
        assert status == 200, body
        seen = upstream_headers(body)
        assert seen["x-authorizer-orders"] == "read"
        assert seen["x-authorizer-principalid"] == pki.client.cert.subject.rfc4514_string()
        assert seen["x-authorizer-serial"] == gateway_serial(
            format(pki.client.cert.serial_number, "x"))
        assert exchange(conn, "DELETE", "/orders/1")[0] == 403
        assert exchange(conn, "GET", "/customers")[0] == 403
    finally:
        conn.close()
    assert asked == [f"{PREFIX}/GET/orders/1"]  # one call decided all three
    # A client the handler does not list: its Deny for everything.
    other = h.client_context(make_cert("other-client", pki.inter), name="other")
    assert h.get("/orders/1", ctx=other)[0] == 403
    assert len(asked) == 2


def test_the_example_is_clean_under_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict",
                          *sorted(str(p) for p in EXAMPLE.glob("*.py"))],
                         capture_output=True, text=True, cwd=EXAMPLE.parents[1])
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_docs_example_is_a_valid_config(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "authorizer-apigateway.md"
    example = docs.read_text().split("```yaml", 1)[1].split("```", 1)[0]
    for name in ("server.pem", "server.key", "clients-ca.pem"):  # only checked to exist
        (tmp_path / name).write_text("")
    config = parse_config(yaml.safe_load(example), tmp_path)
    auth = config.listeners[0].routes[0].authorizer
    assert auth is not None and (auth.format, auth.ttl) == ("apigateway", 300.0)
    assert auth.arn_prefix == PREFIX
