"""The ``routes[].allow`` rule model and its parser; evaluation is admission/rules.py.

Pattern rules (docs/configuration.md):
- ``subject`` / ``issuer``: a mapping of CN, O, OU to a value; ``*`` and ``?`` are
  shell-style wildcards within the value, otherwise the match is exact.
- ``san_dns``: exact name, or ``*.`` + name where ``*`` is exactly one DNS label.
- ``san_uri``: ``*`` matches within one path segment (never ``/``), ``**`` matches across
  segments; e.g. ``spiffe://prod.example.com/ns/payments/**``.
- ``fingerprint_sha256`` (leaf DER), ``spki_sha256`` (leaf SubjectPublicKeyInfo DER),
  ``issuer_fingerprint_sha256`` (the issuing CA's DER): 64 hex digits, colons allowed,
  compared in constant time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cryptography.x509.oid import NameOID

RULE_KEYS = ("subject", "issuer", "san_dns", "san_uri", "fingerprint_sha256", "spki_sha256",
             "issuer_fingerprint_sha256")
ATTRIBUTES = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME,
              "OU": NameOID.ORGANIZATIONAL_UNIT_NAME}
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


class RuleError(ValueError):
    """A rule that can never match; the message says why."""


def _fingerprint(value: Any) -> bytes:
    if not isinstance(value, str):
        raise RuleError("must be a string of 64 hex digits")
    clean = value.replace(":", "").strip().lower()
    if not _HEX64.match(clean):
        raise RuleError(f"not a SHA-256 fingerprint (64 hex digits): {value!r}")
    return bytes.fromhex(clean)


def _dns_pattern(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RuleError("must be a DNS name or *.name")
    name = value.lower().rstrip(".")
    labels = name.split(".")
    rest = labels[1:] if labels[0] == "*" else labels
    if not rest or not all(_DNS_LABEL.match(label) for label in rest):
        raise RuleError(f"malformed DNS pattern {value!r} (* only as the whole first label)")
    return name


def _uri_pattern(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str) or "://" not in value:
        raise RuleError("must be a URI pattern such as spiffe://domain/path/*")
    if "***" in value:
        raise RuleError(f"malformed URI pattern {value!r}")
    parts = re.split(r"(\*\*|\*)", value)
    regex = "".join("[^/]*" if p == "*" else ".*" if p == "**" else re.escape(p)
                    for p in parts)
    return re.compile(f"^{regex}$")


def _name_pattern(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise RuleError(f"{key} must be a mapping of CN, O, OU to values")
    out = []
    for attr, pattern in value.items():
        if attr not in ATTRIBUTES:
            raise RuleError(f"{key}.{attr}: unknown attribute (allowed: CN, O, OU)")
        if not isinstance(pattern, str) or not pattern:
            raise RuleError(f"{key}.{attr}: must be a non-empty string")
        if "[" in pattern:
            raise RuleError(f"{key}.{attr}: character classes are not supported")
        out.append((attr, pattern))
    return tuple(out)


@dataclass(frozen=True)
class Rule:
    """One alternative of ``allow``: every key given must match."""

    source: str  # the rule as configured, for logs
    subject: tuple[tuple[str, str], ...] = ()
    issuer: tuple[tuple[str, str], ...] = ()
    san_dns: str | None = None
    san_uri: re.Pattern[str] | None = None
    fingerprint_sha256: bytes | None = None
    spki_sha256: bytes | None = None
    issuer_fingerprint_sha256: bytes | None = None


def parse_rule(raw: Any) -> Rule:
    """One ``allow`` alternative from config; raises RuleError naming what is wrong."""
    if not isinstance(raw, dict) or not raw:
        raise RuleError("an alternative must be a mapping with at least one key")
    unknown = [k for k in raw if k not in RULE_KEYS]
    if unknown:
        raise RuleError(f"{unknown[0]}: unknown key (allowed: {', '.join(RULE_KEYS)})")
    fields: dict[str, Any] = {"source": ", ".join(f"{k}={raw[k]}" for k in raw)}
    for key, value in raw.items():
        try:
            if key in ("subject", "issuer"):
                fields[key] = _name_pattern(value, key)
            elif key == "san_dns":
                fields[key] = _dns_pattern(value)
            elif key == "san_uri":
                fields[key] = _uri_pattern(value)
            else:
                fields[key] = _fingerprint(value)
        except RuleError as exc:
            message = str(exc)
            raise RuleError(message if message.startswith(key) else f"{key}: {message}") \
                from None
    return Rule(**fields)
