"""examples/: the Starlette and the Flask app, each served for real on loopback behind the
real proxy. Through the proxy they see the client's certificate; a caller that goes around
the proxy, forges the headers or sends malformed ones gets no identity, or a refusal."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from werkzeug.serving import make_server

from tests.support.harness import Harness
from tests.support.pki import PKI, make_cert

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import each other as scripts do

import flask_mtls  # noqa: E402
import starlette_mtls  # noqa: E402

APPS = ["starlette", "flask"]
# The test client's certificate (tests/support/pki.py), as the apps must report it.
GOOD_CLIENT = {"subject": "CN=good-client,O=mtlsproxy tests",
               "san_dns": ["client.example.test"],
               "san_uri": ["spiffe://prod.example.test/ns/payments/sa/api"]}


@contextlib.contextmanager
def serving(kind: str, trusted_peers: frozenset[str] | None = None,
            unix_path: str | None = None) -> Iterator[int]:
    """The example app ``kind`` served on 127.0.0.1 (its port) or on ``unix_path`` (0),
    trusting its default peers or ``trusted_peers``."""
    if kind == "starlette":
        app: Any = starlette_mtls.app
        if trusted_peers is not None:
            app = Starlette(routes=app.routes, middleware=[Middleware(
                starlette_mtls.ClientCertMiddleware, trusted_peers=trusted_peers)])
        # proxy_headers=False, as starlette_mtls.py says to run it.
        server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=0, uds=unix_path, proxy_headers=False,
            loop="asyncio", ws="none", lifespan="off", log_level="warning"))
        thread = threading.Thread(target=server.run)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        try:
            yield 0 if unix_path else int(server.servers[0].sockets[0].getsockname()[1])
        finally:
            server.should_exit = True
            thread.join(10)
    else:
        wsgi: Any = flask_mtls.app
        if trusted_peers is not None:  # the example's middleware around the bare Flask app
            wsgi = flask_mtls.ClientCertMiddleware(flask_mtls.app.wsgi_app.app, trusted_peers)
        httpd = make_server(f"unix://{unix_path}" if unix_path else "127.0.0.1", 0, wsgi,
                            threaded=True)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield 0 if unix_path else httpd.port
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(10)


@pytest.fixture(params=APPS)
def app_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """An example app on 127.0.0.1, with its default trusted peers (loopback)."""
    with serving(str(request.param)) as port:
        yield port


@pytest.fixture
def behind_proxy(harness_for: Callable[[str], Harness]) -> Callable[..., Harness]:
    """The real proxy in front of ``upstream``, forwarding ``families`` (its default
    when None). One event loop kind: these tests are about the apps, not the loop."""
    def start(upstream: str, families: list[str] | None = None) -> Harness:
        h = harness_for("uvloop")
        mutual_tls: dict[str, Any] = {"truststore_uri": str(h.pki.truststore)}
        if families is not None:
            mutual_tls["forward_client_cert"] = families
        h.start(h.config(routes=[{"path_prefix": "/", "upstream": upstream}],
                         mutual_tls=mutual_tls))
        return h
    return start


def direct(port: int, headers: list[tuple[str, str]], source: str = "127.0.0.1"
           ) -> tuple[int, bytes]:
    """GET /whoami straight to the app from ``source``, each header on its own line."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.putrequest("GET", "/whoami")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def expected_identity(pki: PKI) -> dict[str, Any]:
    return {**GOOD_CLIENT, "fingerprint_sha256": hashlib.sha256(pki.client.der).hexdigest()}


def client_cert(der: bytes) -> str:
    return ":" + base64.b64encode(der).decode() + ":"


@pytest.fixture(scope="module")
def forged(pki: PKI) -> list[tuple[str, str]]:
    """Well-formed headers naming a certificate the caller does not hold: CN=admin,
    issued by the CA the proxy trusts."""
    der = make_cert("admin", pki.inter).der
    xfcc = f'Hash={hashlib.sha256(der).hexdigest()};Subject="CN=admin,O=mtlsproxy tests"'
    return [("Client-Cert", client_cert(der)), ("X-Forwarded-Client-Cert", xfcc)]


# -- through the proxy -------------------------------------------------------------------

@pytest.mark.parametrize("families", [None, ["rfc9440"], ["xfcc"]],
                         ids=["default-families", "client-cert-only", "xfcc-only"])
def test_the_app_sees_the_clients_subject_sans_and_fingerprint_through_the_proxy(
        app_port: int, behind_proxy: Callable[..., Harness], pki: PKI,
        families: list[str] | None) -> None:
    h = behind_proxy(f"http://127.0.0.1:{app_port}", families)
    status, _, body = h.get("/whoami")
    assert status == 200, body
    assert json.loads(body) == expected_identity(pki)


def test_certificate_headers_a_client_sends_never_reach_the_app(
        app_port: int, behind_proxy: Callable[..., Harness], pki: PKI,
        forged: list[tuple[str, str]]) -> None:
    h = behind_proxy(f"http://127.0.0.1:{app_port}")
    status, _, body = h.get("/whoami", headers={**dict(forged), "Client_Cert": forged[0][1]})
    assert status == 200, body
    assert json.loads(body) == expected_identity(pki)


