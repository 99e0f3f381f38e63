"""Per-route client authorization (``routes[].allow``): does this identity match; pure.

``allow`` is a list of alternatives; any one admits the client, and inside one every key
given must match. Evaluated only after the chain is valid; a route with rules refuses
(fails closed) a connection without a client identity. The rules are parsed with the
config (config/rules.py), which names the key path of a bad one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mtlsproxy.config.rules import ATTRIBUTES, Rule
from mtlsproxy.identity.peer import ClientIdentity


def authorize(rules: tuple[Rule, ...] | None, identity: ClientIdentity | None) -> bool:
    """True when admitted; False when refused. ``None`` rules admit everyone validated."""
    if rules is None:
        return True
    if identity is None:
        return False  # fail closed: a rule needs an identity to match
    return any(rule_matches(rule, identity) for rule in rules)


def rule_matches(rule: Rule, identity: ClientIdentity) -> bool:
    """Every key the rule gives matches the identity."""
    leaf = identity.leaf
    if rule.subject and not _name_matches(leaf.subject, rule.subject):
        return False
    if rule.issuer and not _name_matches(leaf.issuer, rule.issuer):
        return False
    if rule.san_dns is not None and not any(_dns_matches(rule.san_dns, d)
                                            for d in identity.san_dns):
        return False
    if rule.san_uri is not None and not any(rule.san_uri.match(u)
                                            for u in identity.san_uri):
        return False
    if rule.fingerprint_sha256 is not None and not hmac.compare_digest(
            rule.fingerprint_sha256, bytes.fromhex(identity.fingerprint_sha256)):
        return False
    if rule.spki_sha256 is not None and not hmac.compare_digest(
            rule.spki_sha256, _spki_sha256(leaf)):
        return False
    if rule.issuer_fingerprint_sha256 is not None:
        issuer_der = identity.chain_der[0] if identity.chain_der else b""
        if not hmac.compare_digest(rule.issuer_fingerprint_sha256,
                                   hashlib.sha256(issuer_der).digest()):
            return False
    return True


def _spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def _name_matches(name: x509.Name, patterns: tuple[tuple[str, str], ...]) -> bool:
    for attr, pattern in patterns:
        values = [str(a.value) for a in name.get_attributes_for_oid(ATTRIBUTES[attr])]
        if not any(fnmatch.fnmatchcase(v, pattern) for v in values):
            return False
    return True


def _dns_matches(pattern: str, name: str) -> bool:
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return name == pattern
