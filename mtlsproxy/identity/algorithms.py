"""Which keys and signatures any certificate may carry: the model's algorithm policy; pure.

The same rule applies to a client's chain (admission/policy.py) and to a truststore's CAs
(truststore/bundle.py warns about a CA outside it), so it sits below both.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
