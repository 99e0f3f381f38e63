"""Who is calling: the client certificate mtlsproxy forwards, read strictly.

Framework-neutral; starlette_mtls.py and flask_mtls.py attach it to requests.

The headers mean something only on a request that came from the proxy. mtlsproxy removes
every spelling of them from what clients send (docs/security.md), so through the proxy
they are always its own; a request that reaches the app another way carries whatever its
sender wrote (RFC 9440 section 4). So mtlsproxy runs as a sidecar, the app listens on
loopback (or a unix socket) only, and the headers count only from TRUSTED_PEERS.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509

# The sidecar's addresses. Add "unix" when the app listens on a unix socket only: whoever
# may open the socket file is then trusted.
TRUSTED_PEERS = frozenset({"127.0.0.1", "::1"})


class BadClientCert(ValueError):
    """A certificate header from a trusted peer that does not parse: refuse the request."""


@dataclass(frozen=True)
class ClientIdentity:
    subject: str  # RFC 4514, e.g. "CN=billing-1,O=Example Corp"
    fingerprint_sha256: str  # lowercase hex SHA-256 of the leaf certificate's DER
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]


def peer_name(address: str | None) -> str:
    """The socket peer as TRUSTED_PEERS names it: an IP address, or "unix" for what
    servers report on a unix socket (uvicorn None, gunicorn "", werkzeug "<local>")."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return "unix"
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)  # a dual-stack socket reports 127.0.0.1 as ::ffff:127.0.0.1


# RFC 9440 section 2.2: Client-Cert is one RFC 8941 Byte Sequence (section 3.3.5), the
# base64 DER of the leaf between colons; a singleton, never a list nor repeated.
# mtlsproxy sends no parameters, so anything after the closing colon is refused.
_BYTE_SEQUENCE = re.compile(r":([A-Za-z0-9+/]+={0,2}):")


def parse_client_cert(value: str) -> ClientIdentity:
    match = _BYTE_SEQUENCE.fullmatch(value.strip(" "))
    if match is None:
        raise BadClientCert("Client-Cert is not one byte sequence")
    try:
        der = base64.b64decode(match[1], validate=True)
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns, uris = san.get_values_for_type(x509.DNSName), san.get_values_for_type(
                x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            dns, uris = [], []
        subject = cert.subject.rfc4514_string()
    except ValueError as exc:  # binascii.Error, a DER or extension that does not parse
        raise BadClientCert(f"Client-Cert is not a DER certificate: {exc}") from None
    return ClientIdentity(subject, hashlib.sha256(der).hexdigest(), tuple(dns), tuple(uris))


# Envoy's X-Forwarded-Client-Cert, https://www.envoyproxy.io/docs/envoy/latest/
# configuration/http/http_conn_man/headers#x-forwarded-client-cert : elements separated
# by "," (one per proxy); in one, Key=value pairs separated by ";"; a value holding , ; or =
# is double-quoted, with \" for a quote (mtlsproxy also writes \\ for a backslash).
# mtlsproxy sends one element of Hash, Subject, URI and DNS; anything else is not its.
_XFCC_PAIR = re.compile(r'([A-Za-z]+)=("(?:[^"\\]|\\["\\])*"|[^",;=]*)(;|,|\Z)')
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def parse_xfcc(value: str) -> ClientIdentity:
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(value):
        m = _XFCC_PAIR.match(value, pos)
        if m is None or m[3] == "," or (m[3] == ";" and m.end() == len(value)):
            raise BadClientCert("X-Forwarded-Client-Cert is not one element of Key=value")
        raw = m[2]
        text = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        pairs.append((m[1].lower(), text))
        pos = m.end()
    keys = [k for k, _ in pairs]
    fields = dict(pairs)
    if (keys.count("hash") != 1 or keys.count("subject") > 1
            or not set(keys) <= {"hash", "subject", "uri", "dns"}
            or not _SHA256_HEX.fullmatch(fields["hash"])):
        raise BadClientCert("X-Forwarded-Client-Cert: want one Hash, Subject, URI, DNS")
    return ClientIdentity(fields.get("subject", ""), fields["hash"],
                          tuple(v for k, v in pairs if k == "dns"),
                          tuple(v for k, v in pairs if k == "uri"))


def identity_from_headers(peer: str, trusted: frozenset[str], client_cert: list[str],
                          xfcc: list[str]) -> ClientIdentity | None:
    """The caller's identity from each header's values; None from an untrusted peer or
    without the headers. Both headers present must name the same certificate."""
    if peer not in trusted or not (client_cert or xfcc):
        return None
    if len(client_cert) > 1 or len(xfcc) > 1:
        raise BadClientCert("a certificate header came more than once")
    identity = parse_client_cert(client_cert[0]) if client_cert else None
    if xfcc:
        told = parse_xfcc(xfcc[0])
        if identity is not None and told.fingerprint_sha256 != identity.fingerprint_sha256:
            raise BadClientCert("Client-Cert and X-Forwarded-Client-Cert disagree")
        identity = identity or told
    return identity
