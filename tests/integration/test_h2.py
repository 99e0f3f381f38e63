"""HTTP/2 from clients (issue 23, item 1): ALPN h2, every stream through the same
screening, routing, admission and certificate headers as an HTTP/1.1 request, flow
control both ways, and the known HTTP/2 attacks ended and counted. Real clients: curl and
the h2 state machine over real TLS sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import threading
from typing import Any

import pytest

from tests.support.h2client import H2Client, H2Response
from tests.support.harness import Harness
from tests.support.tools import require_file, require_tool, wait_for

_OPEN: list[H2Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _OPEN:
        _OPEN.pop().close()


def client(h: Harness, **kw: Any) -> H2Client:
    c = H2Client(h.port, h.client_context(**kw))
    _OPEN.append(c)
    return c


def echoed(r: H2Response) -> dict[str, Any]:
    assert r.status == 200, (r.status, r.body[:200])
    doc: dict[str, Any] = json.loads(r.body)
    doc["headers"] = {n: v for n, v in doc["headers"]}
    return doc


def test_curl_negotiates_h2_by_alpn_and_gets_the_certificate_headers(
        harness: Harness) -> None:
    require_tool("curl", "curl")
    harness.start()
    c, k = harness.pki.client_files()
    out = subprocess.run(
        ["curl", "-s", "--http2", "-w", "\\n%{http_version}", "--cacert",
         str(harness.pki.directory / "root.pem"), "--cert", str(c), "--key", str(k),
         f"https://localhost:{harness.port}/via/curl?q=1"],
        capture_output=True, text=True, timeout=30)
    body, _, version = out.stdout.rpartition("\n")
    assert version == "2", out
    doc = json.loads(body)
    headers = {n: v for n, v in doc["headers"]}
    assert doc["path"] == "/via/curl?q=1"
    assert "CN=good-client" in headers["x-client-cert-subject"]
    assert headers["host"] == f"localhost:{harness.port}"


def test_alpn_http11_only_keeps_curl_on_http11(harness: Harness) -> None:
    require_tool("curl", "curl")
    tls = harness.config()["listeners"][0]["tls"]
    harness.start(harness.config(tls={**tls, "alpn": ["http/1.1"]}))
    c, k = harness.pki.client_files()
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--http2", "-w", "%{http_version}", "--cacert",
         str(harness.pki.directory / "root.pem"), "--cert", str(c), "--key", str(k),
         f"https://localhost:{harness.port}/"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "1.1", out


def test_an_h2_request_is_forwarded_with_its_identity_and_counted_as_h2(
        harness: Harness) -> None:
    harness.start()
    h2c = client(harness)
    doc = echoed(h2c.get("/a/b?c=d", headers=[("x-custom", "1"), ("cookie", "a=1"),
                                               ("cookie", "b=2")]))
    assert doc["method"] == "GET" and doc["path"] == "/a/b?c=d"
    assert doc["headers"]["x-custom"] == "1"
    assert doc["headers"]["cookie"] == "a=1; b=2"  # RFC 9113 section 8.2.3
    assert doc["headers"]["x-forwarded-proto"] == "https"
    assert "CN=good-client" in doc["headers"]["x-client-cert-subject"]
    h2c.close()
    wait_for(lambda: harness.metric("mtlsproxy_requests_total", listener="public",
                                    route="/", protocol="h2", code="200") == 1)


@pytest.mark.parametrize("name", ["x-forwarded-client-cert", "client-cert",
                                  "x-client-cert-subject", "x-client-cert-fingerprint"])
def test_forged_identity_headers_never_reach_the_upstream_over_h2(harness: Harness,
                                                                   name: str) -> None:
    harness.start()
    doc = echoed(client(harness).get("/", headers=[(name, "forged")]))
    assert "forged" not in json.dumps(doc["headers"])


def test_paths_are_normalised_and_routes_rules_apply_over_h2(unstarted: Harness) -> None:
    h = unstarted
    up = f"http://127.0.0.1:{h.start_echo()}"
    nobody = "0" * 64
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": up},
                             {"path_prefix": "/admin", "upstream": up,
                              "allow": [{"fingerprint_sha256": nobody}]}]))
    c = client(h)
    for path in ("/admin", "/x/../admin/", "/ADMIN", "//admin", "/admin;x"):
        r = c.get(path)
        assert r.status == 403 and json.loads(r.body)["reason"] == "unauthorized", path
    assert c.get("/%2e%2e/admin").status == 400  # climbs above the root
    assert echoed(c.get("/a/./b//c"))["path"] == "/a/b/c"


def test_a_request_body_goes_up_and_a_large_response_comes_back_with_flow_control(
        harness: Harness) -> None:
    harness.start()
    c = client(harness)
    body = bytes(range(256)) * 4096  # 1 MiB: many windows of 64 KiB
    doc = echoed(c.response(c.request("/upload", method="POST", body=body)))
    assert doc["body_bytes"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_several_streams_at_once_on_one_connection(harness: Harness) -> None:
    harness.start()
    c = client(harness)
    ids = [c.request(f"/s/{i}") for i in range(20)]
    paths = [echoed(c.response(i))["path"] for i in ids]
    assert paths == [f"/s/{i}" for i in range(20)]


def test_the_server_advertises_max_concurrent_streams(unstarted: Harness) -> None:
    h = unstarted
    limits = {"max_concurrent_streams": 7}
    h.start(h.config(limits=limits))
    c = client(h)
    c.get("/")
    assert c.remote_settings.get(3) == 7  # SETTINGS_MAX_CONCURRENT_STREAMS


def test_no_route_and_a_host_of_another_form_are_answered_on_the_stream(
        unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(routes=[{"path_prefix": "/only",
                              "upstream": f"http://127.0.0.1:{h.start_echo()}"}]))
    c = client(h)
    r = c.get("/elsewhere")
    assert r.status == 404 and json.loads(r.body)["reason"] == "no_route"
    r = c.get("/only", authority="x@evil.test")
    assert r.status == 400
    assert c.get("/only").status == 200  # the connection carries on
    # A Host that differs from :authority is malformed (RFC 9113 section 8.3.1): h2
    # ends the connection (PROTOCOL_ERROR); nothing reaches the upstream.
    other = client(h)
    r = other.get("/only", headers=[("host", "other.test")])
    assert r.status in (0, 400) and (r.status == 400 or other.goaway is not None)


def test_upgrade_and_connect_are_refused_over_h2(harness: Harness) -> None:
    harness.start()
    c = client(harness)
    stream_id = c.h2.get_next_available_stream_id()
    c.responses[stream_id] = H2Response()
    c.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")])
    c.flush()
    r = c.response(stream_id)
    assert r.status == 501 and json.loads(r.body)["reason"] == "bad_request"


def test_the_access_log_says_http2(harness: Harness) -> None:
    harness.start()
    client(harness).get("/logged")
    wait_for(lambda: bool(harness.access_lines))
    record = json.loads(harness.access_lines[-1])
    assert record["protocol"] == "HTTP/2" and record["status"] == 200
    assert record["path"] == "/logged"


def test_a_refused_certificate_gets_403_on_its_stream_then_goaway(
        harness: Harness) -> None:
    from tests.support.pki import make_cert
    harness.start(harness.config(routes=[{"path_prefix": "/", "upstream":
                  f"http://127.0.0.1:{harness.start_echo()}"}]))
    import datetime as dt
    # Valid at the handshake, expired by the clock the policy reads at the request.
    cert = make_cert("soon-expired", harness.pki.inter,
                     not_after=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    c = H2Client(harness.port, harness.client_context(cert, name="soon"))
    _OPEN.append(c)
    harness.clock.advance(dt.timedelta(hours=2))
    r = c.get("/")
    assert r.status == 403 and json.loads(r.body)["reason"] == "expired"
    c.until_closed()
    assert c.goaway is not None


# -- attacks --------------------------------------------------------------------------------

def errors(h: Harness, kind: str) -> float:
    return h.metric("mtlsproxy_h2_protocol_errors_total", listener="public", kind=kind)


def send_until_calmed(c: H2Client, data: bytes) -> None:
    """Send raw frames (the proxy may close before it has read them all) and read until
    the connection ends: it must end with GOAWAY ENHANCE_YOUR_CALM."""
    import h2.errors
    try:
        c.sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.until_closed()
    assert c.goaway is not None
    assert c.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset_ends_the_connection_and_is_counted(harness: Harness) -> None:
    """CVE-2023-44487: open a stream, reset it at once, repeat."""
    import h2.errors
    harness.start()
    c = client(harness)
    for _ in range(300):
        if c.closed or c.goaway is not None:
            break
        stream_id = c.h2.get_next_available_stream_id()
        c.h2.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                      (b":authority", b"localhost"), (b":path", b"/")],
                          end_stream=True)
        c.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        try:
            c.flush()
        except (BrokenPipeError, ConnectionResetError):
            break
    c.until_closed()
    assert c.goaway is not None
    assert c.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert errors(harness, "rapid_reset") == 1


def test_a_ping_flood_ends_the_connection_and_is_counted(harness: Harness) -> None:
    harness.start()
    c = client(harness)
    for i in range(500):
        c.h2.ping(i.to_bytes(8, "big"))
    try:
        c.flush()
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.until_closed()
    assert c.goaway is not None
    assert errors(harness, "flood") == 1


def test_a_continuation_flood_ends_the_connection_and_is_counted(harness: Harness) -> None:
    """CVE-2024-27316 class: a HEADERS frame followed by CONTINUATION frames that never
    end the block."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame
    harness.start()
    c = client(harness)
    c.flush()
    headers = HeadersFrame(1)
    headers.data = c.h2.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"),
                                        (b":authority", b"localhost"), (b":path", b"/")])
    frames = headers.serialize()
    for _ in range(200):
        cont = ContinuationFrame(1)
        cont.data = b"\x00" * 16
        frames += cont.serialize()
    try:
        c.sock.sendall(frames)
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.until_closed()
    assert errors(harness, "flood") == 1


