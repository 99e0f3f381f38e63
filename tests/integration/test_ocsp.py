"""OCSP for client certificates (issue #6) against a local responder the test runs, built
with cryptography's OCSP builders: good, revoked, unreachable under soft and hard, caching
until nextUpdate, and a response signed by the wrong key."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.harness import Harness
from tests.support.ocsp import Responder, client_of
from tests.support.pki import Cert, make_cert


def start(h: Harness, mode: str = "soft") -> None:
    h.start(h.config(mutual_tls={"truststore_uri": str(h.pki.truststore),
                                 "revocation": {"ocsp": True, "mode": mode}}))


def reason(h: Harness, cert: Cert) -> str | None:
    status, _, body = h.get("/", ctx=h.client_context(cert, name="ocsp"))
    return None if status == 200 else json.loads(body)["reason"]


def test_a_good_answer_admits_and_is_cached_until_next_update(harness: Harness) -> None:
    r = Responder(harness, harness.pki.inter)
    cert = client_of(r, harness)
    start(harness, "hard")
    assert reason(harness, cert) is None
    assert reason(harness, cert) is None
    assert r.calls == 1


def test_a_revoked_answer_gets_403_revoked(harness: Harness) -> None:
    r = Responder(harness, harness.pki.inter, status="revoked")
    cert = client_of(r, harness)
    start(harness)
    assert reason(harness, cert) == "revoked"
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="revoked") == 1


@pytest.mark.parametrize("mode, expected", [("soft", None), ("hard", "revocation_unavailable")])
def test_an_unreachable_responder_follows_the_mode(harness: Harness, mode: str,
                                                   expected: str | None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/ocsp"
    r = Responder(harness, harness.pki.inter)
    cert = client_of(r, harness, url=dead)
    start(harness, mode)
    assert reason(harness, cert) == expected


def test_a_response_signed_by_another_key_is_not_trusted(harness: Harness) -> None:
    r = Responder(harness, harness.pki.inter, status="good",
                  signer=make_cert("Rogue Responder", ca=True))
    cert = client_of(r, harness)
    start(harness, "hard")
    assert reason(harness, cert) == "revocation_unavailable"


def test_a_responder_closing_without_an_answer_is_unavailable_not_a_400(
        harness: Harness) -> None:
    r = Responder(harness, harness.pki.inter, status="broken")
    cert = client_of(r, harness)
    start(harness, "hard")
    assert reason(harness, cert) == "revocation_unavailable"
