"""Map a handshake failure to a bounded ``reason`` label (reasons.py); pure.

The verify codes are OpenSSL's X509_V_ERR_* values (openssl/x509_vfy.h); the table of
what each client certificate produces is checked by tests/test_identity.py and listed in
docs/architecture.md, "What Python's ssl does and does not do".
"""

from __future__ import annotations

import ssl

_VERIFY_CODES = {
    2: "untrusted",        # unable to get issuer certificate
    3: "other",            # unable to get CRL
    7: "bad_signature",    # certificate signature failure
    9: "not_yet_valid",
    10: "expired",
    13: "not_yet_valid",   # format error in notBefore
    14: "expired",         # format error in notAfter
    18: "untrusted",       # self-signed certificate
    19: "untrusted",       # self-signed certificate in chain
    20: "untrusted",       # unable to get local issuer certificate
    21: "untrusted",       # unable to verify the first certificate
    22: "chain_too_long",
    24: "untrusted",       # invalid CA certificate
    26: "unsupported_purpose",
    32: "untrusted",       # key usage does not include certificate signing
    66: "weak_algorithm",  # EE key too weak
    67: "weak_algorithm",  # CA key too weak
    68: "weak_algorithm",  # CA md too weak
}

_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "HTTP_REQUEST": "protocol",
    "HTTPS_PROXY_REQUEST": "protocol",
    "WRONG_VERSION_NUMBER": "protocol",
    "UNSUPPORTED_PROTOCOL": "protocol",
    "VERSION_TOO_LOW": "protocol",
    "NO_SHARED_CIPHER": "protocol",
    "NO_PROTOCOLS_AVAILABLE": "protocol",
    "UNKNOWN_PROTOCOL": "protocol",
    "RECORD_LAYER_FAILURE": "protocol",
    "BAD_SIGNATURE": "bad_signature",
    "DIGEST_CHECK_FAILED": "bad_signature",
    "CA_MD_TOO_WEAK": "weak_algorithm",
    "EE_KEY_TOO_SMALL": "weak_algorithm",
    "CA_KEY_TOO_SMALL": "weak_algorithm",
}


def classify(exc: BaseException) -> str:
    """The reason label for an exception raised during the server handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, "untrusted")
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLEOFError | ConnectionError | EOFError):
        return "client_closed"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        if reason in _SSL_REASONS:
            return _SSL_REASONS[reason]
        if reason.startswith("TLSV1_ALERT_") or reason.startswith("SSLV3_ALERT_"):
            # The client refused OUR certificate (unknown ca, bad certificate, ...).
            return "server_cert_rejected"
        if "VERSION" in reason or "PROTOCOL" in reason or "CIPHER" in reason:
            return "protocol"
    return "other"