def test_a_header_list_over_the_limit_gets_431_and_the_connection_goes_on(
        unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(limits={"max_header_bytes": 4096}))
    c = client(h)
    # After the client has acknowledged the server's SETTINGS (sent with its first
    # read), when h2 would lower the decoder's bound to the advertised size.
    assert c.get("/").status == 200
    r = c.get("/", headers=[("x-big", "a" * 8000)])
    assert r.status == 431
    assert c.get("/").status == 200
    assert errors(h, "header_size") == 0


def test_a_header_list_far_over_the_limit_ends_in_goaway_and_is_counted(
        unstarted: Harness) -> None:
    h = unstarted
    h.start(h.config(limits={"max_header_bytes": 4096}))
    c = client(h)
    c.request("/", headers=[("x-big", "a" * 20000)])
    c.until_closed()
    assert c.goaway is not None
    assert errors(h, "header_size") == 1


def test_an_hpack_bomb_is_bounded_by_its_decoded_size(unstarted: Harness) -> None:
    """One large header in the dynamic table, referenced many times: a few bytes on the
    wire, megabytes decoded."""
    h = unstarted
    h.start(h.config(limits={"max_header_bytes": 8192}))
    c = client(h)
    big = [("x-bomb", "b" * 3000)]
    c.get("/", headers=big)  # the header enters the dynamic table
    c.request("/", headers=big * 100)  # each further copy is one byte on the wire
    c.until_closed()
    assert errors(h, "header_size") == 1


