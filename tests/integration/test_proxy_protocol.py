"""PROXY protocol v1/v2 on a listener (issue #5 item): the client address comes from the
header; a connection without a valid header is refused; off by default. With
``trusted_sources`` (issue 20 item 5) only those socket peers may send the header at all."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from mtlsproxy.config import load_config, parse_config
from mtlsproxy.errors import ConfigError, RemoteProtocolError
from mtlsproxy.tls.proxy_protocol import V2_SIGNATURE, parse, trusted_source
from tests.integration.test_config import good, problems, write
from tests.support.harness import Harness
from tests.support.pki import PKI
from tests.support.tools import wait_for

T = TypeVar("T")


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
    # An IPv6 scope id: ipaddress takes any bytes there, a line break included.
    b"PROXY TCP6 fe80::1%\nX-Client-Cert-Subject:CN=admin ::1 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", b"PROXY TCP6 ::1 fe80::1%\r 1 2\r\n",
])
def test_malformed_headers_are_refused(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(bad)


def request_through(h: Harness, header: bytes, host: str = "127.0.0.1") -> bytes:
    """``header``, then one request over TLS; the answer. TLS runs over memory BIOs on the
    plain socket: ``wrap_socket`` on a socket the proxy already closed can raise before it
    closes the SSLSocket it made, which the GC then reports in a later test."""
    ctx = h.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection((host, h.port), timeout=10) as s:
        s.sendall(header)

        def pump(op: Callable[[], T]) -> T:
            while True:
                try:
                    result = op()
                except ssl.SSLWantReadError:
                    s.sendall(outgoing.read())
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionResetError("the proxy closed the connection") from None
                    incoming.write(data)
                    continue
                s.sendall(outgoing.read())
                return result
        pump(tls.do_handshake)
        pump(lambda: tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n"
                               b"Connection: close\r\n\r\n"))
        answer = b""
        while True:
            try:
                chunk = pump(lambda: tls.read(65536))
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError):
                return answer
            if not chunk:  # close_notify
                return answer
            answer += chunk


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


# -- trusted_sources: who may send the header ----------------------------------------------

def sources(*cidrs: str) -> dict[str, Any]:
    return {"trusted_sources": list(cidrs)}


def served(data: bytes) -> dict[str, str]:
    """The echo's view of the request's headers, from a 200 answer."""
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return dict(json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"])


def refused(h: Harness) -> float:
    return h.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                    reason="protocol")


def test_a_connection_from_an_untrusted_source_is_refused_and_counted_as_protocol(
        harness: Harness) -> None:
    accepted: list[int] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()
    port = harness.serve(upstream)
    harness.start(harness.config(upstream=f"http://127.0.0.1:{port}",
                                 proxy_protocol=sources("10.0.0.0/8")))
    # A valid header claiming a trusted address: the socket peer (127.0.0.1) is what counts.
    for header in (b"PROXY TCP4 10.0.0.5 10.0.0.1 51000 443\r\n", v2("10.0.0.5", 51000)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request_through(harness, header)
    wait_for(lambda: refused(harness) == 2)
    assert accepted == []
    assert harness.metric("mtlsproxy_tls_handshakes_total", listener="public",
                          resumed="false") == 0


def test_an_untrusted_source_is_closed_before_it_sends_anything_and_gets_no_tls_byte(
        harness: Harness) -> None:
    harness.start(harness.config(proxy_protocol=sources("10.0.0.0/8", "::1")))
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as s:
        assert s.recv(65536) == b""  # closed on accept: nothing read, nothing sent
    wait_for(lambda: refused(harness) == 1)


def test_a_trusted_source_is_served_and_the_header_address_is_the_client(
        harness: Harness) -> None:
    harness.start(harness.config(proxy_protocol=sources("10.0.0.0/8", "127.0.0.0/8")))
    headers = served(request_through(harness, b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"))
    assert headers["x-forwarded-for"].endswith("203.0.113.7")
    wait_for(lambda: bool(harness.access_lines))
    assert json.loads(harness.access_lines[-1])["client"] == "203.0.113.7"
    assert refused(harness) == 0


def test_a_trusted_source_still_needs_a_valid_header(harness: Harness) -> None:
    harness.start(harness.config(proxy_protocol=sources("127.0.0.1")))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request_through(harness, b"")
    wait_for(lambda: refused(harness) == 1)


def test_an_ipv6_listener_trusts_an_ipv6_source_and_not_the_ipv4_loopback(
        harness: Harness) -> None:
    harness.start(harness.config(address="[::1]:0", proxy_protocol=sources("::1/128")))
    headers = served(request_through(harness, v2("2001:db8::7", 51000), host="::1"))
    assert headers["x-forwarded-for"].endswith("2001:db8::7")
    assert harness.reload(harness.config(address="[::1]:0",
                                         proxy_protocol=sources("127.0.0.0/8"))) == []
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request_through(harness, v2("2001:db8::7", 51000), host="::1")
    wait_for(lambda: refused(harness) == 1)


def test_a_reload_changes_the_trusted_sources_of_new_connections(harness: Harness) -> None:
    harness.start(harness.config(proxy_protocol=sources("10.0.0.0/8")))
    header = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request_through(harness, header)
    assert harness.reload(harness.config(proxy_protocol=sources("127.0.0.0/8"))) == []
    served(request_through(harness, header))
    assert harness.reload(harness.config(proxy_protocol=sources("192.0.2.0/24"))) == []
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request_through(harness, header)
    wait_for(lambda: refused(harness) == 2)
    # From a list to "anywhere" (and back) needs no restart either: both require a header.
    assert harness.reload(harness.config(proxy_protocol=True)) == []
    served(request_through(harness, header))


@pytest.mark.parametrize("peer, cidrs, trusted", [
    ("10.1.2.3", ["10.0.0.0/8"], True),
    ("11.1.2.3", ["10.0.0.0/8"], False),
    ("2001:db8::1", ["10.0.0.0/8", "2001:db8::/32"], True),
    # A dual-stack socket's IPv4 client: compared as the IPv4 address it is.
    ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),
    ("::ffff:11.1.2.3", ["10.0.0.0/8"], False),
    ("::ffff:10.1.2.3", ["::/0"], False),  # "all of IPv6" does not take in IPv4 clients
    ("::ffff:10.1.2.3", ["::ffff:0:0/96"], False),
    ("10.1.2.3", ["::ffff:10.0.0.0/104"], False),
    ("::a01:203", ["10.0.0.0/8"], False),  # IPv4-compatible (deprecated): not IPv4
    ("127.0.0.1", ["::1/128"], False),
    ("::1", ["127.0.0.0/8"], False),
    # A scope id is not an address: dropped, never a reason to match or to crash.
    ("fe80::1%eth0", ["fe80::/10"], True),
    ("fe80::1%7", ["fe80::1/128"], True),
    ("fe80::1%eth0", ["::1/128", "10.0.0.0/8"], False),
    # Fails closed on what does not parse.
    ("", ["0.0.0.0/0", "::/0"], False),
    ("localhost", ["0.0.0.0/0", "::/0"], False),
    ("10.1.2.3 ", ["0.0.0.0/0"], False),
])
def test_the_source_matcher(peer: str, cidrs: list[str], trusted: bool) -> None:
    assert trusted_source(peer, tuple(ipaddress.ip_network(c) for c in cidrs)) is trusted


def test_trusted_sources_load_as_networks(pki: PKI) -> None:
    cidrs = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]
    config = load_config(write(pki.directory, good(pki, proxy_protocol=sources(*cidrs))))
    lc = config.listeners[0]
    assert lc.proxy_protocol is True
    assert lc.proxy_protocol_sources == tuple(ipaddress.ip_network(c) for c in
                                              ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32",
                                               "::1/128"])
    for value, expected in [(True, (True, None)), (False, (False, None)),
                            (None, (False, None))]:
        lc = load_config(write(pki.directory, good(pki, proxy_protocol=value))).listeners[0]
        assert (lc.proxy_protocol, lc.proxy_protocol_sources) == expected


P = "listeners[0].proxy_protocol"


@pytest.mark.parametrize("value, expected", [
    (sources("10.0.0.0/8", "10.1.2.3/8"),
     [f"{P}.trusted_sources[1]: not an IP network: 10.1.2.3/8 has host bits set"]),
    (sources("nope"),
     [f"{P}.trusted_sources[0]: not an IP network: 'nope' does not appear to be an IPv4 or "
      f"IPv6 network"]),
    (sources("10.0.0.0/33"),
     [f"{P}.trusted_sources[0]: not an IP network: '10.0.0.0/33' does not appear to be an "
      f"IPv4 or IPv6 network"]),
    ({"trusted_sources": [8]}, [f"{P}.trusted_sources[0]: not an IP network: 8 is not a string"]),
    (sources("::ffff:10.0.0.0/104"),
     [f"{P}.trusted_sources[0]: an IPv4-mapped network never matches (such peers are "
      f"compared as IPv4): write 10.0.0.0/8"]),
    (sources("fe80::1%eth0"),
     [f"{P}.trusted_sources[0]: a scope id (%...) cannot be matched: write the address alone"]),
    (sources(), [f"{P}.trusted_sources: must list at least one CIDR"]),
    ({}, [f"{P}.trusted_sources: required: the load balancer's CIDRs (true takes a header "
          f"from any peer)"]),
    ({"trusted_sources": "10.0.0.0/8"}, [f"{P}.trusted_sources: must be a list, got str"]),
    ("yes please", [f"{P}: must be a boolean or a mapping, got str"]),
])
def test_bad_proxy_protocol_values_name_their_key_path(pki: PKI, value: Any,
                                                       expected: list[str]) -> None:
    assert problems(pki, good(pki, proxy_protocol=value)) == expected


def test_an_unknown_proxy_protocol_key_is_an_error(pki: PKI) -> None:
    found = problems(pki, good(pki, proxy_protocol={"trusted_source": ["10.0.0.0/8"]}))
    assert found[0].startswith(f"{P}.trusted_source: unknown key (allowed: trusted_sources)")
    assert found[1].startswith(f"{P}.trusted_sources: required")


def test_a_bare_true_warns_at_start_up_and_on_a_reload_that_applies_it(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "trusted_sources" in r.getMessage()]
    with caplog.at_level(logging.WARNING, "mtlsproxy"):
        harness.start(harness.config(proxy_protocol=True))
        assert warnings() == [
            "listener public: proxy_protocol: true takes the client address from a PROXY "
            "header sent by any peer that reaches the port; set "
            "proxy_protocol.trusted_sources to the load balancer's CIDRs"]
        assert harness.reload(harness.config(proxy_protocol=sources("127.0.0.0/8"))) == []
        assert len(warnings()) == 1
        assert harness.reload(harness.config(proxy_protocol=True)) == []
        assert len(warnings()) == 2


def test_trusted_sources_do_not_warn(harness: Harness,
                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "mtlsproxy"):
        harness.start(harness.config(proxy_protocol=sources("127.0.0.0/8")))
    assert not [r for r in caplog.records if "trusted_sources" in r.getMessage()]


def test_the_edge_configmap_trusts_only_the_vpc_placeholder(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "deploy/k8s/base/edge/config.yaml").read_text())
    assert raw["listeners"][0]["proxy_protocol"] == {"trusted_sources": ["10.0.0.0/8"]}
    try:
        parse_config(raw, tmp_path)
    except ConfigError as exc:
        # Only the mounted files are missing outside a pod; every key must be known.
        assert all("file not found" in p for p in exc.problems), exc.problems
