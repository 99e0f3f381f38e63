"""Client authentication over real sockets and real TLS, on uvloop and asyncio.

For every rejection reason: what the client sees (a TLS alert, or a 403 with the reason)
AND the metric's reason label.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import time
import warnings

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.harness import Harness
from tests.support.pki import UTC, Cert, make_cert, make_sha1_cert, tamper

FAILURES = "mtlsproxy_tls_handshake_failures_total"


def outcome(h: Harness, ctx: ssl.SSLContext) -> str:
    """'alert: ...' when TLS refused us, else the HTTP response bytes as text."""
    try:
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                data = b""
                while True:
                    chunk = t.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                return data.decode("latin-1")
    except ssl.SSLError as exc:
        return f"alert: {exc}"


def wait_metric(h: Harness, reason: str, timeout: float = 5) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = h.metric(FAILURES, listener="public", reason=reason)
        if value:
            return value
        time.sleep(0.02)
    return 0.0


def test_trusted_client_is_forwarded_and_counted(harness: Harness) -> None:
    harness.start()
    body = harness.echo_json("/hello")
    assert body["path"] == "/hello"
    assert harness.metric("mtlsproxy_tls_handshakes_total", listener="public",
                          resumed="false") == 1


@pytest.mark.parametrize("case, alert, reason", [
    ("expired", "certificate expired", "expired"),
    ("not_yet_valid", "bad certificate", "not_yet_valid"),
    ("untrusted", "unknown ca", "untrusted"),
    ("tampered", "alert", "bad_signature"),
    ("rsa1024", "alert", "weak_algorithm"),
    ("sha1", "alert", "weak_algorithm"),
    ("server_auth_only", "unsupported certificate", "unsupported_purpose"),
])
def test_bad_client_certificate_gets_a_tls_alert(harness: Harness, case: str, alert: str,
                                                 reason: str) -> None:
    pki = harness.pki
    now = dt.datetime.now(UTC)
    cert = {
        "expired": lambda: make_cert("expired", pki.inter, not_before=now - dt.timedelta(days=9),
                                     not_after=now - dt.timedelta(days=1)),
        "not_yet_valid": lambda: make_cert("future", pki.inter,
                                           not_before=now + dt.timedelta(days=1),
                                           not_after=now + dt.timedelta(days=9)),
        "untrusted": lambda: make_cert("stranger", make_cert("Unknown CA", ca=True)),
        "tampered": lambda: tamper(make_cert("tamper-me", pki.inter)),
        "rsa1024": lambda: make_cert("small-rsa", pki.inter,
                                     key=rsa.generate_private_key(65537, 1024)),
        "sha1": lambda: make_sha1_cert("sha1", pki.inter, harness.tmp),
        "server_auth_only": lambda: make_cert("server-eku", pki.inter,
                                              eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
    }[case]()
    harness.start()
    ctx = harness.client_context(cert, name=case)
    result = outcome(harness, ctx)
    assert result.startswith("alert:"), result
    assert alert in result.lower()
    assert wait_metric(harness, reason) == 1
    # The handshake-stage refusal never reached the upstream: no request was counted.
    assert harness.metric("mtlsproxy_requests_total", listener="public", route="/",
                          code="200") == 0


def test_missing_client_certificate_gets_certificate_required(harness: Harness) -> None:
    harness.start()
    result = outcome(harness, harness.client_context(with_cert=False))
    assert result.startswith("alert:") and "certificate required" in result.lower(), result
    assert wait_metric(harness, "no_client_certificate") == 1


def test_missing_client_certificate_on_tls12_fails_the_handshake(harness: Harness) -> None:
    harness.start()
    ctx = harness.client_context(with_cert=False, maximum_version=ssl.TLSVersion.TLSv1_2)
    result = outcome(harness, ctx)
    assert result.startswith("alert:") and "handshake failure" in result.lower(), result
    assert wait_metric(harness, "no_client_certificate") == 1


def _outside_policy(harness: Harness, case: str) -> Cert:
    key = (ec.generate_private_key(ec.SECP521R1()) if case == "p521"
           else ed25519.Ed25519PrivateKey.generate())
    return make_cert(f"{case}-client", harness.pki.inter, key=key)


@pytest.mark.parametrize("case", ["p521", "ed25519"])
def test_key_outside_policy_is_refused_in_the_tls13_handshake(harness: Harness,
                                                               case: str) -> None:
    """The CertificateRequest lists only the schemes the policy accepts (TLS 1.3 schemes
    name their curve): such a client has no scheme for its key and sends no certificate,
    so the handshake fails; its TLS library cannot say why, so the reason is
    no_client_certificate."""
    harness.start()
    ctx = harness.client_context(_outside_policy(harness, case), name=case)
    result = outcome(harness, ctx)
    assert result.startswith("alert:") and "certificate required" in result.lower(), result
    assert wait_metric(harness, "no_client_certificate") == 1


def test_a_p521_key_on_tls12_is_refused_by_the_policy_with_403_weak_algorithm(
        harness: Harness) -> None:
    """TLS 1.2's ECDSA schemes name no curve: the handshake succeeds, the policy refuses."""
    harness.start()
    ctx = harness.client_context(_outside_policy(harness, "p521"), name="p521",
                                 maximum_version=ssl.TLSVersion.TLSv1_2)
    status, _, body = harness.get("/", ctx=ctx)
    assert status == 403
    assert json.loads(body) == {"message": "Forbidden", "reason": "weak_algorithm"}
    assert wait_metric(harness, "weak_algorithm") == 1