def test_drain_sends_goaway(harness: Harness) -> None:
    harness.start()
    c = client(harness)
    assert c.get("/").status == 200
    assert harness.server is not None
    harness.loop.call(lambda: [lr.begin_drain() for lr in harness.server.listeners])  # type: ignore[union-attr]
    c.until_closed()
    assert c.goaway is not None


def test_h2load_many_streams_on_few_connections(harness: Harness, tmp_path: Any) -> None:
    """A real HTTP/2 load generator (nghttp2's h2load) with its client certificate given
    by bench/mtls_preload.c: 2,000 requests, 10 streams at a time on each of 4
    connections, all answered."""
    import shutil
    from pathlib import Path
    require_tool("h2load", "nghttp2-client")
    require_tool("gcc", "gcc")
    require_file("/usr/include/openssl/ssl.h", "libssl-dev")
    shim = tmp_path / "mtls_preload.so"
    source = Path(__file__).resolve().parents[2] / "bench" / "mtls_preload.c"
    subprocess.run([shutil.which("gcc") or "gcc", "-O2", "-shared", "-fPIC", "-o", str(shim),
                    str(source), "-ldl", "-lssl"], check=True, timeout=60)
    harness.start()
    c, k = harness.pki.client_files()
    out = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "10", f"https://127.0.0.1:{harness.port}/"],
        capture_output=True, text=True, timeout=120,
        env={"LD_PRELOAD": str(shim), "MTLS_CERT": str(c), "MTLS_KEY": str(k),
             "PATH": "/usr/bin:/bin"})
    assert "2000 succeeded" in out.stdout and "2000 2xx" in out.stdout, out.stdout
    assert "Application protocol: h2" in out.stdout, out.stdout
    assert harness.metric("mtlsproxy_requests_total", listener="public", route="/",
                          protocol="h2", code="200") == 2000


