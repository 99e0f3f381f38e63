"""The proxy's own client-certificate policy, applied after OpenSSL's verification; pure.

OpenSSL at its default security level accepts what the model refuses (P-521 and Ed25519
keys, chains longer than four: python-tls-findings.md), so these checks run on every
chain. They also re-check validity against an injected clock, because a resumed TLS 1.3
session is accepted by OpenSSL after the certificate expired.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

if TYPE_CHECKING:
    from mtlsproxy.truststore.bundle import TrustBundle

# The model's supported algorithms: SHA-256 or stronger, RSA >= 2048, ECDSA P-256/P-384.
_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048


def algorithm_problem(cert: x509.Certificate, check_signature: bool = True) -> str | None:
    """Why the certificate's key or signature is outside the policy, or None."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits (minimum {MIN_RSA_BITS})"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            return f"ECDSA curve {key.curve.name} (only P-256 and P-384)"
    else:
        return f"key type {type(key).__name__.removeprefix('_')} (only RSA and ECDSA)"
    if check_signature:
        algo = cert.signature_hash_algorithm
        if not isinstance(algo, _HASHES):
            name = algo.name if algo is not None else "none"
            return f"signature hash {name} (SHA-256 or stronger required)"
    return None


def validity_reason(valid_from: dt.datetime, valid_until: dt.datetime,
                    now: dt.datetime) -> str | None:
    if now < valid_from:
        return "not_yet_valid"
    if now > valid_until:
        return "expired"
    return None


def check_chain(leaf: x509.Certificate, chain: Sequence[x509.Certificate],
                max_chain_length: int) -> str | None:
    """The policy reason to refuse a verified chain (leaf excluded from ``chain``)."""
    if 1 + len(chain) > max_chain_length:
        return "chain_too_long"
    for i, cert in enumerate((leaf, *chain)):
        # A self-signed root's own signature is never checked by anyone: only its key counts.
        is_root = i == len(chain) and cert.issuer == cert.subject
        if algorithm_problem(cert, check_signature=not is_root) is not None:
            return "weak_algorithm"
    return None


def build_path(leaf: x509.Certificate, bundle: TrustBundle,
               limit: int = 16) -> list[x509.Certificate] | None:
    """Rebuild leaf -> root from the truststore, for resumed sessions (no verified chain).

    Returns the chain without the leaf, or None if no path to a self-signed CA exists.
    """
    path: list[x509.Certificate] = []
    current = leaf
    for _ in range(limit):
        if current.issuer == current.subject and path:
            return path
        for candidate in bundle.issuers_of(current):
            try:
                current.verify_directly_issued_by(candidate.cert)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if candidate.cert == current:
                return path
            path.append(candidate.cert)
            current = candidate.cert
            break
        else:
            return None
    return None