def test_policy_keys_still_pass_with_the_restricted_signature_schemes(
        harness: Harness) -> None:
    harness.start()
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        for key in (ec.generate_private_key(ec.SECP384R1()),
                    rsa.generate_private_key(public_exponent=65537, key_size=2048)):
            cert = make_cert("policy-client", harness.pki.inter, key=key)
            ctx = harness.client_context(cert, name="policy", maximum_version=version)
            assert harness.get("/", ctx=ctx)[0] == 200, (version, key)


def use_client_intermediates(h: Harness) -> None:
    """Start the proxy with ``client_intermediates: use``: the chain the client sends
    counts (the truststore holds only inter and root)."""
    h.start(h.config(mutual_tls={"truststore_uri": str(h.pki.truststore),
                                 "client_intermediates": "use"}))


def test_chain_longer_than_max_gets_403_chain_too_long(harness: Harness) -> None:
    pki = harness.pki
    # root -> inter -> i2 -> i3 -> leaf: five certificates, over the default of four.
    i2 = make_cert("Intermediate 2", pki.inter, ca=True)
    i3 = make_cert("Intermediate 3", i2, ca=True)
    leaf = make_cert("deep-client", i3)
    use_client_intermediates(harness)
    status, _, body = harness.get("/", ctx=harness.client_context(leaf, name="deep"))
    assert status == 403
    assert json.loads(body)["reason"] == "chain_too_long"
    assert wait_metric(harness, "chain_too_long") == 1


def test_chain_of_four_is_accepted(harness: Harness) -> None:
    pki = harness.pki
    i2 = make_cert("Intermediate 2", pki.inter, ca=True)
    leaf = make_cert("four-client", i2)
    use_client_intermediates(harness)
    status, _, _ = harness.get("/", ctx=harness.client_context(leaf, name="four"))
    assert status == 200


def test_max_chain_length_is_configurable(harness: Harness) -> None:
    harness.start(harness.config(mutual_tls={"truststore_uri": str(harness.pki.truststore),
                                             "max_chain_length": 2}))
    status, _, body = harness.get("/")
    assert status == 403 and json.loads(body)["reason"] == "chain_too_long"


def test_plain_http_on_the_tls_port_is_a_protocol_failure(harness: Harness) -> None:
    harness.start()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            s.recv(100)
        except ConnectionError:
            pass
    assert wait_metric(harness, "protocol") == 1


def test_silent_client_is_cut_off_by_the_handshake_timeout(harness: Harness) -> None:
    harness.start(harness.config(timeouts={"handshake": 0.3}))
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as s:
        start = time.monotonic()
        try:
            assert s.recv(100) == b""
        except ConnectionError:
            pass
        assert time.monotonic() - start < 4
    assert wait_metric(harness, "timeout") == 1


def test_tls_1_3_policy_refuses_a_tls_1_2_client(harness: Harness) -> None:
    harness.start(harness.config(tls={
        "security_policy": "TLS_1_3",
        "certificates": [{"cert_file": str(harness.pki.server_cert),
                          "key_file": str(harness.pki.server_key)}]}))
    ctx = harness.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    assert outcome(harness, ctx).startswith("alert:")
    assert wait_metric(harness, "protocol") == 1


def test_tls_1_1_client_is_refused(harness: Harness) -> None:
    harness.start()
    ctx = harness.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we mean to be old here
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    assert outcome(harness, ctx).startswith("alert:")
    assert wait_metric(harness, "protocol") == 1


def _resume(h: Harness, ctx: ssl.SSLContext, session: ssl.SSLSession | None
            ) -> tuple[bool, str, ssl.SSLSession | None]:
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost", session=session) as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := t.recv(65536):
                data += chunk
            return t.session_reused, data.decode("latin-1"), t.session


def test_tls13_sessions_resume_and_are_counted(harness: Harness) -> None:
    harness.start()
    ctx = harness.client_context()
    reused, first, session = _resume(harness, ctx, None)
    assert not reused and first.startswith("HTTP/1.1 200")
    reused, second, _ = _resume(harness, ctx, session)
    assert reused and second.startswith("HTTP/1.1 200")
    assert harness.metric("mtlsproxy_tls_handshakes_total", listener="public",
                          resumed="true") == 1
    # The resumed connection found its verdict in the cache (no chain on resumption).
    assert harness.metric("mtlsproxy_client_cert_cache_total", result="hit") >= 1


def test_a_resumed_session_gets_a_fresh_ticket_and_resumes_again(harness: Harness) -> None:
    # Clients that use a ticket once (curl, browsers) need a new one after each resumption
    # to keep resuming; a new ticket gives the session a new id.
    harness.start()
    ctx = harness.client_context()
    _, _, session = _resume(harness, ctx, None)
    ids = [session.id]
    for _ in range(3):
        reused, answer, session = _resume(harness, ctx, session)
        assert reused and answer.startswith("HTTP/1.1 200")
        ids.append(session.id)
    assert len(set(ids)) == 4


def test_resumed_session_of_an_expired_certificate_gets_403_expired(harness: Harness) -> None:
    """OpenSSL accepts the resumption (python-tls-findings.md); the proxy's clock does not."""
    harness.start()
    ctx = harness.client_context()
    _, first, session = _resume(harness, ctx, None)
    assert first.startswith("HTTP/1.1 200")
    harness.clock.advance(dt.timedelta(days=60))  # past the client's not_after
    reused, second, _ = _resume(harness, ctx, session)
    assert reused
    assert second.startswith("HTTP/1.1 403")
    assert '"reason":"expired"' in second
    assert wait_metric(harness, "expired") == 1


def test_keep_alive_connection_is_refused_once_its_certificate_expires(
        harness: Harness) -> None:
    harness.start()
    conn = harness.https()
    conn.request("GET", "/one")
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    harness.clock.advance(dt.timedelta(days=60))
    conn.request("GET", "/two")
    r = conn.getresponse()
    assert r.status == 403 and json.loads(r.read())["reason"] == "expired"
    conn.close()


def test_verdict_is_cached_per_certificate(harness: Harness) -> None:
    harness.start()
    for _ in range(3):
        assert harness.get("/")[0] == 200
    assert harness.metric("mtlsproxy_client_cert_cache_total", result="miss") == 1
    assert harness.metric("mtlsproxy_client_cert_cache_total", result="hit") == 2


def test_mutual_tls_off_serves_plain_tls_without_client_certificates(harness: Harness) -> None:
    harness.start(harness.config(mutual_tls={"truststore_uri": ""}))
    status, _, body = harness.get("/", ctx=harness.client_context(with_cert=False),
                                  headers={"Client-Cert": ":Zm9v:"})
    assert status == 200
    names = [n for n, _ in json.loads(body)["headers"]]
    assert "client-cert" not in names


def test_server_certificate_is_chosen_by_sni_exact_before_wildcard(harness: Harness) -> None:
    pki = harness.pki
    exact = make_cert("exact", pki.inter, eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                      dns=("exact.example.test",))
    wild = make_cert("wild", pki.inter, eku=[ExtendedKeyUsageOID.SERVER_AUTH],
                     dns=("*.example.test",))
    files = [c.write(pki.directory, n) for c, n in ((wild, "wild"), (exact, "exact"))]
    certs = [{"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}]
    certs += [{"cert_file": str(c), "key_file": str(k)} for c, k in files]
    harness.start(harness.config(tls={"certificates": certs}))

    def served_cn(name: str) -> str:
        ctx = harness.client_context()
        ctx.check_hostname = False
        with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname=name) as t:
                der = t.getpeercert(binary_form=True)
        from cryptography import x509
        cert = x509.load_der_x509_certificate(der)
        return cert.subject.rfc4514_string()

    assert "CN=exact" in served_cn("exact.example.test")
    assert "CN=wild" in served_cn("other.example.test")
    assert "CN=exact" not in served_cn("localhost") and "CN=wild" not in served_cn("localhost")


def test_a_swapped_truststore_applies_to_new_connections_and_rechecks_old_ones(
        harness: Harness) -> None:
    from mtlsproxy.server.generation import build_generation
    harness.start()
    kept = harness.https()
    kept.request("GET", "/before")
    r = kept.getresponse()
    assert r.status == 200
    r.read()
    new_ca = make_cert("Rotated CA", ca=True)
    new_client = make_cert("rotated-client", new_ca)
    assert harness.server is not None
    runtime = harness.server.listeners[0]
    generation = build_generation(runtime.config, new_ca.cert_pem())
    harness.loop.call(lambda: runtime.holder.swap(generation))
    # The keep-alive connection was authenticated by a CA that is gone: re-checked, refused.
    kept.request("GET", "/after")
    r = kept.getresponse()
    assert r.status == 403 and json.loads(r.read())["reason"] == "untrusted"
    kept.close()
    # New connections take the new context: the old client is refused in the handshake...
    assert "unknown ca" in outcome(harness, harness.client_context()).lower()
    # ...and a client of the new CA is admitted.
    status, _, _ = harness.get("/", ctx=harness.client_context(new_client, name="rotated"))
    assert status == 200
