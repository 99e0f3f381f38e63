"""The SNI name of a TLS ClientHello, read before OpenSSL sees it; pure (no sockets).

Why: a listener's domains each have their own certificates, security policy and
truststore, and a handshake must run under its domain's context from its first byte.
OpenSSL's SNI callback comes too late for that: by then the protocol version is chosen and
the verify mode and session cache of the first context are kept (``SSL_set_SSL_CTX``
swaps the certificate and the CA store, not those). HAProxy routes by ``req.ssl_sni``
the same way, from the buffered ClientHello.

Rules of this module:
- It only chooses; it never refuses. Anything it cannot read (not a handshake record, a
  malformed or oversized hello) gives ``Hello(None)`` and the bytes go to OpenSSL as they
  came, under the default domain: OpenSSL answers a malformed hello with its own alert.
- Bounded: at most ``MAX_HELLO`` bytes and ``MAX_RECORDS`` records are buffered (RFC 8446
  allows a ClientHello over several records; a real one, post-quantum key shares included,
  is a few KB in one or two), a hello that another kind of record interrupts is given up
  at once, and a hello
  that arrives a byte at a time is not parsed again for each byte: ``read_hello`` says how
  many bytes must have arrived before it can tell more.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 64 * 1024
_HANDSHAKE = 22  # ContentType handshake (RFC 8446 section 5.1)
_CLIENT_HELLO = 1  # HandshakeType client_hello (section 4)
_SERVER_NAME = 0  # ExtensionType server_name (RFC 6066 section 3)
_HOST_NAME = 0  # NameType host_name


@dataclass(frozen=True, slots=True)
class Hello:
    """What the ClientHello says: its SNI host name (lower-case, no trailing dot) or None."""

    server_name: str | None


NO_NAME = Hello(None)


# Records a hello may span before it is given up on: RFC 8446 lets a sender split it into
# 1-byte records, but no client does, and each record costs a step of every parse.
MAX_RECORDS = 64


def _handshake_bytes(buf: bytes) -> tuple[bytes, bool] | None:
    """(the handshake bytes of the leading handshake records of ``buf``, whether they are
    all there will be: a record of another type follows); None when such a record (or a
    malformed header, or too many records) comes first: nothing to read."""
    out = bytearray()
    pos = records = 0
    while pos + 5 <= len(buf):
        if buf[pos] != _HANDSHAKE or buf[pos + 1] != 3:
            return None if pos == 0 else (bytes(out), True)
        records += 1
        length = int.from_bytes(buf[pos + 3:pos + 5], "big")
        if length == 0 or length > 16384 + 2048 or records > MAX_RECORDS:
            return None
        if pos + 5 + length > len(buf):
            out += buf[pos + 5:]  # a partial record: what arrived so far
            break
        out += buf[pos + 5:pos + 5 + length]
        pos += 5 + length
    return bytes(out), False


def read_hello(buf: bytes) -> Hello | int:
    """The hello's SNI from the bytes received so far, or the number of bytes (in all)
    that must have arrived before it is worth calling again."""
    if len(buf) > MAX_HELLO:
        return NO_NAME
    if len(buf) < 5:
        return 5 if not buf or buf[0] == _HANDSHAKE else NO_NAME
    read = _handshake_bytes(buf)
    if read is None:
        return NO_NAME
    data, final = read
    if len(data) < 4:
        return NO_NAME if final else len(buf) + 4 - len(data)
    if data[0] != _CLIENT_HELLO:
        return NO_NAME
    length = int.from_bytes(data[1:4], "big")
    if length > MAX_HELLO:
        return NO_NAME
    if len(data) < 4 + length:
        if final:  # another kind of record came first: the hello can never be whole
            return NO_NAME
        # At least the missing handshake bytes must come (more with record headers).
        return len(buf) + 4 + length - len(data)
    try:
        return Hello(_server_name(data[4:4 + length]))
    except (IndexError, ValueError):
        return NO_NAME


def _server_name(body: bytes) -> str | None:
    # legacy_version(2) random(32) session_id<0..32> cipher_suites<2..> compression<1..>
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    if pos + 2 > len(body):
        return None  # no extensions (an SSL 3.0-style hello)
    end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
    if end > len(body):
        raise ValueError("extensions overrun the hello")
    pos += 2
    while pos + 4 <= end:
        kind = int.from_bytes(body[pos:pos + 2], "big")
        size = int.from_bytes(body[pos + 2:pos + 4], "big")
        ext = body[pos + 4:pos + 4 + size]
        if len(ext) != size:
            raise ValueError("an extension overruns the hello")
        if kind == _SERVER_NAME:
            return _host_name(ext)
        pos += 4 + size
    return None


def _host_name(ext: bytes) -> str | None:
    pos = 2  # server_name_list's length
    while pos + 3 <= len(ext):
        kind = ext[pos]
        size = int.from_bytes(ext[pos + 1:pos + 3], "big")
        name = ext[pos + 3:pos + 3 + size]
        if kind == _HOST_NAME and len(name) == size:
            # RFC 6066: ASCII, no trailing dot; anything else matches no domain's name.
            if not name.isascii():
                return None
            return name.decode("ascii").lower().removesuffix(".") or None
        pos += 3 + size
    return None