def test_without_a_certificate_header_the_app_answers_401(
        app_port: int, behind_proxy: Callable[..., Harness]) -> None:
    h = behind_proxy(f"http://127.0.0.1:{app_port}", ["details"])  # neither header family
    status, _, body = h.get("/whoami")
    assert status == 401, body


@pytest.mark.parametrize("kind", APPS)
@pytest.mark.parametrize("trusted", [True, False], ids=["unix-trusted", "unix-not-trusted"])
def test_over_a_unix_socket_the_app_believes_the_proxy_only_when_told_to_trust_it(
        kind: str, trusted: bool, behind_proxy: Callable[..., Harness], pki: PKI) -> None:
    directory = tempfile.mkdtemp(prefix="mtls-ex-")  # short: a socket path has 107 bytes
    path = f"{directory}/app.sock"
    try:
        with serving(kind, frozenset({"unix"}) if trusted else None, unix_path=path):
            status, _, body = behind_proxy(f"unix:{path}").get("/whoami")
    finally:
        shutil.rmtree(directory)
    if trusted:
        assert (status, json.loads(body)) == (200, expected_identity(pki))
    else:
        assert status == 401, body


# -- around the proxy --------------------------------------------------------------------

def test_a_request_from_a_peer_the_app_does_not_trust_gets_no_identity(
        app_port: int, forged: list[tuple[str, str]]) -> None:
    status, body = direct(app_port, forged, source="127.0.0.2")  # loopback, not the proxy's
    assert status == 401, body


def test_a_request_from_the_proxys_address_without_headers_gets_no_identity(
        app_port: int) -> None:
    status, body = direct(app_port, [])
    assert status == 401, body


def test_quoted_xfcc_values_keep_their_commas_semicolons_and_quotes(app_port: int) -> None:
    hash_ = "ab" * 32
    xfcc = (f'Hash={hash_};Subject="CN=a\\"b\\\\c,O=x;y=z";URI=spiffe://t.test/a;'
            'DNS=a.test;DNS="b.test,c.test"')
    status, body = direct(app_port, [("X-Forwarded-Client-Cert", xfcc)])
    assert status == 200, body
    assert json.loads(body) == {"subject": 'CN=a"b\\c,O=x;y=z', "fingerprint_sha256": hash_,
                                "san_dns": ["a.test", "b.test,c.test"],
                                "san_uri": ["spiffe://t.test/a"]}


def malformed_cases() -> list[Any]:
    hash_ = "ab" * 32
    other = "cd" * 32
    not_der = ":" + base64.b64encode(b"not a certificate").decode() + ":"
    cases = {
        "client-cert-without-colons": [("Client-Cert", "MIIB")],
        "client-cert-bad-base64": [("Client-Cert", ":MII*B:")],
        "client-cert-bad-padding": [("Client-Cert", ":MIIBx:")],
        "client-cert-not-der": [("Client-Cert", not_der)],
        "client-cert-empty": [("Client-Cert", "::")],
        "client-cert-a-list": [("Client-Cert", f"{not_der}, {not_der}")],
        "client-cert-with-parameters": [("Client-Cert", "GOOD_CLIENT_CERT;x=1")],
        "client-cert-twice": [("Client-Cert", "GOOD_CLIENT_CERT")] * 2,
        "xfcc-two-elements": [("X-Forwarded-Client-Cert", f"Hash={hash_},Hash={other}")],
        "xfcc-twice": [("X-Forwarded-Client-Cert", f"Hash={hash_}")] * 2,
        "xfcc-without-hash": [("X-Forwarded-Client-Cert", 'Subject="CN=admin"')],
        "xfcc-two-hashes": [("X-Forwarded-Client-Cert", f"Hash={hash_};Hash={other}")],
        "xfcc-hash-not-sha256": [("X-Forwarded-Client-Cert", "Hash=admin")],
        "xfcc-unknown-key": [("X-Forwarded-Client-Cert", f"Hash={hash_};Role=admin")],
        "xfcc-unterminated-quote": [("X-Forwarded-Client-Cert", f'Hash={hash_};Subject="CN=a')],
        "xfcc-bad-escape": [("X-Forwarded-Client-Cert", f'Hash={hash_};Subject="CN=\\a"')],
        "xfcc-trailing-semicolon": [("X-Forwarded-Client-Cert", f"Hash={hash_};")],
        "xfcc-stray-quote": [("X-Forwarded-Client-Cert", f'Hash={hash_};Subject=CN"a')],
        "headers-disagree": [("Client-Cert", "GOOD_CLIENT_CERT"),
                             ("X-Forwarded-Client-Cert", f"Hash={hash_}")],
    }
    return [pytest.param(headers, id=name) for name, headers in cases.items()]


@pytest.mark.parametrize("headers", malformed_cases())
def test_a_malformed_certificate_header_from_the_proxys_address_is_refused_with_400(
        app_port: int, headers: list[tuple[str, str]], pki: PKI) -> None:
    """Refused, not guessed at: the proxy never sends these, so something is wrong."""
    good = client_cert(pki.client.der)
    status, body = direct(app_port, [(n, v.replace("GOOD_CLIENT_CERT", good))
                                     for n, v in headers])
    assert status == 400, body


def test_the_examples_are_clean_under_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict",
                          *sorted(str(p) for p in EXAMPLES.glob("*.py"))],
                         capture_output=True, text=True, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
