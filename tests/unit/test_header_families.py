"""The ``alb`` and ``traefik`` header families, byte for byte, for certificates built here.

Expected values are written out from the front ends' documentation (docs/identity-headers.md
cites it): the AWS load balancer's verify-mode headers and Traefik's passTLSClientCert.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, unquote_plus

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from mtlsproxy.config import FORWARD_FAMILIES, MutualTLSConfig
from mtlsproxy.identity.headers import Header, render
from mtlsproxy.identity.peer import read_identity
from tests.support.tools import require_tool

UTC = dt.UTC
A = x509.NameAttribute
RDN = x509.RelativeDistinguishedName
# A fixed Ed25519 key: its signatures are deterministic, so the whole certificate is.
KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOT_BEFORE = dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
NOT_AFTER = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

SUBJECT = x509.Name([
    RDN([A(NameOID.DOMAIN_COMPONENT, "org")]),
    RDN([A(NameOID.DOMAIN_COMPONENT, "example")]),
    RDN([A(NameOID.COUNTRY_NAME, "CH")]),
    RDN([A(NameOID.STATE_OR_PROVINCE_NAME, "Zürich")]),
    RDN([A(NameOID.LOCALITY_NAME, "Zürich")]),
    RDN([A(NameOID.ORGANIZATION_NAME, 'Müller, "Söhne" & Co')]),
    RDN([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Payments")]),
    RDN([A(NameOID.COMMON_NAME, "api; client")]),
])
ISSUER = x509.Name([
    RDN([A(NameOID.COUNTRY_NAME, "CH")]),
    RDN([A(NameOID.ORGANIZATION_NAME, "Example CA")]),
    RDN([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Issuing")]),
    RDN([A(NameOID.COMMON_NAME, "Example Issuing CA 1")]),
])
SANS = [x509.DNSName("api.example.org"), x509.DNSName("*.api.example.org"),
        x509.UniformResourceIdentifier("spiffe://example.org/ns/pay/sa/api"),
        x509.RFC822Name("ops@example.org"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::7"))]


def make(subject: x509.Name = SUBJECT, issuer: x509.Name = ISSUER,
         serial: int = 0x03A5B1, sans: list[x509.GeneralName] | None = None
         ) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(KEY.public_key()).serial_number(serial)
         .not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER))
    b = b.add_extension(x509.SubjectAlternativeName(SANS if sans is None else sans), False)
    return b.sign(KEY, None)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def headers(cert: x509.Certificate, *families: str) -> dict[str, str]:
    out: list[Header] = render(read_identity(der(cert), []), families)
    assert len({n.lower() for n, _ in out}) == len(out)  # one of each
    return {n.decode(): v.decode("ascii") for n, v in out}


def test_alb_headers_byte_for_byte() -> None:
    cert = make()
    h = headers(cert, "alb")
    assert list(h) == ["X-Amzn-Mtls-Clientcert-Serial-Number", "X-Amzn-Mtls-Clientcert-Issuer",
                       "X-Amzn-Mtls-Clientcert-Subject", "X-Amzn-Mtls-Clientcert-Validity",
                       "X-Amzn-Mtls-Clientcert-Leaf"]
    # AWS's own example serial is 03A5B1: upper case, whole bytes.
    assert h["X-Amzn-Mtls-Clientcert-Serial-Number"] == "03A5B1"
    assert h["X-Amzn-Mtls-Clientcert-Issuer"] == (
        "CN=Example Issuing CA 1,OU=Issuing,O=Example CA,C=CH")
    assert h["X-Amzn-Mtls-Clientcert-Subject"] == (
        "CN=api\\; client,OU=Payments,O=M\\C3\\BCller\\, \\\"S\\C3\\B6hne\\\" & Co,"
        "L=Z\\C3\\BCrich,ST=Z\\C3\\BCrich,C=CH,DC=example,DC=org")
    assert h["X-Amzn-Mtls-Clientcert-Validity"] == (
        "NotBefore=2024-03-01T12:00:00Z;NotAfter=2026-03-01T12:00:00Z")
    # The PEM with its spaces and newlines escaped and nothing else: + = / stay as they are.
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert "+" in pem and "/" in pem and "=" in pem  # this certificate has all three
    leaf = h["X-Amzn-Mtls-Clientcert-Leaf"]
    assert leaf == pem.replace(" ", "%20").replace("\n", "%0A")
    assert leaf.startswith("-----BEGIN%20CERTIFICATE-----%0AMII")
    assert leaf.endswith("%0A-----END%20CERTIFICATE-----%0A")
    assert x509.load_pem_x509_certificate(unquote(leaf).encode()) == cert


@pytest.mark.parametrize("serial, text", [
    (0x03A5B1, "03A5B1"), (0x8A5B1, "08A5B1"), (0xFF, "FF"), (1, "01"),
    (0x5C6F6200B9C837C922A4EA00103B772C541D482C, "5C6F6200B9C837C922A4EA00103B772C541D482C"),
    (0x80000000000000000000000000000000000001, "80000000000000000000000000000000000001"),
])
def test_alb_serial_is_upper_case_hex_of_whole_bytes(serial: int, text: str) -> None:
    assert headers(make(serial=serial), "alb")["X-Amzn-Mtls-Clientcert-Serial-Number"] == text


def test_alb_dn_escapes_as_openssls_rfc2253_printer() -> None:
    subject = x509.Name([
        RDN([A(NameOID.COMMON_NAME, " #lead\\<in>+out# ")]),
        RDN([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "a"), A(NameOID.USER_ID, "b")]),  # one RDN
        RDN([A(NameOID.EMAIL_ADDRESS, "ops@example.org")]),
        RDN([A(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), "x")]),  # a type OpenSSL lacks
        RDN([A(NameOID.LOCALITY_NAME, "Genève", _type=_ASN1Type.BMPString)]),
        RDN([A(NameOID.STATE_OR_PROVINCE_NAME, "Zürich", _type=_ASN1Type.UniversalString)]),
    ])
    got = headers(make(subject=subject), "alb")["X-Amzn-Mtls-Clientcert-Subject"]
    assert got == ("ST=Z\\C3\\BCrich,L=Gen\\C3\\A8ve,1.3.6.1.4.1.99999.1=#0C0178,"
                   "emailAddress=ops@example.org,UID=b+OU=a,"
                   "CN=\\ #lead\\\\\\<in\\>\\+out#\\ ")


def test_alb_dn_matches_the_openssl_cli(tmp_path: Path) -> None:
    require_tool("openssl", "openssl")
    subject = x509.Name([*SUBJECT.rdns, RDN([A(NameOID.COMMON_NAME, "x\r\nX-Evil: 1 ")]),
                         RDN([A(NameOID.COMMON_NAME, " #lead\\<in>+out# ")]),
                         RDN([A(NameOID.TITLE, "#a", _type=_ASN1Type.BMPString),
                              A(NameOID.USER_ID, "b")]),
                         RDN([A(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), "x")])])
    cert = make(subject=subject)
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "c.pem"), "-noout",
                          "-nameopt", "RFC2253", "-issuer", "-subject", "-serial"],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    h = headers(cert, "alb")
    assert out == ["issuer=" + h["X-Amzn-Mtls-Clientcert-Issuer"],
                   "subject=" + h["X-Amzn-Mtls-Clientcert-Subject"],
                   "serial=" + h["X-Amzn-Mtls-Clientcert-Serial-Number"]]


def test_traefik_headers_byte_for_byte() -> None:
    cert = make()
    h = headers(cert, "traefik")
    assert list(h) == ["X-Forwarded-Tls-Client-Cert", "X-Forwarded-Tls-Client-Cert-Info"]
    # pem: the PEM body without its BEGIN/END lines and newlines, not URL-escaped (v2.9.4+).
    assert h["X-Forwarded-Tls-Client-Cert"] == base64.b64encode(der(cert)).decode()
    info = h["X-Forwarded-Tls-Client-Cert-Info"]
    # Go's url.QueryEscape of the whole; values inside are not escaped (Traefik's own).
    assert info == (
        "Subject%3D%22DC%3Dorg%2CDC%3Dexample%2CC%3DCH%2CST%3DZ%C3%BCrich%2CL%3DZ%C3%BCrich"
        "%2CO%3DM%C3%BCller%2C+%22S%C3%B6hne%22+%26+Co%2COU%3DPayments%2CCN%3Dapi%3B+client%22"
        "%3BIssuer%3D%22C%3DCH%2CO%3DExample+CA%2CCN%3DExample+Issuing+CA+1%22"
        "%3BSerialNumber%3D%22239025%22"
        "%3BNB%3D%221709294400%22%3BNA%3D%221772366400%22"
        "%3BSAN%3D%22api.example.org%2C%2A.api.example.org%2Cops%40example.org"
        "%2C192.0.2.7%2C2001%3Adb8%3A%3A7%2Cspiffe%3A%2F%2Fexample.org%2Fns%2Fpay%2Fsa%2Fapi%22")
    assert unquote_plus(info) == (
        'Subject="DC=org,DC=example,C=CH,ST=Zürich,L=Zürich,O=Müller, "Söhne" & Co,'
        'OU=Payments,CN=api; client";Issuer="C=CH,O=Example CA,CN=Example Issuing CA 1";'
        'SerialNumber="239025";NB="1709294400";NA="1772366400";'
        'SAN="api.example.org,*.api.example.org,ops@example.org,192.0.2.7,2001:db8::7,'
        'spiffe://example.org/ns/pay/sa/api"')


def test_traefik_info_follows_go_pkix_name_and_net_ip() -> None:
    subject = x509.Name([
        RDN([A(NameOID.COMMON_NAME, "first")]),
        RDN([A(NameOID.ORGANIZATION_NAME, "O1")]),
        RDN([A(NameOID.SERIAL_NUMBER, "42")]),
        RDN([A(NameOID.ORGANIZATION_NAME, "O2")]),
        RDN([A(NameOID.COMMON_NAME, "second")]),  # Go keeps the last CN
    ])
    issuer = x509.Name([RDN([A(NameOID.ORGANIZATIONAL_UNIT_NAME, "not in Issuer")]),
                        RDN([A(NameOID.COMMON_NAME, "CA")])])
    cert = make(subject=subject, issuer=issuer,
                sans=[x509.IPAddress(ipaddress.ip_address("::ffff:10.0.0.1"))])
    info = unquote_plus(headers(cert, "traefik")["X-Forwarded-Tls-Client-Cert-Info"])
    assert info == ('Subject="O=O1,O=O2,SN=42,CN=second";Issuer="CN=CA";'
                    'SerialNumber="239025";NB="1709294400";NA="1772366400";SAN="10.0.0.1"')
    no_sans = make(sans=[])
    assert "SAN=" not in unquote_plus(headers(no_sans, "traefik")[
        "X-Forwarded-Tls-Client-Cert-Info"])


VISIBLE = re.compile(r"[\x20-\x7e]*\Z")


def test_control_bytes_from_the_certificate_never_reach_a_header_value() -> None:
    hostile = "evil\r\nX-Amzn-Mtls-Clientcert-Subject: CN=admin\x00\x7f\u2028"
    subject = x509.Name([RDN([A(NameOID.COMMON_NAME, hostile)]),
                         RDN([A(NameOID.ORGANIZATION_NAME, hostile)])])
    cert = make(subject=subject, issuer=subject,
                sans=[x509.UniformResourceIdentifier("spiffe://x/\x7f")])
    out = render(read_identity(der(cert), []), FORWARD_FAMILIES)
    for name, value in out:
        assert VISIBLE.match(value.decode("latin-1")), (name, value)
    h = {n.decode(): v.decode() for n, v in out}
    assert h["X-Amzn-Mtls-Clientcert-Subject"].startswith(
        "O=evil\\0D\\0AX-Amzn-Mtls-Clientcert-Subject: CN=admin\\00\\7F\\E2\\80\\A8,")
    assert "%0D%0A" in h["X-Forwarded-Tls-Client-Cert-Info"]


def test_families_are_opt_in_and_the_default_is_unchanged() -> None:
    assert FORWARD_FAMILIES == ("rfc9440", "xfcc", "details", "alb", "traefik")
    assert MutualTLSConfig().forward_client_cert == ("rfc9440", "xfcc", "details")
    h = headers(make(), "rfc9440", "xfcc", "details")
    assert not [n for n in h if n.startswith(("X-Amzn", "X-Forwarded-Tls"))]
    assert len(headers(make(), *FORWARD_FAMILIES)) == len(h) + 7
