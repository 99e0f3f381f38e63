"""PROXY protocol v1 and v2 headers (HAProxy's spec, proxy-protocol.txt); pure.

A load balancer with PROXY protocol on prefixes each connection with the client's real
address. ``parse`` takes the bytes received so far and returns None (need more), or
(bytes consumed, client address or None for LOCAL/UNKNOWN); anything else is refused.
``trusted_source`` says whether a socket peer may send such a header at all.
"""

from __future__ import annotations

import ipaddress
import re
import struct

from mtlsproxy.config.model import Networks
from mtlsproxy.errors import RemoteProtocolError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the spec's longest v1 line, CRLF included
_V1_ADDRESS = re.compile(r"[0-9A-Fa-f:.]{2,45}")



def trusted_source(host: str, sources: Networks) -> bool:
    """Whether the socket peer ``host`` (before any PROXY header) is in ``sources``.

    The header claims any address it likes, so only the balancer may send it: HAProxy's
    ``accept-proxy`` behind a ``tcp-request connection reject`` ACL, nginx's
    ``set_real_ip_from``. Fails closed: a host that does not parse is not trusted.
    - An IPv4-mapped peer (``::ffff:10.1.2.3``, RFC 4291 section 2.5.5.2, what a
      dual-stack socket reports for an IPv4 client) is compared as the IPv4 address it
      is: it matches 10.0.0.0/8, and an IPv6 entry such as ``::/0`` does not take in
      every IPv4 client by accident.
    - A scope id (``fe80::1%eth0``) is dropped: the entries name addresses, not
      interfaces (``ipaddress`` ignores it in a network test anyway; explicit here).
    """
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in sources)  # False across IP versions


def parse(buf: bytes) -> tuple[int, tuple[str, int] | None] | None:
    if buf.startswith(V2_SIGNATURE[:min(len(buf), 12)]) and buf[:1] == b"\r":
        return _v2(buf)
    if b"PROXY "[:min(len(buf), 6)] == buf[:6]:
        return _v1(buf)
    raise RemoteProtocolError("no PROXY protocol header")


def _v1(buf: bytes) -> tuple[int, tuple[str, int] | None] | None:
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) >= _V1_MAX:
            raise RemoteProtocolError("PROXY v1 header too long")
        return None
    parts = buf[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise RemoteProtocolError("malformed PROXY v1 header")
    # Addresses only (the spec's grammar: digits, hex, "." and ":"). ipaddress also takes
    # an IPv6 scope id of ANY bytes ("fe80::1%\nClient-Cert: ...") and str() keeps it: that
    # string becomes the client address written into X-Forwarded-For.
    if not (_V1_ADDRESS.fullmatch(parts[2]) and _V1_ADDRESS.fullmatch(parts[3])):
        raise RemoteProtocolError("malformed PROXY v1 addresses")
    try:
        src = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise RemoteProtocolError("malformed PROXY v1 addresses") from None
    if (src.version == 4) != (parts[1] == "TCP4") or not (0 <= sport <= 65535 and
                                                         0 <= dport <= 65535):
        raise RemoteProtocolError("malformed PROXY v1 addresses")
    return end + 2, (str(src), sport)


def _v2(buf: bytes) -> tuple[int, tuple[str, int] | None] | None:
    if len(buf) < 16:
        return None
    if buf[:12] != V2_SIGNATURE:
        raise RemoteProtocolError("bad PROXY v2 signature")
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack("!H", buf[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise RemoteProtocolError("unsupported PROXY protocol version")
    total = 16 + length
    if len(buf) < total:
        return None
    cmd = ver_cmd & 0x0F
    if cmd == 0:  # LOCAL: health checks from the balancer itself
        return total, None
    if cmd != 1:
        raise RemoteProtocolError("unknown PROXY v2 command")
    body = buf[16:total]
    if fam == 0x11 and length >= 12:  # TCP over IPv4
        return total, (str(ipaddress.IPv4Address(body[0:4])),
                       struct.unpack("!H", body[8:10])[0])
    if fam == 0x21 and length >= 36:  # TCP over IPv6
        return total, (str(ipaddress.IPv6Address(body[0:16])),
                       struct.unpack("!H", body[32:34])[0])
    if fam == 0x00:  # UNSPEC
        return total, None
    raise RemoteProtocolError("unsupported PROXY v2 address family")


# PROXY v2 TLV types (proxy-protocol.txt section 2.2) the proxy sends to upstreams.
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04


_DNS_NAME = re.compile(r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def build_v2(source: tuple[str, int], destination: tuple[str, int], *,
             tls_version: str | None = None, cipher: str | None = None,
             common_name: str | None = None, verified: bool = False,
             cert_on_connection: bool = False, authority: str | None = None) -> bytes:
    """A PROXY v2 header (command PROXY over TCP) with HAProxy's SSL TLVs: what
    ``send-proxy-v2-ssl-cn`` sends. ``verify`` is zero only for a certificate that was
    presented and verified (the spec's rule); the CN sub-TLV only when there is one.
    Addresses of two families (a dual-stack listener) are sent as IPv6, IPv4 mapped."""
    src, dst = ipaddress.ip_address(source[0].partition("%")[0]), \
        ipaddress.ip_address(destination[0].partition("%")[0])
    if src.version == dst.version == 4:
        family = 0x11  # TCP over IPv4
        addresses = src.packed + dst.packed
    else:
        family = 0x21  # TCP over IPv6
        addresses = b"".join(
            (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a).packed
            for a in (src, dst))
    addresses += struct.pack("!HH", source[1], destination[1])
    tlvs = b""
    if authority and _DNS_NAME.fullmatch(authority):
        # Only a DNS name (the SNI the client sent, RFC 6066 section 3): anything else a
        # client put there is left out rather than passed on for a service to believe.
        tlvs += _tlv(PP2_TYPE_AUTHORITY, authority.encode("ascii"))
    if tls_version is not None:
        client = PP2_CLIENT_SSL
        if verified:
            client |= PP2_CLIENT_CERT_SESS | (PP2_CLIENT_CERT_CONN if cert_on_connection
                                              else 0)
        sub = _tlv(PP2_SUBTYPE_SSL_VERSION, tls_version.encode("ascii"))
        if cipher:
            sub += _tlv(PP2_SUBTYPE_SSL_CIPHER, cipher.encode("ascii"))
        if common_name is not None:
            sub += _tlv(PP2_SUBTYPE_SSL_CN, common_name.encode("utf-8"))
        tlvs += _tlv(PP2_TYPE_SSL, struct.pack("!BI", client, 0 if verified else 1) + sub)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(body)) + body
