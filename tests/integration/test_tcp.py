"""TCP mode (issue 24, item 3): ``listeners[].tcp`` relays an admitted client's bytes to
a TCP or unix-socket service, with the same admission as HTTP (the certificate verdict,
``allow`` rules), optionally behind a PROXY v2 header carrying the client certificate's
facts. Real clients (a Python TLS socket, ``openssl s_client``) and real servers, on both
event loops."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Harness
from tests.support.pki import make_cert
from tests.support.tools import require_tool, wait_for


class EchoService:
    """A TCP (or unix-socket) service: echoes what it gets, upper-cased, and records each
    connection's first bytes (a PROXY header, when one is sent). ``close_after``: it
    closes after its first answer (so a client that waits for the end gets it)."""

    def __init__(self, h: Harness, unix: Path | None = None, close_after: bool = False,
                 proxy_header: bool = False) -> None:
        self.connections = 0
        self.headers: list[dict[str, Any]] = []
        self.received = bytearray()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                if proxy_header:
                    self.headers.append(await read_proxy_v2(reader))
                while True:
                    data = await reader.read(65536)
                    if not data:
                        writer.write(b"BYE")  # the client's FIN arrived: still writable
                        await writer.drain()
                        break
                    self.received += data
                    writer.write(data.upper())
                    await writer.drain()
                    if close_after:
                        break
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        async def go() -> str:
            if unix is not None:
                server = await asyncio.start_unix_server(handle, str(unix))
                h.servers.append(server)
                return f"unix:{unix}"
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            h.servers.append(server)
            return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self.address = h.loop.run(go())


async def read_proxy_v2(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The test's own reading of a PROXY v2 header (proxy-protocol.txt section 2.2)."""
    head = await reader.readexactly(16)
    assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
    assert head[12] == 0x21 and head[13] == 0x11, head[12:14]  # v2 PROXY, TCP over IPv4
    body = await reader.readexactly(struct.unpack("!H", head[14:16])[0])
    out: dict[str, Any] = {
        "src": (str(ipaddress.IPv4Address(body[0:4])), struct.unpack("!H", body[8:10])[0]),
        "dst": (str(ipaddress.IPv4Address(body[4:8])), struct.unpack("!H", body[10:12])[0]),
    }
    tlvs = body[12:]
    while tlvs:
        kind, length = tlvs[0], struct.unpack("!H", tlvs[1:3])[0]
        value, tlvs = tlvs[3:3 + length], tlvs[3 + length:]
        if kind == 0x02:
            out["authority"] = value.decode()
        elif kind == 0x20:
            out["client"], out["verify"] = value[0], struct.unpack("!I", value[1:5])[0]
            sub = value[5:]
            while sub:
                skind, slen = sub[0], struct.unpack("!H", sub[1:3])[0]
                out[{0x21: "version", 0x22: "cn", 0x23: "cipher"}.get(skind, hex(skind))] = \
                    sub[3:3 + slen].decode()
                sub = sub[3 + slen:]
    return out


def start(h: Harness, service: EchoService, **tcp: Any) -> None:
    listener = tcp.pop("listener", {})
    raw = h.config(tcp={"upstream": service.address, **tcp}, **listener)
    del raw["listeners"][0]["routes"]
    h.start(raw)


