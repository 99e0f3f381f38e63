"""HTTP/2 upstreams (``upstream_protocol: h2``) that misbehave or are slow: a stalled
stream never holds back the others sharing its connection, a graceful GOAWAY lets the
streams it names finish, and a response head no HTTP/1.1 upstream could send is a 502.
The upstream is the h2 state machine scripted (tests/support/h2server.py); the clients
are real TLS clients of the proxy."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from tests.support.h2client import H2Client
from tests.support.h2server import ScriptedH2Upstream
from tests.support.harness import Harness
from tests.support.tools import wait_for

_OPEN: list[H2Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _OPEN:
        _OPEN.pop().close()


def client(h: Harness) -> H2Client:
    c = H2Client(h.port, h.client_context())
    _OPEN.append(c)
    return c


def start(h: Harness, **listener: Any) -> ScriptedH2Upstream:
    up = ScriptedH2Upstream()
    port = h.serve(up.handle)
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{port}",
                              "upstream_protocol": "h2"}], **listener))
    return up


def test_a_stalled_stream_never_holds_back_the_other_streams_of_its_connection(
        harness: Harness) -> None:
    """A client that reads nothing makes its stream's inbox pause; the bytes the
    upstream sends meanwhile must not use up the window the upstream connection's other
    streams need (before: 64 KiB shared, and every later response stalled)."""
    up = start(harness, timeouts={"upstream_read": 5})
    stalled = client(harness)
    stalled.request("/bytes/4000000")  # and never read: its window stays closed
    # Enough time for the proxy to fill what it holds for the stalled stream.
    threading.Event().wait(0.5)
    for _ in range(3):
        r = client(harness).get("/bytes/300000")
        assert r.status == 200 and len(r.body) == 300000, (r.status, len(r.body), r.reset)
    assert up.connections == 1  # the same upstream connection carried them all


def test_a_graceful_goaway_lets_its_last_stream_finish(harness: Harness) -> None:
    up = start(harness)
    c = client(harness)
    r = c.get("/goaway")
    assert (r.status, r.body) == (200, b"after goaway")
    assert up.goaways == 1
    # The connection that said GOAWAY takes no new stream: the next one opens another.
    assert c.get("/next").status == 200
    assert up.connections == 2


@pytest.mark.parametrize("status", ["abc", "999", "-10", "2_0", "099", "20"])
def test_an_upstream_status_outside_the_protocol_is_a_502(harness: Harness,
                                                           status: str) -> None:
    start(harness)
    c = client(harness)
    r = c.get(f"/status/{status}")
    assert r.status == 502, (r.status, r.body)
    assert json.loads(r.body)["reason"] == "upstream_unavailable"
    assert c.get("/ok").status == 200  # the proxy goes on, and so does the connection


def test_a_control_byte_in_an_upstream_field_is_a_502(harness: Harness) -> None:
    start(harness)
    c = client(harness)
    r = c.get("/field")
    assert r.status == 502 and r.header(b"x-odd") is None
    assert c.get("/ok").status == 200


def start_with(h: Harness, up: ScriptedH2Upstream) -> None:
    port = h.serve(up.handle)
    h.start(h.config(routes=[{"path_prefix": "/", "upstream": f"http://127.0.0.1:{port}",
                              "upstream_protocol": "h2"}]))


def test_a_response_that_ends_before_its_request_body_does_not_keep_its_stream_open(
        harness: Harness) -> None:
    """The upstream answers before the body has ended (a 401, a 413) and sends no
    RST_STREAM (RFC 9113 section 8.1 makes it optional): the proxy must reset the stream,
    or it counts against the upstream's stream limit for good and the route wedges."""
    up = ScriptedH2Upstream(max_streams=3)
    start_with(harness, up)
    c = client(harness)
    for _ in range(6):
        sid = c.request("/early", method="POST", body=b"part of a body", end=False)
        r = c.response(sid)
        assert (r.status, r.body) == (200, b"early"), r
    other = client(harness)
    assert other.get("/ok").status == 200
    assert harness.get("/ok")[0] == 200  # HTTP/1.1 clients too
    assert up.connections == 1


def test_a_burst_of_streams_opens_one_upstream_connection(harness: Harness) -> None:
    up = ScriptedH2Upstream()
    start_with(harness, up)
    c = client(harness)
    ids = [c.request("/slow") for _ in range(20)]  # all before any connection exists
    for sid in ids:
        assert c.response(sid).status == 200
    assert up.connections == 1


def test_an_upstream_connection_without_streams_is_closed_after_its_idle_timeout(
        harness: Harness) -> None:
    up = ScriptedH2Upstream()
    start_with(harness, up)
    assert harness.server is not None
    harness.server.pool.h2.idle_timeout = 0.3
    assert client(harness).get("/ok").status == 200
    wait_for(lambda: up.closed == 1)
    assert client(harness).get("/ok").status == 200  # a new one opens when needed
    assert up.connections == 2


def test_a_grpc_deadline_after_the_response_headers_ends_in_deadline_exceeded(
        harness: Harness) -> None:
    up = ScriptedH2Upstream()
    start_with(harness, up)
    c = client(harness)
    r = c.response(c.request("/grpc-stall", method="POST", body=b"\x00\x00\x00\x00\x00",
                             headers=[("content-type", "application/grpc"),
                                      ("te", "trailers"), ("grpc-timeout", "300m")]))
    assert r.status == 200 and r.reset is None, r
    assert dict(r.trailers)[b"grpc-status"] == b"4"