# -- what an attacker's run found (request smuggling, leaks, buffering) ------------------

class RecordingUpstream:
    """An HTTP/1.1 upstream that keeps every byte each connection sent it and answers a
    head once its Content-Length body has come (so a short body leaves it waiting)."""

    def __init__(self, h: Harness) -> None:
        self.connections: list[bytearray] = []
        self.port = h.serve(self.handle)

    async def handle(self, reader: Any, writer: Any) -> None:
        seen = bytearray()
        self.connections.append(seen)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen += head
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    seen += await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except Exception:  # noqa: BLE001 - the connection ended: keep what came
            seen += reader._buffer  # noqa: SLF001 - bytes read but not consumed
        finally:
            writer.close()


def proxied_to(h: Harness, up: RecordingUpstream) -> None:
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{up.port}"}]))


def requests_seen(up: RecordingUpstream) -> list[bytes]:
    """Each request line the upstream read, connection by connection."""
    return [line for conn in up.connections for line in bytes(conn).split(b"\r\n")
            if line.startswith((b"GET ", b"POST "))]


def test_a_content_length_with_no_body_is_a_400_that_never_reaches_the_upstream(
        unstarted: Harness) -> None:
    up = RecordingUpstream(unstarted)
    proxied_to(unstarted, up)
    c = client(unstarted)
    r = c.get("/smuggle", method="POST", headers=[("content-length", "40")])
    assert r.status == 400
    assert c.get("/next").status == 200
    assert requests_seen(up) == [b"GET /next HTTP/1.1"]


def test_a_body_shorter_than_its_content_length_ended_by_trailers_is_reset(
        unstarted: Harness) -> None:
    """h2 checks DATA frames against Content-Length but not a body that trailers end:
    forwarded, the upstream would read the next request as the rest of this body."""
    import h2.errors
    up = RecordingUpstream(unstarted)
    proxied_to(unstarted, up)
    c = client(unstarted)
    sid = c.request("/smuggle", method="POST",
                    headers=[("content-length", "40")], body=b"short", end=False)
    c.h2.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    c.flush()
    assert c.response(sid).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert c.get("/next").status == 200
    # The upstream connection that waited for the rest of the body was closed, not
    # reused: /next arrived as a request of its own, at the start of a connection.
    assert any(bytes(conn).startswith(b"GET /next HTTP/1.1") for conn in up.connections)
    assert not any(b"GET /next" in bytes(conn) and not bytes(conn).startswith(b"GET /next")
                   for conn in up.connections)
    assert unstarted.metric("mtlsproxy_requests_total", listener="public", route="/",
                            code="400", protocol="h2") == 1


def test_a_body_longer_than_its_content_length_never_reaches_the_upstream_whole(
        unstarted: Harness) -> None:
    up = RecordingUpstream(unstarted)
    proxied_to(unstarted, up)
    c = client(unstarted)
    sid = c.request("/smuggle", method="POST", headers=[("content-length", "5")],
                    body=b"12345GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    r = c.response(sid)
    assert r.status == 0 and (r.reset is not None or c.goaway is not None or c.closed)
    assert b"GET /x" not in b"".join(bytes(conn) for conn in up.connections)


def test_streams_reset_before_their_task_runs_are_not_left_open(harness: Harness) -> None:
    """HEADERS and RST_STREAM in one read: the stream's task is cancelled before it
    starts; the stream must still be closed and the gauge come back to zero."""
    import h2.errors
    harness.start()
    c = client(harness)
    for _ in range(10):
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                (b":authority", b"localhost"), (b":path", b"/")],
                          end_stream=True)
        c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    assert c.get("/").status == 200  # everything before it has been read
    wait_for(lambda: harness.metric("mtlsproxy_h2_streams_active", listener="public") == 0)
    assert harness.metric("mtlsproxy_h2_streams_active", listener="public") == 0


