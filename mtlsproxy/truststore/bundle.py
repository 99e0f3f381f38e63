"""Parse a PEM truststore bundle into a ``TrustBundle``; pure (bytes in, objects out).

The bundle keeps every certificate that parsed, an index by subject for path building,
and the DER of the certificates that go into the TLS context.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtlsproxy.errors import TruststoreError

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class TrustedCert:
    cert: x509.Certificate
    der: bytes
    fingerprint_sha256: str

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        return self.cert.issuer.rfc4514_string()

    def describe(self) -> dict[str, str]:
        c = self.cert
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": format(c.serial_number, "x"),
            "not_before": _rfc3339(c.not_valid_before_utc),
            "not_after": _rfc3339(c.not_valid_after_utc),
            "fingerprint_sha256": self.fingerprint_sha256,
        }


def _rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TrustBundle:
    certs: tuple[TrustedCert, ...]
    sha256: str
    warnings: tuple[str, ...] = ()
    by_subject: dict[bytes, tuple[TrustedCert, ...]] = field(default_factory=dict)

    @property
    def cadata(self) -> bytes:
        """Concatenated DER, as ``SSLContext.load_verify_locations(cadata=...)`` takes it."""
        return b"".join(c.der for c in self.certs)

    def issuers_of(self, cert: x509.Certificate) -> tuple[TrustedCert, ...]:
        return self.by_subject.get(cert.issuer.public_bytes(), ())


def parse_bundle(data: bytes) -> TrustBundle:
    """Parse every CERTIFICATE block; raise TruststoreError when none is usable."""
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise TruststoreError("no PEM CERTIFICATE block found")
    certs: list[TrustedCert] = []
    warnings: list[str] = []
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        try:
            cert = x509.load_pem_x509_certificate(block)
            der = cert.public_bytes(serialization.Encoding.DER)
        except ValueError as exc:
            warnings.append(f"certificate #{i + 1}: not parseable: {exc}")
            continue
        fp = hashlib.sha256(der).hexdigest()
        if fp in seen:
            warnings.append(f"{cert.subject.rfc4514_string()}: duplicate")
            continue
        seen.add(fp)
        certs.append(TrustedCert(cert, der, fp))
    if not certs:
        raise TruststoreError("no parseable certificate in the bundle")
    index: dict[bytes, list[TrustedCert]] = {}
    for c in certs:
        index.setdefault(c.cert.subject.public_bytes(), []).append(c)
    return TrustBundle(tuple(certs), hashlib.sha256(data).hexdigest(), tuple(warnings),
                       {k: tuple(v) for k, v in index.items()})
