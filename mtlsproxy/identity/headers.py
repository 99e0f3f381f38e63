"""Certificate headers sent upstream, and the headers a client may never send; pure.

Public interface (exact names): RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain``,
Envoy's ``X-Forwarded-Client-Cert``, the ``X-Client-Cert-*`` detail headers, and, so that
an app written for another front end needs no change, the AWS Application Load Balancer's
``X-Amzn-Mtls-Clientcert-*`` and Traefik's ``X-Forwarded-Tls-Client-Cert(-Info)``
(docs/identity-headers.md gives each format and its source).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

from cryptography import x509
from cryptography.x509.oid import NameOID

from mtlsproxy.identity.peer import ClientIdentity

Header = tuple[bytes, bytes]

# Every certificate-identity header family of common proxies and load balancers, as
# FOLDED names start (``fold``): a backend that trusts any of them must only ever see the
# proxy's. Prefixes, so that each family's every member goes (the AWS load balancer's
# X-Amzn-Mtls-Clientcert-Serial-Number, GCP's X-Client-Cert-Chain-Verified, ...).
IDENTITY_PREFIXES = (
    b"client-cert",                  # RFC 9440: Client-Cert, Client-Cert-Chain (ours)
    b"x-client-cert",                # ours (X-Client-Cert-*), Google Cloud LB, Kong
    b"x-forwarded-client-cert",      # Envoy / Istio XFCC (ours)
    b"x-forwarded-tls-client-cert",  # Traefik's passTLSClientCert
    b"ssl-client",                   # nginx / Apache mod_ssl: SSL-Client-Cert, -Verify, -S-DN
    b"x-ssl-",                       # X-SSL-Cert, X-SSL-Client-* (nginx, HAProxy recipes)
    b"x-amzn-mtls-clientcert",       # the AWS load balancer's mTLS headers
    b"x-client-verify", b"x-client-dn", b"x-client-s-dn", b"x-client-i-dn",  # nginx recipes
    b"x-tls-client",                 # HAProxy recipes
    b"x-arr-clientcert",             # Azure App Service / ARR
    b"cf-client-cert",               # Cloudflare's client certificate forwarding
    b"l5d-client-id",                # Linkerd's mTLS identity
    b"wl-proxy-client-cert", b"wl-proxy-ssl",  # Oracle WebLogic's proxy plug-in
    b"$ws",                          # IBM WebSphere's plug-in ($WSCC, $WSIS, $WSRA, ...)
    b"proxy-auth-cert", b"proxy-ssl-id",  # Jetty's ForwardedRequestCustomizer
    b"x-forwarded-ssl-client",       # X-Forwarded-SSL-Client-Cert
    b"x-client-subject", b"x-client-issuer", b"x-client-crt",  # common recipes
    b"sslclientcert", b"sslclientcipher",  # Apache recipes without separators
)
# Whole names only (as prefixes they would take in unrelated headers).
IDENTITY_NAMES = frozenset({b"x-cert", b"x-client-certificate", b"x-ssl"})


def header_block(headers: Iterable[Header]) -> bytes:
    """Header lines, each ended by CRLF, ready to go into a head."""
    return b"".join(name + b": " + value + b"\r\n" for name, value in headers)


def fold(name: bytes) -> bytes:
    """A header name as WSGI, CGI, PHP and Rails read it: case and ``_``/``-`` folded."""
    return name.lower().replace(b"_", b"-")


def is_identity_header(name: bytes) -> bool:
    """True for any spelling of a certificate-identity header (``Client_Cert``,
    ``X-SSL-Client-S-DN``, ``x_amzn_mtls_clientcert_leaf``, ...)."""
    folded = fold(name)
    return folded.startswith(IDENTITY_PREFIXES) or folded in IDENTITY_NAMES


def _byte_sequence(der: bytes) -> bytes:
    # RFC 9440 section 2.1: a Structured Field Byte Sequence (RFC 8941 3.3.5), base64
    # between colons, of the DER certificate.
    return b":" + base64.b64encode(der) + b":"


def safe_value(text: str) -> bytes:
    """Visible ASCII only: anything else becomes an RFC 4514 style ``\\XX`` escape.

    Certificate fields are attacker-influenced (a CA may sign any subject); a CR or LF
    must never split a header.
    """
    out = bytearray()
    for ch in text.encode("utf-8"):
        if 0x20 <= ch < 0x7F:
            out.append(ch)
        else:
            out += b"\\%02X" % ch
    return bytes(out)


def _xfcc_quote(value: str) -> bytes:
    # Envoy quotes values that contain , ; = and escapes " inside them.
    return b'"' + safe_value(value).replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _rfc3339(t: dt.datetime) -> bytes:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()


def _xfcc_value(v: str) -> bytes:
    raw = safe_value(v)
    return _xfcc_quote(v) if any(c in raw for c in b',;="') else raw


# -- the AWS Application Load Balancer's verify-mode headers ------------------------------
# https://docs.aws.amazon.com/elasticloadbalancing/latest/application/mutual-authentication.html
# ("HTTP headers for verify mode"): serial "a hexadecimal representation" (example
# 03A5B1: upper case, whole bytes), issuer and subject "an RFC2253 string
# representation", validity "NotBefore=2023-09-21T01:50:17Z;NotAfter=...", leaf "a
# URL-encoded PEM format of the leaf certificate, with +=/ as safe characters".

def _alb_serial(serial: int) -> bytes:
    # As OpenSSL's BN_bn2hex writes it (and the documented example): upper-case hex of
    # the whole bytes, no separators, no DER sign byte.
    if serial == 0:
        return b"0"
    digits = b"%X" % abs(serial)
    return (b"-" if serial < 0 else b"") + (b"0" * (len(digits) % 2)) + digits


def _alb_leaf(der: bytes) -> bytes:
    # The PEM as OpenSSL/cryptography write it (64-column lines, LF endings), escaped with
    # +, = and / left as they are: AWS's words, and what backends behind ALB see (their
    # field reports: hashicorp/vault#31728, wso2/api-manager#5085). Only the PEM's space
    # and newlines change (%20, %0A); the base64 alphabet and "-" are never escaped.
    return quote(ssl.DER_cert_to_PEM_cert(der), safe="+=/").encode()


def _tlv(data: bytes, i: int) -> tuple[int, bytes, int]:
    """(tag, contents, end) of the DER element at ``data[i]``."""
    tag, n = data[i], data[i + 1]
    i += 2
    if n & 0x80:
        width = n & 0x7F
        n = int.from_bytes(data[i:i + width], "big")
        i += width
    if i + n > len(data):
        raise ValueError("truncated DER")
    return tag, data[i:i + n], i + n


def _oid(contents: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for b in contents:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _issuer_and_subject(cert_der: bytes) -> tuple[bytes, bytes]:
    """The issuer and subject Names exactly as the certificate encodes them (RFC 5280
    4.1: TBSCertificate = version [0] optional, serial, signature, issuer, validity,
    subject): a re-encoding could reorder or re-type what OpenSSL would print."""
    _, cert, _ = _tlv(cert_der, 0)
    _, tbs, _ = _tlv(cert, 0)
    tag, _, i = _tlv(tbs, 0)
    i = i if tag == 0xA0 else 0
    for _skip in range(2):  # serialNumber, signature
        i = _tlv(tbs, i)[2]
    start, i = i, _tlv(tbs, i)[2]
    issuer = tbs[start:i]
    i = _tlv(tbs, i)[2]  # validity
    start, i = i, _tlv(tbs, i)[2]
    return issuer, tbs[start:i]


# OpenSSL's short names (crypto/objects/objects.txt) for the attribute types a DN holds;
# any other type OpenSSL prints as the dotted OID with the value's DER in hex.
_SHORT_NAMES = {
    "2.5.4.3": "CN", "2.5.4.4": "SN", "2.5.4.5": "serialNumber", "2.5.4.6": "C",
    "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.9": "street", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.12": "title", "2.5.4.13": "description", "2.5.4.15": "businessCategory",
    "2.5.4.17": "postalCode", "2.5.4.20": "telephoneNumber", "2.5.4.41": "name",
    "2.5.4.42": "GN", "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier", "2.5.4.45": "x500UniqueIdentifier",
    "2.5.4.46": "dnQualifier", "2.5.4.65": "pseudonym", "2.5.4.72": "role",
    "2.5.4.97": "organizationIdentifier",
    "1.2.840.113549.1.9.1": "emailAddress", "1.2.840.113549.1.9.2": "unstructuredName",
    "0.9.2342.19200300.100.1.1": "UID", "0.9.2342.19200300.100.1.25": "DC",
    "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL", "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST",
    "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
}
# Bytes per character of each string type OpenSSL prints as text (crypto/asn1/a_strex.c
# tag2nbyte); 0 is UTF8String, printed byte by byte. Any other type is dumped as #hex.
_CHAR_WIDTH = {12: 0, 18: 1, 19: 1, 20: 1, 22: 1, 23: 1, 24: 1, 26: 1, 28: 4, 30: 2}
_RFC2253_SPECIALS = frozenset(b',+"\\<>;')


def _rfc2253_value(tag: int, contents: bytes) -> str | None:
    """One attribute value as OpenSSL's ASN1_STRFLGS_RFC2253 prints it (a_strex.c do_buf
    and do_esc_char): each character as UTF-8, with , + " \\ < > ; behind a backslash,
    a leading space or #, and a trailing space, behind one too, and control characters
    and every byte above 0x7E as \\XX. So the value is visible ASCII, whatever the CA put
    in. None: not a string OpenSSL prints (it dumps it instead)."""
    width = _CHAR_WIDTH.get(tag)
    if width is None or (width and len(contents) % width):
        return None
    if width == 0:
        chars = [bytes([b]) for b in contents]
    else:
        try:
            chars = [chr(int.from_bytes(contents[i:i + width], "big")).encode(
                "utf-8", "surrogatepass") for i in range(0, len(contents), width)]
        except (ValueError, OverflowError):  # beyond U+10FFFF: OpenSSL fails, we dump
            return None
    out: list[str] = []
    last = len(chars) - 1
    for pos, char in enumerate(chars):
        for b in char:
            if b < 0x20 or b >= 0x7F:
                out.append(f"\\{b:02X}")
            elif (b in _RFC2253_SPECIALS or (b == 0x20 and pos in (0, last))
                  or (b == 0x23 and pos == 0)):
                out.append("\\" + chr(b))
            else:
                out.append(chr(b))
    return "".join(out)


def _rfc2253(name_der: bytes) -> bytes:
    """A Name as ``X509_NAME_print_ex(..., XN_FLAG_RFC2253)`` (``openssl x509 -nameopt
    RFC2253``) prints it: the RDNs last first, "," between them and "+" inside a
    multi-valued one, short names, unknown types as ``OID=#<DER hex>``."""
    _, rdns, _ = _tlv(name_der, 0)
    entries: list[tuple[int, str]] = []
    i = 0
    while i < len(rdns):
        _, rdn, i = _tlv(rdns, i)
        j = 0
        while j < len(rdn):
            _, ava, j = _tlv(rdn, j)
            _, oid, k = _tlv(ava, 0)
            tag, contents, end = _tlv(ava, k)
            dotted = _oid(oid)
            short = _SHORT_NAMES.get(dotted)
            text = _rfc2253_value(tag, contents) if short else None
            if text is None:
                text = "#" + ava[k:end].hex().upper()
            entries.append((i, f"{short or dotted}={text}"))  # i: which RDN
    out: list[str] = []
    prev: int | None = None
    for rdn_id, text in reversed(entries):
        if out:
            out.append("+" if rdn_id == prev else ",")
        out.append(text)
        prev = rdn_id
    return safe_value("".join(out))