def frame_header(length: int, kind: int, flags: int = 0, stream_id: int = 0) -> bytes:
    return length.to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")


def test_a_frame_over_max_frame_size_is_refused_before_its_payload_is_buffered(
        harness: Harness) -> None:
    import h2.errors
    harness.start()
    c = client(harness)
    # A DATA frame header announcing 16 MiB - 1 and a few bytes of it: h2 alone would
    # wait for (and keep) the whole payload before checking its length.
    c.sock.sendall(frame_header(0xFFFFFF, 0x0, 0, 1) + b"x" * 1000)
    c.until_closed()
    assert c.goaway is not None
    assert c.goaway.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    assert errors(harness, "frame_size") == 1


def test_a_frame_header_split_across_reads_is_still_read(harness: Harness) -> None:
    import time
    harness.start()
    c = client(harness)
    c.flush()
    ping = frame_header(8, 0x6) + b"12345678"
    for i in range(len(ping)):
        c.sock.sendall(ping[i:i + 1])
        time.sleep(0.002)
    assert c.get("/").status == 200
    assert errors(harness, "frame_size") == 0 and errors(harness, "flood") == 0


@pytest.mark.parametrize("frames", [
    pytest.param([frame_header(0, 0x0, 0, 1)] * 3, id="empty-data"),
    pytest.param([frame_header(5, 0x2, 0, 3) + b"\x00\x00\x00\x00\x10"] * 300,
                 id="priority"),
    pytest.param([frame_header(4, 0x8) + (1).to_bytes(4, "big")] * 50,
                 id="window-update"),
])
def test_frames_that_carry_nothing_end_the_connection_as_a_flood(
        harness: Harness, frames: list[bytes]) -> None:
    harness.start()
    c = client(harness)
    c.request("/", method="POST", end=False)  # stream 1 open, for the empty DATA frames
    send_until_calmed(c, b"".join(frames))
    assert errors(harness, "flood") == 1


def test_a_path_with_bytes_over_0x7e_is_refused_as_over_http11(harness: Harness) -> None:
    harness.start()
    c = client(harness)
    assert c.get("/caf\xe9").status == 400
    assert c.get("/ok").status == 200


def test_expect_100_continue_is_answered_by_the_proxy_over_h2(harness: Harness) -> None:
    import h2.events
    harness.start()
    c = client(harness)
    sid = c.request("/upload", method="POST",
                    headers=[("content-length", "5"), ("expect", "100-continue")], end=False)
    informational = []
    while not informational and not c.closed:
        informational = [ev for ev in c.receive()
                         if isinstance(ev, h2.events.InformationalResponseReceived)]
    assert dict(informational[0].headers)[b":status"] == b"100"
    c.send_body(sid, b"hello")
    doc = echoed(c.response(sid))
    assert doc["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "expect" not in doc["headers"]


def test_a_route_removed_by_reload_is_gone_for_the_next_stream_of_an_open_connection(
        unstarted: Harness) -> None:
    h = unstarted
    h.start_echo()
    routes = [{"path_prefix": "/keep", "upstream": f"http://127.0.0.1:{h.echo_port}"},
              {"path_prefix": "/gone", "upstream": f"http://127.0.0.1:{h.echo_port}"}]
    h.start(h.config(routes=routes))
    c = client(h)
    assert c.get("/gone").status == 200
    assert h.reload(h.config(routes=routes[:1])) == []
    assert c.get("/gone").status == 404
    assert c.get("/keep").status == 200 and c.goaway is None


# -- what a second attacker's run found (windows, floods, timeouts, drain) ----------------

def test_a_client_asking_for_a_huge_header_table_gets_the_default_one(
        harness: Harness) -> None:
    """SETTINGS_HEADER_TABLE_SIZE is the most the client's decoder will keep; the proxy's
    encoder keeps no more than the protocol's default, whatever it asks."""
    import h2.settings
    harness.start()
    c = client(harness)
    c.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**30})
    c.flush()
    assert c.get("/").status == 200
    assert c.get("/again").status == 200
    assert c.h2.decoder.max_allowed_table_size == 2**30  # the proxy has seen it
    assert c.h2.decoder.header_table.maxsize == 4096


