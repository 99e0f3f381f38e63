"""Parse and analyse a PEM truststore bundle into a ``TrustBundle``; pure (bytes in).

Like the model's create/update warnings, every problem of every certificate becomes a
``CertWarning`` naming the certificate's subject, and the bundle is applied when at least
one CA is usable. Beyond the model, a CA expiring within 30 days is a warning too, and
the analysis is cheap enough to repeat on every refresh.

Rules of this module:
- ``certs`` holds only the usable CAs: those that can validate some client (a CA per
  basicConstraints, inside its validity period or not yet valid, algorithms inside the
  policy, with a complete path to a self-signed root of usable CAs, short enough for
  ``max_chain_length``). Those go into the TLS context; the rest only warn.
- ``all_certs`` keeps every certificate that parsed, for ``truststore check`` and
  ``/truststore``.
- A bundle with no usable CA raises ``TruststoreError``: it never replaces a good one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from mtlsproxy.errors import TruststoreError
from mtlsproxy.identity.algorithms import algorithm_problem
from mtlsproxy.runtime.pacing import pace

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"
EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertWarning:
    subject: str
    problem: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.problem}"


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

    @property
    def self_signed(self) -> bool:
        return self.cert.issuer == self.cert.subject

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
    certs: tuple[TrustedCert, ...]  # usable CAs only: what goes into the TLS context
    sha256: str
    warnings: tuple[CertWarning, ...] = ()
    all_certs: tuple[TrustedCert, ...] = ()
    by_subject: dict[bytes, tuple[TrustedCert, ...]] = field(default_factory=dict)
    # The DER of every usable CA, and of every certificate: is a certificate OpenSSL put
    # in a client's chain one of ours, or one the client sent
    # (``mutual_tls.client_intermediates``)?
    ders: frozenset[bytes] = field(init=False, compare=False, repr=False)
    all_ders: frozenset[bytes] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # frozen: set once, here
        object.__setattr__(self, "ders", frozenset(c.der for c in self.certs))
        object.__setattr__(self, "all_ders", frozenset(c.der for c in self.all_certs))

    @property
    def cadata(self) -> bytes:
        """Concatenated DER, as ``SSLContext.load_verify_locations(cadata=...)`` takes it."""
        return b"".join(c.der for c in self.certs)

    def issuers_of(self, cert: x509.Certificate) -> tuple[TrustedCert, ...]:
        return self.by_subject.get(cert.issuer.public_bytes(), ())


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pem_blocks(data: bytes) -> list[bytes]:
    """Each BEGIN..END CERTIFICATE block, text around them ignored (as OpenSSL does).

    ``bytes.find``, not a regular expression: a lazy ``.+?`` over a 1,000-CA bundle held
    the GIL for milliseconds in one call, a stall of the event loop during every swap."""
    blocks = []
    start = data.find(_BEGIN)
    while start >= 0:
        end = data.find(_END, start + len(_BEGIN))
        if end < 0:
            break
        blocks.append(data[start:end + len(_END)])
        start = data.find(_BEGIN, end + len(_END))
    return blocks


def _split(data: bytes) -> tuple[list[TrustedCert], list[CertWarning]]:
    blocks = _pem_blocks(data)
    if not blocks:
        return [], [CertWarning("(bundle)", "no PEM CERTIFICATE block found")]
    certs: list[TrustedCert] = []
    warnings: list[CertWarning] = []
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        pace()
        try:
            cert = x509.load_pem_x509_certificate(block)
            der = cert.public_bytes(serialization.Encoding.DER)
        except ValueError:
            # In words: the library's message is a debug string (a Rust ParseError).
            warnings.append(CertWarning(f"certificate #{i + 1}",
                                        "not parseable: not a valid X.509 certificate "
                                        "(truncated or corrupt base64 or DER)"))
            continue
        fp = hashlib.sha256(der).hexdigest()
        if fp in seen:
            warnings.append(CertWarning(cert.subject.rfc4514_string(), "duplicate"))
            continue
        seen.add(fp)
        certs.append(TrustedCert(cert, der, fp))
    return certs, warnings


def parse_bundle(data: bytes, max_chain_length: int = 4,
                 now: dt.datetime | None = None) -> TrustBundle:
    """Parse and analyse; raise TruststoreError when no CA is usable."""
    bundle = analyse(data, max_chain_length, now)
    if not bundle.certs:
        reasons = "; ".join(str(w) for w in bundle.warnings[:5])
        raise TruststoreError("no usable CA in the bundle" + (f": {reasons}" if reasons else ""))
    return bundle


def analyse(data: bytes, max_chain_length: int = 4,
            now: dt.datetime | None = None) -> TrustBundle:
    """Parse and analyse without judging: ``certs`` may be empty (``truststore check``)."""
    now = now or dt.datetime.now(dt.UTC)
    certs, warnings = _split(data)
    index: dict[bytes, list[TrustedCert]] = {}
    for c in certs:
        index.setdefault(c.cert.subject.public_bytes(), []).append(c)

    intrinsic: dict[str, bool] = {}
    issuers_seen: dict[bytes, str] = {}
    for c in certs:
        pace()
        ok = True
        cert = c.cert
        if now > cert.not_valid_after_utc:
            warnings.append(CertWarning(
                c.subject, f"expired on {_rfc3339(cert.not_valid_after_utc)}"))
            ok = False
        elif cert.not_valid_after_utc - now < EXPIRY_WARNING:
            days = (cert.not_valid_after_utc - now).days
            warnings.append(CertWarning(
                c.subject, f"expires in {days} days ({_rfc3339(cert.not_valid_after_utc)})"))
        if now < cert.not_valid_before_utc:
            warnings.append(CertWarning(
                c.subject, f"not yet valid (from {_rfc3339(cert.not_valid_before_utc)})"))
        problem = algorithm_problem(cert, check_signature=not c.self_signed)
        if problem is not None:
            warnings.append(CertWarning(c.subject, problem))
            ok = False
        if not _is_ca(cert):
            warnings.append(CertWarning(c.subject, "not a CA (basicConstraints CA:FALSE or "
                                                   "missing): it can never issue a client"))
            ok = False
        subject_key = cert.subject.public_bytes()
        other = issuers_seen.setdefault(subject_key, c.issuer)
        if other != c.issuer:
            warnings.append(CertWarning(
                c.subject, "conflicts with an existing certificate from a different issuer "
                           f"({other})"))
        intrinsic[c.fingerprint_sha256] = ok

    # depth[c]: certificates from c up to its root, both counted; None: no usable path.
    depth: dict[str, int | None] = {}
    usable: list[TrustedCert] = []
    for c in certs:
        pace()
        d = _path_depth(c, frozenset(), depth, intrinsic, index)
        if d is None:
            if intrinsic[c.fingerprint_sha256] and c.self_signed:
                warnings.append(CertWarning(c.subject, _root_problem(c.cert)))
            elif intrinsic[c.fingerprint_sha256] and not c.self_signed:
                if not index.get(c.cert.issuer.public_bytes()):
                    warnings.append(CertWarning(
                        c.subject, f"issuer missing from the bundle (chain incomplete): "
                                   f"{c.issuer}"))
                else:
                    warnings.append(CertWarning(
                        c.subject, f"no usable path to a root through {c.issuer}"))
            continue
        if d + 1 > max_chain_length:
            warnings.append(CertWarning(
                c.subject, f"chain longer than max_chain_length: a client it issues has a "
                           f"chain of {d + 1} (max {max_chain_length})"))
            continue
        usable.append(c)
    by_subject: dict[bytes, list[TrustedCert]] = {}
    for c in usable:
        by_subject.setdefault(c.cert.subject.public_bytes(), []).append(c)
    return TrustBundle(tuple(usable), hashlib.sha256(data).hexdigest(), tuple(warnings),
                       tuple(certs), {k: tuple(v) for k, v in by_subject.items()})


def _root_problem(cert: x509.Certificate) -> str:
    """Why a self-signed certificate is no root: its own signature does not verify."""
    algo = cert.signature_hash_algorithm
    name = algo.name.upper().replace("SHA", "SHA-") if algo is not None else "none"
    if not isinstance(algo, (hashes.SHA256, hashes.SHA384, hashes.SHA512)):
        return (f"unsupported signature algorithm {name} on a self-signed root (SHA-256 or "
                "stronger required): not used")
    return "self-signed, but its signature does not verify: not used"


def _path_depth(c: TrustedCert, visiting: frozenset[str], depth: dict[str, int | None],
                intrinsic: dict[str, bool], index: dict[bytes, list[TrustedCert]]
                ) -> int | None:
    """Certificates from ``c`` up to a self-signed root, both counted; None: no usable path.

    A module function, not a closure in ``analyse``: a recursive closure is a reference
    cycle (function -> cell -> function) that kept every analysed certificate alive until
    a full garbage collection, which then held the GIL for a long pause."""
    fp = c.fingerprint_sha256
    if fp in depth:
        return depth[fp]
    if not intrinsic[fp] or fp in visiting:
        return None
    if c.self_signed:
        result: int | None = 1 if _issued_by(c.cert, c.cert) else None
    else:
        found = [d for i in index.get(c.cert.issuer.public_bytes(), [])
                 if _issued_by(c.cert, i.cert)
                 and (d := _path_depth(i, visiting | {fp}, depth, intrinsic, index))
                 is not None]
        result = 1 + min(found) if found else None
    depth[fp] = result
    return result


_DAY = dt.timedelta(days=1)


def next_change(bundle: TrustBundle, now: dt.datetime) -> dt.datetime | None:
    """The first instant at or after ``now`` from which ``analyse`` of the same bytes can
    answer differently: a certificate starts or stops being valid, enters the expiry
    window, or its "expires in N days" count drops. None: never. Between two such
    instants re-analysing is wasted work (a large bundle costs CPU and the GIL)."""
    candidates: list[dt.datetime] = []
    for c in bundle.all_certs:
        pace()
        nb, na = c.cert.not_valid_before_utc, c.cert.not_valid_after_utc
        candidates += [nb, na, na - EXPIRY_WARNING]
        if na - EXPIRY_WARNING <= now <= na:
            candidates.append(na - (na - now).days * _DAY)  # the day count drops after it
    upcoming = [t for t in candidates if t >= now]
    return min(upcoming) if upcoming else None