def _alb_dn(identity: ClientIdentity, which: int) -> bytes:
    try:
        return _rfc2253(_issuer_and_subject(identity.leaf_der)[which])
    except (IndexError, ValueError):
        # cryptography parsed this certificate, so its DER walks; should a form this
        # walker does not know come along, the RFC 4514 text is the nearest thing.
        return safe_value(identity.issuer if which == 0 else identity.subject)


# -- Traefik's passTLSClientCert ------------------------------------------------------------
# https://doc.traefik.io/traefik/middlewares/http/passtlsclientcert/ and its source,
# pkg/middlewares/passtlsclientcert/pass_tls_client_cert.go (traefik/traefik, v3).

def _traefik_dn(name: x509.Name, with_ou: bool) -> str:
    # getSubjectDNInfo / getIssuerDNInfo with every option on: DC (every one, in
    # certificate order), then C, ST, L, O, OU (subject only: the issuer has no OU
    # option) as Go's pkix.Name lists them, then SN and CN, single-valued in Go (the
    # last one in the certificate wins). Empty values are left out (writePart), but not
    # DCs; values are not escaped (traefik/traefik#11309): the whole header is, below.
    attrs = [a for a in name if isinstance(a.value, str)]

    def values(oid: x509.ObjectIdentifier) -> list[str]:
        return [str(a.value) for a in attrs if a.oid == oid]
    parts = [f"DC={v}" for v in values(NameOID.DOMAIN_COMPONENT)]
    lists = [("C", NameOID.COUNTRY_NAME), ("ST", NameOID.STATE_OR_PROVINCE_NAME),
             ("L", NameOID.LOCALITY_NAME), ("O", NameOID.ORGANIZATION_NAME)]
    if with_ou:
        lists.append(("OU", NameOID.ORGANIZATIONAL_UNIT_NAME))
    for key, oid in lists:
        parts += [f"{key}={v}" for v in values(oid) if v]
    for key, oid in (("SN", NameOID.SERIAL_NUMBER), ("CN", NameOID.COMMON_NAME)):
        single = values(oid)
        if single and single[-1]:
            parts.append(f"{key}={single[-1]}")
    return ",".join(parts)