@pytest.mark.parametrize("kind", ["unknown-type", "settings-ack", "rst-closed-stream",
                                  "padding-only-data"])
def test_frames_that_only_cost_work_end_the_connection_as_a_flood(
        harness: Harness, kind: str) -> None:
    harness.start()
    c = client(harness)
    if kind == "unknown-type":
        frames = [frame_header(0, 0x20)] * 300
    elif kind == "settings-ack":
        frames = [frame_header(0, 0x4, 0x1)] * 300
    elif kind == "rst-closed-stream":
        assert c.get("/").status == 200  # stream 1 is closed now
        frames = [frame_header(4, 0x3, 0, 1) + (8).to_bytes(4, "big")] * 300
    else:
        c.request("/", method="POST", end=False)  # stream 1 open
        frames = [frame_header(10, 0x0, 0x8, 1) + b"\x09" + bytes(9)] * 3
    send_until_calmed(c, b"".join(frames))
    assert errors(harness, "flood") == 1


def test_a_few_control_frames_a_second_are_no_flood(harness: Harness) -> None:
    harness.start()
    c = client(harness)
    c.sock.sendall(frame_header(0, 0x20) * 50 + frame_header(8, 0x6) + b"12345678")
    assert c.get("/").status == 200
    assert errors(harness, "flood") == 0


def test_a_stream_whose_window_the_client_never_opens_is_reset_after_the_idle_timeout(
        harness: Harness) -> None:
    import h2.errors
    harness.start(harness.config(timeouts={"idle": 1}))
    c = client(harness)
    sid = c.request("/bytes/1000000")
    threading.Event().wait(2.5)  # read nothing meanwhile: no WINDOW_UPDATE goes out
    r = c.response(sid)
    assert r.reset == h2.errors.ErrorCodes.CANCEL
    assert len(r.body) == 65535  # one window, and no more
    wait_for(lambda: harness.metric("mtlsproxy_h2_streams_active", listener="public") == 0)


def test_a_client_that_reads_nothing_is_disconnected_after_the_idle_timeout(
        harness: Harness) -> None:
    import h2.settings
    harness.start(harness.config(timeouts={"idle": 1}))
    c = client(harness)
    # Windows as large as there are: only the socket, not flow control, holds it back.
    c.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    c.h2.increment_flow_control_window(2**31 - 1 - 65535)
    c.flush()
    c.request("/bytes/200000000")
    wait_for(lambda: errors(harness, "timeout") == 1, timeout=20)
    assert errors(harness, "timeout") == 1
    wait_for(lambda: harness.metric("mtlsproxy_h2_streams_active", listener="public") == 0)


def test_a_body_the_upstream_never_read_is_given_back_to_the_connection_window(
        unstarted: Harness) -> None:
    """An upstream that answers without reading the body: what the proxy still held of
    it (the upstream's socket full, the stream's window used up) was never acknowledged,
    and the connection's window shrank by it for good."""
    async def early(reader: Any, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.5)  # reading nothing: the proxy's writes back up
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    h = unstarted
    port = h.serve(early, rcvbuf=4096)
    h.start_echo()
    h.start(h.config(routes=[
        {"path_prefix": "/early", "upstream": f"http://127.0.0.1:{port}"},
        {"path_prefix": "/", "upstream": f"http://127.0.0.1:{h.echo_port}"}]))
    c = client(h)
    sid = c.request("/early", method="POST", end=False)
    r = c.responses[sid]
    while not r.status and not c.closed:
        window = min(c.h2.local_flow_control_window(sid), 16384)
        if window > 0:
            c.h2.send_data(sid, b"x" * window)
            c.flush()
        else:
            c.receive()  # a WINDOW_UPDATE, or the answer
        r = c.responses[sid]
    assert r.status == 413, r
    for _ in range(3):
        doc = echoed(c.response(c.request("/upload", method="POST", body=b"y" * 60000)))
        assert doc["body_bytes"] == 60000


