"""OCSP for client certificates: request, verify, cache; the HTTP call is the only I/O.

Rules of this module:
- The responder is the leaf's AIA OCSP URL. A response counts only when it answers for
  this serial and issuer, and is signed by the issuer or by a responder certificate the
  issuer signed with the OCSP-signing EKU (RFC 6960 section 4.2.2.2).
- Answers are cached per leaf until their nextUpdate (five minutes without one);
  concurrent lookups of one leaf share one call.
- ``good`` admits; ``revoked`` is ``revoked``; no usable answer (unreachable, unsigned,
  ``unknown``) is ``revocation_unavailable`` in hard mode and admits in soft mode.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from mtlsproxy.errors import MtlsProxyError
from mtlsproxy.identity.peer import ClientIdentity
from mtlsproxy.runtime.coalesce import CoalescingCache

DEFAULT_TTL = 300.0


@dataclass(frozen=True)
class OcspAnswer:
    status: str  # good | revoked | unavailable
    detail: str = ""


def responder_url(cert: x509.Certificate) -> str | None:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for desc in aia:
        if desc.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
                desc.access_location, x509.UniformResourceIdentifier):
            return str(desc.access_location.value)
    return None


def build_request(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    # SHA-1 here only names the certificate (CertID); RFC 6960 responders expect it.
    req = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    return req.public_bytes(Encoding.DER)


def _verify(signer: x509.Certificate, resp: ocsp.OCSPResponse) -> bool:
    key = signer.public_key()
    algo = resp.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algo is not None:
            key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), algo)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algo is not None:
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(algo))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _is_delegate(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in eku


def parse_response(data: bytes, leaf: x509.Certificate, issuer: x509.Certificate,
                   now: dt.datetime) -> tuple[OcspAnswer, float]:
    """(answer, seconds it may be cached)."""
    try:
        resp = ocsp.load_der_ocsp_response(data)
    except ValueError as exc:
        return OcspAnswer("unavailable", f"not an OCSP response: {exc}"), 0.0
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return OcspAnswer("unavailable", f"responder said {resp.response_status.name}"), 0.0
    if resp.serial_number != leaf.serial_number:
        return OcspAnswer("unavailable", "answer for another certificate"), 0.0
    signers = [issuer] + [c for c in resp.certificates if _is_delegate(c, issuer)]
    if not any(_verify(s, resp) for s in signers):
        return OcspAnswer("unavailable", "response not signed by the issuer or its "
                                         "delegated responder"), 0.0
    next_update = resp.next_update_utc
    if next_update is not None and next_update < now:
        return OcspAnswer("unavailable", "stale response (nextUpdate passed)"), 0.0
    ttl = (next_update - now).total_seconds() if next_update is not None else DEFAULT_TTL
    status = resp.certificate_status
    if status == ocsp.OCSPCertStatus.GOOD:
        return OcspAnswer("good"), ttl
    if status == ocsp.OCSPCertStatus.REVOKED:
        return OcspAnswer("revoked"), ttl
    return OcspAnswer("unavailable", "responder does not know the certificate"), ttl


class OcspClient:
    """Cached, coalesced OCSP lookups for one listener."""

    def __init__(self, post: Callable[..., object], clock: Callable[[], float] = time.monotonic,
                 timeout: float = 3.0) -> None:
        self.post = post
        self.timeout = timeout
        self.cache: CoalescingCache[str, OcspAnswer] = CoalescingCache(clock)

    def __repr__(self) -> str:
        return f"<OcspClient {self.cache!r}>"

    async def answer(self, identity: ClientIdentity) -> OcspAnswer:
        """Cached per certificate until the answer's nextUpdate."""
        return await self.cache.get(identity.fingerprint_sha256,
                                    lambda: self._lookup(identity))

    async def _lookup(self, identity: ClientIdentity) -> tuple[OcspAnswer, float]:
        if not identity.chain:
            return OcspAnswer("unavailable", "no issuer certificate"), 0.0
        url = responder_url(identity.leaf)
        if url is None:
            return OcspAnswer("unavailable", "no OCSP responder in the certificate"), 0.0
        issuer = identity.chain[0]
        try:
            status, body = await self.post(  # type: ignore[misc]
                url, build_request(identity.leaf, issuer), self.timeout,
                "application/ocsp-request")
        except (OSError, ValueError, TimeoutError, MtlsProxyError) as exc:
            return OcspAnswer("unavailable", f"responder unreachable: {exc!r}"), 0.0
        if status != 200:
            return OcspAnswer("unavailable", f"responder answered {status}"), 0.0
        return parse_response(body, identity.leaf, issuer, dt.datetime.now(dt.UTC))


def reason_for(answer: OcspAnswer, mode: str) -> str | None:
    if answer.status == "revoked":
        return "revoked"
    if answer.status == "unavailable" and mode == "hard":
        return "revocation_unavailable"
    return None