def _go_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network
           | ipaddress.IPv6Network) -> str:
    # Go's net.IP.String: an IPv4-mapped IPv6 address prints as dotted IPv4.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _traefik_info(leaf: x509.Certificate) -> bytes:
    # getCertInfo: Subject, Issuer, SerialNumber (decimal), NB and NA (Unix seconds, as
    # uint64), SAN (DNS names, then e-mail addresses, then IPs, then URIs), each as
    # Key="value", joined by ";"; the whole string through Go's url.QueryEscape, which
    # quote_plus matches (space as +, all but A-Z a-z 0-9 - _ . ~ as upper-case %XX).
    fields: list[str] = []
    subject = _traefik_dn(leaf.subject, with_ou=True)
    if subject:
        fields.append(f'Subject="{subject}"')
    issuer = _traefik_dn(leaf.issuer, with_ou=False)
    if issuer:
        fields.append(f'Issuer="{issuer}"')
    fields.append(f'SerialNumber="{leaf.serial_number}"')
    fields.append(f'NB="{int(leaf.not_valid_before_utc.timestamp()) % 2 ** 64}"')
    fields.append(f'NA="{int(leaf.not_valid_after_utc.timestamp()) % 2 ** 64}"')
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans: list[str] = []
    else:
        sans = [*san.get_values_for_type(x509.DNSName),
                *san.get_values_for_type(x509.RFC822Name),
                *(_go_ip(ip) for ip in san.get_values_for_type(x509.IPAddress)),
                *san.get_values_for_type(x509.UniformResourceIdentifier)]
    if sans:
        fields.append(f'SAN="{",".join(sans)}"')
    return quote_plus(";".join(fields).encode("utf-8", "surrogatepass"), safe="").encode()