def test_drain_lets_an_open_stream_finish_before_goaway_closes(harness: Harness) -> None:
    """curl (nghttp2) as the client: h2's own state machine stops reading at a GOAWAY,
    where a real client goes on with the streams it names."""
    from tests.support.h2server import ScriptedH2Upstream
    require_tool("curl", "curl")
    up = ScriptedH2Upstream()
    port = harness.serve(up.handle)
    harness.start(harness.config(routes=[{"path_prefix": "/", "upstream_protocol": "h2",
                                          "upstream": f"http://127.0.0.1:{port}"}]))
    c, k = harness.pki.client_files()
    curl = subprocess.Popen(
        ["curl", "-s", "-S", "--http2", "-w", "\\n%{http_code} %{http_version}", "--cacert",
         str(harness.pki.directory / "root.pem"), "--cert", str(c), "--key", str(k),
         f"https://localhost:{harness.port}/slow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: up.paths == ["/slow"])
        assert harness.server is not None
        harness.loop.call(lambda: [lr.begin_drain() for lr in harness.server.listeners])  # type: ignore[union-attr]
        out, err = curl.communicate(timeout=20)
    finally:
        curl.kill()
        curl.wait()
    assert out == "slow\n200 2", (out, err)
    assert curl.returncode == 0, err
    wait_for(lambda: harness.metric("mtlsproxy_connections_active", listener="public") == 0)


def test_an_unfinished_header_block_ends_the_connection_after_the_header_timeout(
        harness: Harness) -> None:
    harness.start(harness.config(timeouts={"request_headers": 1}))
    c = client(harness)
    # The SETTINGS exchange done first: the client's ACK may not come inside the block.
    assert c.get("/").status == 200
    block = c.h2.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"),
                                 (b":authority", b"localhost"), (b":path", b"/")])
    c.sock.sendall(frame_header(len(block) // 2, 0x1, 0x1, 3) + block[:len(block) // 2])
    c.until_closed()
    assert c.goaway is not None
    assert errors(harness, "timeout") == 1, c.goaway


def test_a_header_block_over_the_ceiling_is_refused_before_it_is_buffered(
        harness: Harness) -> None:
    """h2 keeps HEADERS and up to 64 CONTINUATION frames of any size until END_HEADERS;
    the proxy counts their bytes as they come (4 x limits.max_header_bytes)."""
    import h2.errors
    harness.start(harness.config(limits={"max_header_bytes": 4096}))
    c = client(harness)
    c.sock.sendall(frame_header(16000, 0x1, 0, 1) + b"a" * 16000
                   + frame_header(16000, 0x9, 0, 1) + b"a" * 16000)
    c.until_closed()
    assert c.goaway is not None
    assert c.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert errors(harness, "header_size") == 1


def test_a_stalled_request_body_is_a_408_as_over_http11(harness: Harness) -> None:
    harness.start(harness.config(timeouts={"idle": 1}))
    c = client(harness)
    r = c.response(c.request("/upload", method="POST", body=b"partial", end=False))
    assert r.status == 408 and json.loads(r.body)["reason"] == "request_timeout"
    assert harness.metric("mtlsproxy_requests_total", listener="public", route="/",
                          code="408", protocol="h2") == 1


def test_data_frames_on_a_reset_stream_count_as_control_frames(harness: Harness) -> None:
    """h2 answers each with a RST_STREAM of its own and tells the proxy nothing."""
    import h2.errors
    harness.start()
    c = client(harness)
    sid = c.request("/upload", method="POST", end=False)
    c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    c.flush()
    send_until_calmed(c, b"".join(frame_header(1, 0x0, 0, sid) + b"x" for _ in range(400)))
    assert errors(harness, "flood") == 1


def test_an_absolute_uri_in_path_is_refused(harness: Harness) -> None:
    """RFC 9113 section 8.3.1: :path is the absolute path; a URI would name a host."""
    harness.start()
    c = client(harness)
    assert c.get("http://elsewhere.example/x").status == 400
    assert c.get("/x").status == 200
