"""The client's identity, read from the leaf certificate the TLS layer verified; pure."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True)
class ClientIdentity:
    leaf: x509.Certificate
    leaf_der: bytes
    chain: tuple[x509.Certificate, ...]  # issuer first, leaf excluded, up to the root
    chain_der: tuple[bytes, ...]
    subject: str
    issuer: str
    serial_hex: str
    fingerprint_sha256: str
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def valid_from(self) -> dt.datetime:
        """The latest not_before of the whole chain."""
        return max([self.not_before] + [c.not_valid_before_utc for c in self.chain])

    @property
    def valid_until(self) -> dt.datetime:
        """The earliest not_after of the whole chain."""
        return min([self.not_after] + [c.not_valid_after_utc for c in self.chain])


def read_identity(leaf_der: bytes, chain_der: list[bytes]) -> ClientIdentity:
    leaf = x509.load_der_x509_certificate(leaf_der)
    chain = tuple(x509.load_der_x509_certificate(d) for d in chain_der)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, uris = (), ()
    return ClientIdentity(
        leaf=leaf,
        leaf_der=leaf_der,
        chain=chain,
        chain_der=tuple(chain_der),
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        serial_hex=format(leaf.serial_number, "x"),
        fingerprint_sha256=hashlib.sha256(leaf_der).hexdigest(),
        san_dns=dns,
        san_uri=uris,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )
