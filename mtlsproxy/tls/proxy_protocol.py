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
