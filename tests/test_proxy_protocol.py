"""PROXY protocol v1/v2 on a listener (issue #5 item): the client address comes from the
header; a connection without a valid header is refused; off by default."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import struct

import pytest

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.tls.proxy_protocol import V2_SIGNATURE, parse
from tests.conftest import Harness, wait_for


def v2(src: str, sport: int, command: int = 1) -> bytes:
    ip = ipaddress.ip_address(src)
    if ip.version == 4:
        body = ip.packed + ipaddress.IPv4Address("10.0.0.1").packed + struct.pack("!HH",
                                                                                 sport, 443)
        fam = 0x11
    else:
        body = ip.packed + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", sport, 443)
        fam = 0x21
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("header, client", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n", ("203.0.113.7", 51000)),
    (b"PROXY TCP6 2001:db8::7 ::1 51000 443\r\n", ("2001:db8::7", 51000)),
    (b"PROXY UNKNOWN\r\n", None),
    (v2("203.0.113.8", 40000), ("203.0.113.8", 40000)),
    (v2("2001:db8::8", 40001), ("2001:db8::8", 40001)),
    (v2("203.0.113.8", 40000, command=0), None),
])
def test_headers_parse_whole_and_byte_by_byte(header: bytes, client: object) -> None:
    assert parse(header + b"\x16tls") == (len(header), client)
    for i in range(1, len(header)):
        assert parse(header[:i]) is None


@pytest.mark.parametrize("bad", [
    b"\x16\x03\x01", b"GET / HTTP/1.1\r\n", b"PROXY TCP4 x 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n", b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 " + b"1" * 120, V2_SIGNATURE + b"\x31\x11\x00\x00",
])
def test_malformed_headers_are_refused(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(bad)


def request_through(h: Harness, header: bytes) -> bytes:
    ctx = h.client_context()
    with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
        s.sendall(header)
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := t.recv(65536):
                data += chunk
            return data


@pytest.mark.parametrize("header", [b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n",
                                    v2("203.0.113.7", 51000)])
def test_the_client_address_comes_from_the_header(harness: Harness, header: bytes) -> None:
    harness.start(harness.config(proxy_protocol=True))
    data = request_through(harness, header)
    assert data.startswith(b"HTTP/1.1 200")
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])  # the echo answers with Content-Length
    assert dict(body["headers"])["x-forwarded-for"] == "203.0.113.7"
    wait_for(lambda: bool(harness.access_lines))
    assert json.loads(harness.access_lines[-1])["client"] == "203.0.113.7"


def test_a_connection_without_the_header_is_refused(harness: Harness) -> None:
    harness.start(harness.config(proxy_protocol=True))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request_through(harness, b"")
    wait_for(lambda: harness.metric("mtlsproxy_tls_handshake_failures_total",
                                    listener="public", reason="protocol") == 1)


def test_proxy_protocol_is_off_by_default(harness: Harness) -> None:
    harness.start()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request_through(harness, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n")
