"""OCSP for client certificates (issue #6) against a local responder the test runs, built
with cryptography's OCSP builders: good, revoked, unreachable under soft and hard, caching
until nextUpdate, and a response signed by the wrong key."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.support.harness import Harness
from tests.support.pki import UTC, Cert, make_cert
from tests.support.tools import read_post_body


class Responder:
    def __init__(self, h: Harness, issuer: Cert, status: str = "good",
                 signer: Cert | None = None) -> None:
        self.issuer, self.status, self.signer = issuer, status, signer
        self.leaves: dict[int, Cert] = {}
        self.calls = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                req = ocsp.load_der_ocsp_request(await read_post_body(reader))
                self.calls += 1
                body = self.answer(req.serial_number)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/ocsp-response\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
            except ConnectionResetError:
                pass
            finally:
                writer.close()

        self.url = f"http://127.0.0.1:{h.serve(handle)}/ocsp"

    def answer(self, serial: int) -> bytes:
        if self.status == "broken":
            raise ConnectionResetError("responder crashed")  # closes without an answer
        now = dt.datetime.now(UTC)
        leaf = self.leaves[serial]
        status = {"good": ocsp.OCSPCertStatus.GOOD,
                  "revoked": ocsp.OCSPCertStatus.REVOKED}[self.status]
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=leaf.cert, issuer=self.issuer.cert, algorithm=hashes.SHA1(),
            cert_status=status, this_update=now - dt.timedelta(minutes=1),
            next_update=now + dt.timedelta(hours=1),
            revocation_time=now - dt.timedelta(minutes=5) if self.status == "revoked" else None,
            revocation_reason=None,
        )
        if self.signer is None:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self.issuer.cert)
            resp = builder.sign(self.issuer.key, hashes.SHA256())
        else:  # a responder the issuer never delegated to
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self.signer.cert)
            builder = builder.certificates([self.signer.cert])
            resp = builder.sign(self.signer.key, hashes.SHA256())
        return resp.public_bytes(serialization.Encoding.DER)


def client_of(r: Responder, h: Harness, url: str | None = None) -> Cert:
    cert = make_cert("ocsp-client", h.pki.inter, ocsp_url=url or r.url)
    r.leaves[cert.cert.serial_number] = cert
    return cert


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
