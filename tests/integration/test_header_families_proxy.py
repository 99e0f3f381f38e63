"""The ``alb`` and ``traefik`` header families through the real proxy, on both parsers and
both loops: the upstream sees the proxy's values only, once each, whatever the client sent.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import unquote, unquote_plus

import pytest
from cryptography import x509

from mtlsproxy.config import FORWARD_FAMILIES, parse_config
from mtlsproxy.errors import ConfigError
from tests.support.harness import Harness
from tests.support.pki import PKI

ALB = ("X-Amzn-Mtls-Clientcert-Serial-Number", "X-Amzn-Mtls-Clientcert-Issuer",
       "X-Amzn-Mtls-Clientcert-Subject", "X-Amzn-Mtls-Clientcert-Validity",
       "X-Amzn-Mtls-Clientcert-Leaf")
TRAEFIK = ("X-Forwarded-Tls-Client-Cert", "X-Forwarded-Tls-Client-Cert-Info")
FORGED = "forged-by-the-client"


def spellings(name: str) -> list[str]:
    """The spellings a WSGI, CGI, PHP or Rails backend reads as the same header."""
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(name.lower()))
    return [name, name.upper(), name.lower(), name.replace("-", "_"),
            name.lower().replace("-", "_"), mixed.replace("-", "_", 2)]


def forged() -> dict[str, str]:
    # The passthrough header (X-Amzn-Mtls-Clientcert) too: same family prefix.
    return {s: FORGED for name in (*ALB, *TRAEFIK, "X-Amzn-Mtls-Clientcert")
            for s in spellings(name)}


def seen(h: Harness, headers: dict[str, str]) -> dict[str, list[str]]:
    status, _, body = h.get("/", headers=headers)
    assert status == 200, body
    out: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    assert not [n for n, vs in out.items() if any(FORGED in v for v in vs)], out
    # Each one reached the proxy and was dropped there as an identity header.
    assert h.metric("mtlsproxy_headers_dropped_total", listener="public",
                    reason="identity") == len(headers)
    return out


def start(h: Harness, families: list[str] | None) -> None:
    mtls: dict[str, object] = {"truststore_uri": str(h.pki.truststore)}
    if families is not None:
        mtls["forward_client_cert"] = families
    # "allow": the underscore spellings are not dropped as underscores, so it is the
    # identity-header rule that must drop them.
    h.start(h.config(mutual_tls=mtls, top={"headers_with_underscores": "allow"}))


def test_with_the_families_on_the_upstream_sees_only_the_proxys_values(
        unstarted: Harness) -> None:
    h = unstarted
    start(h, ["alb", "traefik"])
    hdrs = seen(h, forged())
    for name in (*ALB, *TRAEFIK):
        assert len(hdrs[name.lower()]) == 1, name
    # Nothing but the two families' own names (and none of the default families').
    assert sorted(n for n in hdrs if n.startswith(("x-amzn", "x-forwarded-tls",
                                                    "client-cert", "x-client-cert"))) == \
        sorted(n.lower() for n in (*ALB, *TRAEFIK))
    client = h.pki.client.cert
    der = h.pki.client.der
    one = {name: hdrs[name.lower()][0] for name in (*ALB, *TRAEFIK)}
    serial = f"{client.serial_number:X}"
    assert one["X-Amzn-Mtls-Clientcert-Serial-Number"] == "0" * (len(serial) % 2) + serial
    assert one["X-Amzn-Mtls-Clientcert-Subject"] == "CN=good-client,O=mtlsproxy tests"
    assert one["X-Amzn-Mtls-Clientcert-Issuer"] == client.issuer.rfc4514_string()
    assert one["X-Amzn-Mtls-Clientcert-Validity"] == (
        f"NotBefore={client.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ};"
        f"NotAfter={client.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    leaf = one["X-Amzn-Mtls-Clientcert-Leaf"]
    assert "%2B" not in leaf and "%2F" not in leaf and "%3D" not in leaf
    assert x509.load_pem_x509_certificate(unquote(leaf).encode()) == client
    assert base64.b64decode(one["X-Forwarded-Tls-Client-Cert"], validate=True) == der
    info = unquote_plus(one["X-Forwarded-Tls-Client-Cert-Info"])
    assert info.startswith('Subject="O=mtlsproxy tests,CN=good-client";Issuer="')
    assert f';SerialNumber="{client.serial_number}";' in info
    assert f';NB="{int(client.not_valid_before_utc.timestamp())}";' in info
    assert info.endswith(
        ';SAN="client.example.test,spiffe://prod.example.test/ns/payments/sa/api"')


@pytest.mark.parametrize("families", [[], None, ["rfc9440", "xfcc", "details"]])
def test_with_the_families_off_no_spelling_of_their_headers_reaches_the_upstream(
        unstarted: Harness, families: list[str] | None) -> None:
    h = unstarted
    start(h, families)  # None: the key left out, the default families
    hdrs = seen(h, forged())
    assert not [n for n in hdrs if n.replace("_", "-").startswith(
        ("x-amzn-mtls", "x-forwarded-tls-client-cert"))], hdrs
    assert ("client-cert" in hdrs) == (families != [])


def test_forward_client_cert_accepts_the_new_families_and_names_them_in_errors(
        pki: PKI) -> None:
    def listener(families: list[str]) -> dict[str, object]:
        return {"listeners": [{
            "name": "public", "address": "127.0.0.1:8443",
            "tls": {"security_policy": "TLS_1_2", "certificates": [
                {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}]},
            "mutual_tls": {"truststore_uri": str(pki.truststore),
                           "forward_client_cert": families},
            "routes": [{"path_prefix": "/", "upstream": "http://127.0.0.1:8080"}]}]}
    config = parse_config(listener(["alb", "traefik"]), pki.directory)
    assert config.listeners[0].mutual_tls.forward_client_cert == ("alb", "traefik")
    with pytest.raises(ConfigError) as info:
        parse_config(listener(["envoy"]), pki.directory)
    assert any(f"allowed: {', '.join(FORWARD_FAMILIES)}" in p for p in info.value.problems)
    assert "alb, traefik" in ", ".join(FORWARD_FAMILIES)
