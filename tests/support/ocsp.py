"""A local OCSP responder for tests, built with cryptography's OCSP builders: good or
revoked answers (``status``, changeable mid-test), a responder that closes without an
answer ("broken"), or one signing with a key the issuer never delegated to."""

from __future__ import annotations

import asyncio
import datetime as dt

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
        self.lifetime = dt.timedelta(hours=1)  # nextUpdate - now: how long it is cached

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
            next_update=now + self.lifetime,
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