def render(identity: ClientIdentity, families: Iterable[str]) -> list[Header]:
    """The headers to add upstream for ``identity``, rendered once and cached."""
    out: list[Header] = []
    fams = set(families)
    if "rfc9440" in fams:
        out.append((b"Client-Cert", _byte_sequence(identity.leaf_der)))
        if identity.chain_der:
            out.append((b"Client-Cert-Chain",
                        b", ".join(_byte_sequence(d) for d in identity.chain_der)))
    if "xfcc" in fams:
        parts = [b"Hash=" + identity.fingerprint_sha256.encode(),
                 b"Subject=" + _xfcc_quote(identity.subject)]
        parts += [b"URI=" + _xfcc_value(u) for u in identity.san_uri]
        parts += [b"DNS=" + _xfcc_value(d) for d in identity.san_dns]
        out.append((b"X-Forwarded-Client-Cert", b";".join(parts)))
    if "details" in fams:
        out += [
            (b"X-Client-Cert-Subject", safe_value(identity.subject)),
            (b"X-Client-Cert-Issuer", safe_value(identity.issuer)),
            (b"X-Client-Cert-Serial", identity.serial_hex.encode()),
            (b"X-Client-Cert-Not-Before", _rfc3339(identity.not_before)),
            (b"X-Client-Cert-Not-After", _rfc3339(identity.not_after)),
            (b"X-Client-Cert-Fingerprint-SHA256", identity.fingerprint_sha256.encode()),
        ]
        if identity.san_dns:
            out.append((b"X-Client-Cert-SAN-DNS", safe_value(",".join(identity.san_dns))))
        if identity.san_uri:
            out.append((b"X-Client-Cert-SAN-URI", safe_value(",".join(identity.san_uri))))
    if "alb" in fams:
        out += [
            (b"X-Amzn-Mtls-Clientcert-Serial-Number", _alb_serial(identity.leaf.serial_number)),
            (b"X-Amzn-Mtls-Clientcert-Issuer", _alb_dn(identity, 0)),
            (b"X-Amzn-Mtls-Clientcert-Subject", _alb_dn(identity, 1)),
            (b"X-Amzn-Mtls-Clientcert-Validity", b"NotBefore=" + _rfc3339(identity.not_before)
             + b";NotAfter=" + _rfc3339(identity.not_after)),
            (b"X-Amzn-Mtls-Clientcert-Leaf", _alb_leaf(identity.leaf_der)),
        ]
    if "traefik" in fams:
        # pem: the base64 of each certificate the client sent, without the PEM lines and
        # newlines, joined by "," and not URL-escaped since Traefik v2.9.4
        # (traefik/traefik#9379). The leaf alone here: a verdict is cached per leaf, and
        # the chain the proxy verified is the truststore's, not what the client sent.
        out += [
            (b"X-Forwarded-Tls-Client-Cert", base64.b64encode(identity.leaf_der)),
            (b"X-Forwarded-Tls-Client-Cert-Info", _traefik_info(identity.leaf)),
        ]
    return out