def connect(h: Harness, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    return (ctx or h.client_context()).wrap_socket(raw, server_hostname="localhost")


def read_until_closed(sock: ssl.SSLSocket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            break
        if not data:
            break
        out += data
    return out


def tunnels(h: Harness) -> float:
    return h.metric("mtlsproxy_tunnels_active", listener="public", kind="tcp")


def test_bytes_go_both_ways_and_are_counted(harness: Harness) -> None:
    service = EchoService(harness)
    start(harness, service)
    with connect(harness) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b"HELLO"
        s.sendall(b"x" * 100000)
        got = b""
        while len(got) < 100000:
            got += s.recv(65536)
        assert got == b"X" * 100000
        assert tunnels(harness) == 1
    wait_for(lambda: tunnels(harness) == 0)
    m = harness.metric
    assert m("mtlsproxy_tcp_connections_total", listener="public") == 1
    assert m("mtlsproxy_tcp_bytes_total", listener="public", direction="received") == 100005
    assert m("mtlsproxy_tcp_bytes_total", listener="public", direction="sent") == 100005


def test_the_clients_end_of_sending_reaches_the_service_which_can_still_answer(
        harness: Harness) -> None:
    """A half-close (RFC 8446 section 6.1): the client's close_notify becomes the
    service's EOF, and what the service sends after it still reaches the client."""
    service = EchoService(harness)
    start(harness, service)
    sock = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = harness.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")

    def pump() -> bool:
        sock.sendall(outgoing.read())
        data = sock.recv(65536)
        incoming.write(data)
        return bool(data)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            assert pump()
    tls.write(b"last words")
    got = b""
    while got != b"LAST WORDS":
        try:
            got += tls.read(100)
        except ssl.SSLWantReadError:
            assert pump()
    try:
        tls.unwrap()  # close_notify; the reading side stays open
    except ssl.SSLWantReadError:
        pass
    sock.sendall(outgoing.read())
    after = b""
    try:
        while True:
            try:
                after += tls.read(100)
            except ssl.SSLWantReadError:
                if not pump():
                    break
    except ssl.SSLZeroReturnError:
        pass
    finally:
        sock.close()
    assert after == b"BYE"


def test_openssl_s_client_talks_through_the_proxy(harness: Harness) -> None:
    require_tool("openssl", "openssl")
    service = EchoService(harness, close_after=True)
    start(harness, service)
    cert, key = harness.pki.client_files()
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{harness.port}", "-quiet",
         "-ign_eof", "-CAfile", str(harness.pki.directory / "root.pem"),
         "-cert", str(cert), "-key", str(key), "-servername", "localhost"],
        input=b"through openssl\n", capture_output=True, timeout=30)
    assert b"THROUGH OPENSSL" in out.stdout, out.stderr[-500:]


def test_a_unix_socket_service(harness: Harness, tmp_path: Path) -> None:
    service = EchoService(harness, unix=tmp_path / "svc.sock")
    start(harness, service)
    with connect(harness) as s:
        s.sendall(b"over unix")
        assert s.recv(100) == b"OVER UNIX"


def test_proxy_v2_tells_the_service_who_called(harness: Harness) -> None:
    service = EchoService(harness, proxy_header=True)
    start(harness, service, proxy_protocol_upstream="v2")
    with connect(harness) as s:
        s.sendall(b"who am i")
        assert s.recv(100) == b"WHO AM I"
        local = s.getsockname()
    (header,) = service.headers
    assert header["src"] == ("127.0.0.1", local[1])
    assert header["dst"] == ("127.0.0.1", harness.port)
    assert header["cn"] == "good-client"
    assert header["verify"] == 0  # presented and verified
    assert header["client"] & 0x01 and header["client"] & 0x02  # SSL, cert on connection
    assert header["version"] in ("TLSv1.2", "TLSv1.3") and header["cipher"]
    assert header["authority"] == "localhost"
    assert bytes(service.received) == b"who am i"  # the header is not part of the bytes


def test_a_client_the_allow_rules_refuse_never_reaches_the_service(
        harness: Harness) -> None:
    service = EchoService(harness)
    start(harness, service, allow=[{"subject": {"CN": "someone-else"}}])
    with connect(harness) as s:
        try:
            s.sendall(b"let me in")
        except OSError:
            pass
        assert read_until_closed(s) == b""
    assert service.connections == 0
    wait_for(lambda: harness.metric("mtlsproxy_tls_handshake_failures_total",
                                    listener="public", reason="unauthorized") == 1)


def test_a_client_of_an_unknown_ca_gets_its_tls_alert(harness: Harness) -> None:
    service = EchoService(harness)
    start(harness, service)
    stranger_ca = make_cert("Stranger CA", ca=True)
    stranger = make_cert("stranger", stranger_ca)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with connect(harness, harness.client_context(stranger)) as s:
            s.sendall(b"hi")
            s.recv(100)  # TLS 1.3: the alert comes after the client's Finished
    assert service.connections == 0


