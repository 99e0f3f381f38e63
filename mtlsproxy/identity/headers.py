"""Certificate headers sent upstream, and the headers a client may never send; pure.

Public interface (exact names): RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain``,
Envoy's ``X-Forwarded-Client-Cert``, and the ``X-Client-Cert-*`` detail headers.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable

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
    return out
