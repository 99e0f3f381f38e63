"""The proxy's own client-certificate policy, applied after OpenSSL's verification; pure.

OpenSSL at its default security level accepts what the model refuses (P-521 and Ed25519
keys, chains longer than four: docs/architecture.md), so these checks run on every
chain. They also re-check validity against an injected clock, because a resumed TLS 1.3
session is accepted by OpenSSL after the certificate expired.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mtlsproxy.identity.algorithms import algorithm_problem
from mtlsproxy.truststore.bundle import TrustBundle


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