def test_a_tunnel_is_closed_when_its_ca_leaves_the_truststore(harness: Harness) -> None:
    h = harness
    service = EchoService(h)
    start(h, service)
    with connect(h) as s:
        s.sendall(b"before")
        assert s.recv(100) == b"BEFORE"
        other = make_cert("Another CA", ca=True)
        store = h.pki.directory / "other-truststore.pem"
        store.write_bytes(other.cert_pem())
        raw = h.config(tcp={"upstream": service.address},
                       mutual_tls={"truststore_uri": str(store)})
        del raw["listeners"][0]["routes"]
        assert h.reload(raw) == []
        assert read_until_closed(s) == b""  # closed by the proxy within a recheck
    wait_for(lambda: tunnels(h) == 0)


def test_an_idle_tcp_tunnel_is_closed_after_timeouts_idle(harness: Harness) -> None:
    service = EchoService(harness)
    start(harness, service, listener={"timeouts": {"idle": 1}})
    with connect(harness) as s:
        s.sendall(b"hi")
        assert s.recv(100) == b"HI"
        assert read_until_closed(s) == b""
    wait_for(lambda: tunnels(harness) == 0)


def test_a_service_that_is_down_closes_the_client_and_is_counted(harness: Harness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raw = harness.config(tcp={"upstream": f"127.0.0.1:{port}"})
    del raw["listeners"][0]["routes"]
    harness.start(raw)
    with connect(harness) as s:
        assert read_until_closed(s) == b""
    assert harness.metric("mtlsproxy_upstream_errors_total", upstream=f"127.0.0.1:{port}",
                          kind="connect_refused") == 1


def test_a_tunnel_is_closed_when_ocsp_comes_to_say_revoked(harness: Harness) -> None:
    """The OCSP answer that admitted the client expires (its nextUpdate); the next one,
    asked by the tunnel's re-check, says revoked."""
    import datetime as dt

    from tests.support.ocsp import Responder, client_of
    h = harness
    responder = Responder(h, h.pki.inter)
    responder.lifetime = dt.timedelta(seconds=2)
    cert = client_of(responder, h)
    service = EchoService(h)
    raw = h.config(tcp={"upstream": service.address},
                   mutual_tls={"truststore_uri": str(h.pki.truststore),
                               "revocation": {"ocsp": True}})
    del raw["listeners"][0]["routes"]
    h.start(raw)
    with connect(h, h.client_context(cert, name="ocsp")) as s:
        s.sendall(b"good")
        assert s.recv(100) == b"GOOD"
        responder.status = "revoked"
        assert read_until_closed(s) == b""
    assert responder.calls >= 2
    wait_for(lambda: h.metric("mtlsproxy_tls_handshake_failures_total", listener="public",
                              reason="revoked") == 1)


def test_a_reload_that_tightens_allow_closes_open_tunnels(harness: Harness) -> None:
    h = harness
    service = EchoService(h)
    start(h, service, allow=[{"subject": {"CN": "good-client"}}])
    with connect(h) as s:
        s.sendall(b"before")
        assert s.recv(100) == b"BEFORE"
        raw = h.config(tcp={"upstream": service.address,
                            "allow": [{"subject": {"CN": "someone-else"}}]})
        del raw["listeners"][0]["routes"]
        assert h.reload(raw) == []
        assert read_until_closed(s) == b""
    wait_for(lambda: tunnels(h) == 0)


def test_a_sni_that_is_no_dns_name_is_left_out_of_the_proxy_header() -> None:
    from mtlsproxy.tls.proxy_protocol import build_v2
    for name in ("a" * 64 + ".example", "a..b", "bad\x01name"):
        header = build_v2(("127.0.0.1", 1), ("127.0.0.1", 2), tls_version="TLSv1.3",
                          authority=name)
        assert b"\x02\x00" not in header[28:31]  # no PP2_TYPE_AUTHORITY TLV
    assert b"api.example" in build_v2(("127.0.0.1", 1), ("127.0.0.1", 2),
                                      authority="api.example")
