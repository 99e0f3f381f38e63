"""Per-route authorization rules (issue #6, ``routes[].allow``): pure matching, config
errors naming the key, and each rule kind over real sockets, allowed and refused."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from mtlsproxy.admission.rules import authorize
from mtlsproxy.config import parse_config
from mtlsproxy.config.rules import RuleError, parse_rule
from mtlsproxy.errors import ConfigError
from mtlsproxy.identity.peer import read_identity
from tests.support.harness import Harness
from tests.support.pki import PKI, make_cert


def spki(cert: Any) -> str:
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def rules_for(pki: PKI) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """rule kind -> (a rule the good client matches, one it does not)."""
    leaf = pki.client.cert
    fp = hashlib.sha256(pki.client.der).hexdigest()
    inter_fp = hashlib.sha256(pki.inter.der).hexdigest()
    other = "ab" * 32
    return {
        "san_uri": ({"san_uri": "spiffe://prod.example.test/ns/payments/**"},
                    {"san_uri": "spiffe://prod.example.test/ns/billing/*"}),
        "san_uri_segment": ({"san_uri": "spiffe://prod.example.test/ns/*/sa/api"},
                            {"san_uri": "spiffe://prod.example.test/ns/payments/*"}),
        "subject": ({"subject": {"CN": "good-*", "O": "mtlsproxy tests"}},
                    {"subject": {"CN": "good-*", "O": "Other Corp"}}),
        "issuer": ({"issuer": {"O": "trustme*"}}, {"issuer": {"CN": "Someone Else"}}),
        "san_dns": ({"san_dns": "*.example.test"}, {"san_dns": "*.other.test"}),
        "fingerprint": ({"fingerprint_sha256": ":".join(fp[i:i + 2] for i in range(0, 64, 2))},
                        {"fingerprint_sha256": other}),
        "spki": ({"spki_sha256": spki(leaf)}, {"spki_sha256": other}),
        "issuer_fingerprint": ({"issuer_fingerprint_sha256": inter_fp},
                               {"issuer_fingerprint_sha256": other}),
        "combined": ({"subject": {"CN": "good-client"}, "issuer_fingerprint_sha256": inter_fp},
                     {"subject": {"CN": "good-client"}, "issuer_fingerprint_sha256": other}),
    }


KINDS = ["san_uri", "san_uri_segment", "subject", "issuer", "san_dns", "fingerprint", "spki",
         "issuer_fingerprint", "combined"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_rule_kind_matches_and_refuses_without_sockets(pki: PKI, kind: str) -> None:
    identity = read_identity(pki.client.der, [pki.inter.der, pki.root.der])
    good, bad = rules_for(pki)[kind]
    assert authorize((parse_rule(good),), identity)
    assert not authorize((parse_rule(bad),), identity)
    assert authorize((parse_rule(bad), parse_rule(good)), identity)  # any alternative


def test_dns_wildcard_is_exactly_one_label(pki: PKI) -> None:
    cert = make_cert("dns", pki.inter, dns=("a.b.example.test",))
    identity = read_identity(cert.der, [pki.inter.der])
    assert not authorize((parse_rule({"san_dns": "*.example.test"}),), identity)
    assert authorize((parse_rule({"san_dns": "*.b.example.test"}),), identity)


def test_rules_fail_closed_without_an_identity() -> None:
    assert not authorize((parse_rule({"san_dns": "*.example.test"}),), None)
    assert authorize(None, None)  # no rules: every validated client


@pytest.mark.parametrize("raw, message", [
    ({}, "at least one key"),
    ({"fingerprint_sha256": "abc"}, "fingerprint_sha256: not a SHA-256 fingerprint"),
    ({"spki_sha256": "zz" * 32}, "spki_sha256: not a SHA-256 fingerprint"),
    ({"san_dns": "a.*.example.com"}, "san_dns: malformed DNS pattern"),
    ({"san_dns": "*"}, "san_dns: malformed DNS pattern"),
    ({"san_uri": "no-scheme/*"}, "san_uri: must be a URI pattern"),
    ({"subject": {"C": "US"}}, "subject.C: unknown attribute"),
    ({"subject": {"CN": "[ab]"}}, "subject.CN: character classes"),
    ({"email": "x"}, "email: unknown key"),
])
def test_rules_that_can_never_match_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(RuleError, match=message.replace("[", r"\[")):
        parse_rule(raw)


def test_check_config_names_the_bad_rule(pki: PKI) -> None:
    raw = {"listeners": [{
        "name": "public", "address": "127.0.0.1:8443",
        "tls": {"certificates": [{"cert_file": str(pki.server_cert),
                                  "key_file": str(pki.server_key)}]},
        "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:1",
                    "allow": [{"san_dns": "ok.example"}, {"fingerprint_sha256": "nope"}]}],
    }]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, pki.directory)
    assert info.value.problems == [
        "listeners[0].routes[0].allow[1]: fingerprint_sha256: not a SHA-256 fingerprint "
        "(64 hex digits): 'nope'"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_rule_kind_over_real_tls(harness: Harness, kind: str) -> None:
    good, bad = rules_for(harness.pki)[kind]
    echo = f"http://127.0.0.1:{harness.start_echo()}"
    harness.start(harness.config(routes=[
        {"path_prefix": "/allowed", "upstream": echo, "allow": [good]},
        {"path_prefix": "/refused", "upstream": echo, "allow": [bad]},
    ]))
    conn = harness.https()
    conn.request("GET", "/allowed/x")
    r = conn.getresponse()
    assert r.status == 200, r.read()
    r.read()
    conn.request("GET", "/refused/x")
    r = conn.getresponse()
    assert r.status == 403
    assert json.loads(r.read()) == {"message": "Forbidden", "reason": "unauthorized"}
    conn.request("GET", "/allowed/again")  # a refusal on one route keeps the connection
    assert conn.getresponse().status == 200
    conn.close()
    assert harness.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                          reason="unauthorized") == 1


def test_refusal_is_logged_with_the_rules(harness: Harness,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mtlsproxy.refusals")
    echo = f"http://127.0.0.1:{harness.start_echo()}"
    harness.start(harness.config(routes=[
        {"path_prefix": "/", "upstream": echo, "allow": [{"san_dns": "*.other.test"}]}]))
    assert harness.get("/")[0] == 403
    (record,) = [r for r in caplog.records if r.getMessage() == "client refused"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["reason"] == "unauthorized" and fields["listener"] == "public"
    assert "route /" in fields["detail"] and "san_dns=*.other.test" in fields["detail"]
    assert "CN=good-client" in fields["subject"]
