"""The events of the HTTP/1.1 parsing seam (http/parser.py): what a message becomes.

Header names are lower-case; values as received, without surrounding spaces.

Rules of this module: setup.py compiles it with the fast exchange (mtlsproxy/compiled.py),
each dataclass an extension type whose fields events.pxd declares (Cython's dataclass
support; it has no ``slots=True``, so the pure build's classes have a ``__dict__``). A
field added here is added there too (test_compiled_exchange compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Headers = list[tuple[bytes, bytes]]


@dataclass
class Request:
    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool = False
    connection: frozenset[bytes] = frozenset()  # Connection tokens, lower-case
    host: bytes = b""  # the Host header's value (there is at most one)
    # The X-Request-Id the proxy generated and forwarded (http/wire.py), when the client
    # sent none; b"" otherwise.
    request_id: bytes = b""
    # The protocol an HTTP/1.1 Upgrade asks for (RFC 9110 section 7.8), lower-case, without
    # a version ("websocket"); b"" when the request asks for none. The parser reads no
    # further bytes after such a request (they belong to the protocol switched to).
    upgrade: bytes = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@dataclass
class Response:
    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    close_delimited: bool = False
    connection: frozenset[bytes] = frozenset()


@dataclass
class Informational:
    status: int


@dataclass
class Data:
    # bytes, or a bytearray an Inbox grew from many small pieces (proxy/inbox.py)
    data: bytes | bytearray


@dataclass
class EndOfMessage:
    # An HTTP/2 upstream's trailers (gRPC's grpc-status); HTTP/1.1 ones are not kept.
    trailers: tuple[tuple[bytes, bytes], ...] = ()


END = EndOfMessage()
Event = Request | Response | Informational | Data | EndOfMessage


class RequestParser(Protocol):
    def feed(self, data: bytes) -> list[Event]: ...
    def close(self) -> None: ...
    @property
    def held(self) -> int:
        """Bytes held after an upgrade request (never parsed), or -1 when holding none."""
        ...
    def take_held(self) -> bytes:
        """After an upgrade request: the bytes received after its head, which were not
        parsed (the tunnel's first bytes)."""
        ...


class ResponseParser(Protocol):
    def expect(self, method: bytes) -> None: ...
    def feed(self, data: bytes) -> list[Event]: ...
    def feed_eof(self) -> list[Event]: ...
