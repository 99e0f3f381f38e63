"""Certificate revocation lists: parse, verify against the truststore, decide; pure.

Rules of this module:
- A CRL counts only when its signature verifies with a CA of the truststore whose subject
  is the CRL's issuer; an unverifiable CRL is reported and ignored (never trusted).
- ``RevocationState`` is an immutable snapshot; a change of CRLs makes a new one, and the
  listener's truststore generation number moves with it, so every cached verdict (and every
  keep-alive connection, on its next request) is re-decided.
- Mode ``hard`` refuses a certificate whose issuer's CRL is configured but missing or stale
  (``revocation_unavailable``); ``soft`` admits it and the stale CRL shows in metrics.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mtlsproxy.identity.peer import ClientIdentity
from mtlsproxy.runtime.pacing import pace
from mtlsproxy.truststore.bundle import TrustBundle


@dataclass(frozen=True)
class LoadedCRL:
    uri: str
    issuer: str  # RFC 4514, for logs and the stale metric
    this_update: dt.datetime
    next_update: dt.datetime | None
    revoked: frozenset[int]


@dataclass(frozen=True)
class RevocationState:
    mode: str  # hard | soft
    crls: dict[bytes, LoadedCRL] = field(default_factory=dict)  # by issuer Name DER
    problems: tuple[str, ...] = ()  # URIs that failed, CRLs that did not verify
    missing: bool = False  # some configured CRL could not be loaded

    def stale(self, now: dt.datetime) -> list[LoadedCRL]:
        return [c for c in self.crls.values()
                if c.next_update is not None and c.next_update < now]

    def reason(self, identity: ClientIdentity, now: dt.datetime) -> str | None:
        """``revoked``, ``revocation_unavailable`` (hard mode) or None."""
        certs = (identity.leaf, *identity.chain)
        for cert in certs:
            if cert.issuer == cert.subject:
                continue  # a root is trusted by configuration, not by a CRL
            crl = self.crls.get(cert.issuer.public_bytes())
            if crl is not None and cert.serial_number in crl.revoked:
                return "revoked"
        if self.mode == "hard":
            for cert in certs:
                if cert.issuer == cert.subject:
                    continue
                crl = self.crls.get(cert.issuer.public_bytes())
                if crl is None and self.missing:
                    return "revocation_unavailable"
                if crl is not None and crl.next_update is not None and crl.next_update < now:
                    return "revocation_unavailable"
        return None


def _load(data: bytes) -> x509.CertificateRevocationList:
    if b"-----BEGIN X509 CRL-----" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def _serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    """The revoked serial numbers; a long CRL paces itself on the build
    thread (runtime/pacing.py) every 1,024 entries."""
    serials = set()
    for i, revoked in enumerate(crl):
        serials.add(revoked.serial_number)
        if not i & 1023:
            pace()
    return frozenset(serials)


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False  # the policy admits only RSA and ECDSA CAs
    return crl.is_signature_valid(key)


def build_state(mode: str, crls: dict[str, bytes | None],
                bundle: TrustBundle | None) -> RevocationState:
    """Verify each fetched CRL against the truststore; ``None`` data = failed to fetch."""
    loaded: dict[bytes, LoadedCRL] = {}
    problems: list[str] = []
    missing = False
    for uri, data in crls.items():
        if data is None:
            problems.append(f"{uri}: not loaded")
            missing = True
            continue
        try:
            crl = _load(data)
        except ValueError as exc:
            problems.append(f"{uri}: not a CRL: {exc}")
            missing = True
            continue
        issuers = bundle.by_subject.get(crl.issuer.public_bytes(), ()) if bundle else ()
        issuer = next((i for i in issuers if _signed_by(crl, i.cert)), None)
        if issuer is None:
            problems.append(f"{uri}: no truststore CA named {crl.issuer.rfc4514_string()} "
                            "signed it")
            missing = True
            continue
        loaded[crl.issuer.public_bytes()] = LoadedCRL(
            uri, crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc,
            _serials(crl))
    return RevocationState(mode, loaded, tuple(problems), missing)
