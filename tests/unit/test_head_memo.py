"""The head memo (http/llhttp_parser.py, "the head memo"; http/wire.py; http/memo.py): a read
that repeats the exact bytes of a head parsed before is answered from a memo instead of
llhttp's callbacks, and the heads built from such a request or response are memoised too.
A head is stored the second time it parses (a doorkeeper), so a hit is its third sighting.

What must hold: a hit gives exactly what a full parse gives from the same state; a hit is
only taken where llhttp stands between messages; nothing a hit hands out is shared; the
heads built from memoised requests never mix one client's identity into another's; and
heads that never repeat store nothing.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http import wire
from mtlsproxy.http.checks import make_request
from mtlsproxy.http.llhttp_parser import MISS_STREAK, RESTING
from mtlsproxy.http.memo import HeadMemos, Memo
from mtlsproxy.http.parser import (
    END,
    Data,
    Event,
    HttptoolsRequestParser,
    HttptoolsResponseParser,
    Request,
    Response,
)
from tests.unit.test_parser import _REQUEST_SEEDS, CORPUS, RESPONSE_CORPUS, _mutated

GET = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"
OK = (b"HTTP/1.1 200 OK\r\nServer: s\r\nDate: Mon, 30 Nov 2026 10:00:00 GMT\r\n"
      b"Content-Length: 2\r\n\r\nok")


# The memos these tests share, as a server's parsers and head builders share its own.
MEMOS = HeadMemos()


def cold() -> None:
    """Empty every memo and doorkeeper, as their owner does."""
    MEMOS.clear()


@pytest.fixture(autouse=True)
def empty_memos() -> Iterator[None]:
    cold()
    yield


def request_memo(limit: int = 32768) -> dict[bytes, object]:
    return MEMOS.requests(limit).entries


def response_memo(limit: int = 65536) -> dict[bytes, object]:
    return MEMOS.responses(limit).entries


def parse_request(data: bytes, times: int = 1, limit: int = 32768) -> list[Event]:
    """``times`` full sightings of ``data``, each on a fresh parser; the last one's events."""
    events: list[Event] = []
    for _ in range(times):
        events = HttptoolsRequestParser(limit, MEMOS).feed(data)
    return events


def outcome(parser: HttptoolsRequestParser | HttptoolsResponseParser,
            *reads: bytes) -> object:
    events: list[Event] = []
    try:
        for data in reads:
            events += parser.feed(data)
    except RemoteProtocolError as exc:
        return ("rejected", exc.status_hint)
    # ``raw`` aside: it is set on hits only (the key for the memos in wire.py).
    return ("accepted", [(type(e).__name__, {f.name: getattr(e, f.name)
                                             for f in dataclasses.fields(e) if f.name != "raw"})
                         for e in events])


def response_parser(method: bytes = b"GET") -> HttptoolsResponseParser:
    p = HttptoolsResponseParser(memos=MEMOS)
    p.expect(method)
    return p


# -- requests ---------------------------------------------------------------------------

def test_a_request_head_is_stored_on_its_second_sighting_and_hit_on_its_third() -> None:
    first = parse_request(GET)
    assert request_memo() == {}  # the doorkeeper only notes its hash
    second = parse_request(GET)
    assert GET in request_memo()
    third = parse_request(GET)
    assert isinstance(first[0], Request) and isinstance(third[0], Request)
    # raw names a hit: only hits key the memos of wire.py.
    assert first[0].raw == second[0].raw == b"" and third[0].raw == GET  # type: ignore[union-attr]
    first[0].raw = GET
    assert third == first and third[1] is END


def test_request_heads_that_never_repeat_store_nothing() -> None:
    for i in range(1000):
        parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: %d\r\n\r\n" % i)
    assert request_memo() == {}


def test_request_memo_hits_hand_out_fresh_objects() -> None:
    a, _ = parse_request(GET, 3)
    assert isinstance(a, Request)
    a.headers.append((b"x-client-cert", b"mine"))
    a.keep_alive = False
    b, _ = HttptoolsRequestParser(memos=MEMOS).feed(GET)
    assert isinstance(b, Request)
    assert b is not a and b.keep_alive and (b"x-client-cert", b"mine") not in b.headers


def test_a_request_after_one_that_closes_the_connection_is_refused_even_if_memoised() -> None:
    parse_request(GET, 2)
    assert GET in request_memo()
    p = HttptoolsRequestParser(memos=MEMOS)
    p.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        p.feed(GET)


@pytest.mark.parametrize("before", [b"GET /x", b"POST / HTTP/1.1\r\nHost: x\r\n",
                                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70\r\n\r\n",
                                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                                    b"\r\n\r\n46\r\n"],
                         ids=["mid_request_line", "mid_head", "mid_body", "mid_chunk"])
def test_memoised_bytes_inside_a_message_are_parsed_as_its_continuation(before: bytes) -> None:
    parse_request(GET, 2)
    assert GET in request_memo()
    warm = outcome(HttptoolsRequestParser(memos=MEMOS), before, GET)
    cold()
    assert warm == outcome(HttptoolsRequestParser(memos=MEMOS), before, GET)
    assert warm[0] == "rejected" or all(name != "Request" or fields["target"] != b"/a"  # type: ignore[index]
                                        for name, fields in warm[1])  # type: ignore[index]


@pytest.mark.parametrize("reads", [
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
    [GET + GET],
    [GET[:10], GET[10:]],
    [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
    [b"GET / HTTP/1.0\r\n\r\n"],
    [b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"],
], ids=["body", "chunked", "pipelined", "split", "close", "http10", "large"])
def test_only_whole_bodyless_keep_alive_requests_in_one_read_are_memoised(
        reads: list[bytes]) -> None:
    for _ in range(3):
        p = HttptoolsRequestParser(memos=MEMOS)
        for data in reads:
            p.feed(data)
    assert request_memo() == {}


def test_memos_are_kept_per_header_limit() -> None:
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 200 + b"\r\n\r\n"
    parse_request(big, 2, limit=4096)
    assert big in request_memo(4096)
    with pytest.raises(RemoteProtocolError) as err:
        HttptoolsRequestParser(100, MEMOS).feed(big)
    assert err.value.status_hint == 431


def test_a_full_memo_is_emptied_and_goes_on_storing() -> None:
    memo: Memo[int, str] = Memo(size=4, seen=100)
    for key in range(5):
        memo.admit(key)
        assert memo.admit(key)
        memo.store(key, str(key))
    assert memo.entries == {4: "4"}
    assert repr(memo) == "<Memo entries=1/4 seen=5>"


def test_a_full_doorkeeper_is_emptied_and_forgets_what_it_saw() -> None:
    memo: Memo[int, str] = Memo(size=4, seen=3)
    assert [memo.admit(k) for k in (1, 2, 3)] == [False, False, False]
    assert memo.admit(3)  # still there
    assert not memo.admit(4)  # full: emptied, then 4 noted
    assert not memo.admit(1) and memo.admit(4)


def _cold_and_warm(make: type, m: bytes, expect: bytes | None = None) -> tuple[object, object]:
    """The outcome of a full parse on cold memos, and of the third sighting."""
    cold()
    results = []
    for _ in range(3):
        p = make()
        if expect is not None:
            p.expect(expect)
        results.append(outcome(p, m))
    assert results[0] == results[1]
    return results[0], results[2]


@pytest.mark.parametrize("seed", [1, 2])
def test_memo_hits_agree_with_full_parses_on_every_corpus_and_mutated_request(seed: int) -> None:
    for m in list(CORPUS.values()) + _mutated(_REQUEST_SEEDS, seed, 600):
        full, hit = _cold_and_warm(HttptoolsRequestParser, m)
        assert full == hit, m


# -- responses --------------------------------------------------------------------------

def warm_response(data: bytes = OK) -> None:
    for _ in range(2):
        response_parser().feed(data)
    assert data.split(b"\r\n\r\n")[0] + b"\r\n\r\n" in response_memo()


def test_a_response_head_is_stored_on_its_second_sighting_and_hit_on_its_third() -> None:
    first = response_parser().feed(OK)
    assert response_memo() == {}
    response_parser().feed(OK)
    assert OK[:-2] in response_memo()
    third = response_parser().feed(OK)
    assert isinstance(first[0], Response) and isinstance(third[0], Response)
    assert first[0].raw == b"" and third[0].raw == OK[:-2]
    first[0].raw = OK[:-2]
    assert third == first and len(third) == 3 and third[2] is END
    assert isinstance(third[1], Data) and third[1].data == b"ok"


def test_response_heads_that_never_repeat_store_nothing() -> None:
    for i in range(1000):
        response_parser().feed(OK[:17] + b"X-Request-Id: %d\r\n" % i + OK[17:])
    assert response_memo() == {}


def test_a_memoised_head_with_another_body_of_its_length_gives_that_body() -> None:
    warm_response()
    events = response_parser().feed(OK[:-2] + b"no")
    assert isinstance(events[1], Data) and events[1].data == b"no"


def test_a_spoiled_memo_hit_does_not_spoil_the_memo() -> None:
    warm_response()
    p = response_parser()
    (resp, *_) = p.feed(OK)
    assert p.feed(b"HTTP/1.1 200 OK\r\n") == [] and isinstance(resp, Response)
    assert not resp.keep_alive  # bytes after a complete response: not reusable
    (again, *_) = response_parser().feed(OK)
    assert isinstance(again, Response) and again.keep_alive


@pytest.mark.parametrize("data", [OK + b"HTTP/1.1 200 OK\r\n", OK[:-1]],
                         ids=["more_than_its_length", "less_than_its_length"])
def test_a_memoised_head_with_the_wrong_number_of_bytes_takes_the_full_parse(
        data: bytes) -> None:
    warm_response()
    warm = outcome(response_parser(), data)
    cold()
    assert warm == outcome(response_parser(), data)


@pytest.mark.parametrize("data", [OK[:-2], OK], ids=["head", "head_and_a_body"])
def test_an_answer_to_head_is_never_taken_from_the_memo(data: bytes) -> None:
    warm_response()
    p = response_parser(b"HEAD")
    events = p.feed(data)
    assert [type(e) for e in events] == [Response, type(END)]
    assert isinstance(events[0], Response) and events[0].raw == b""
    # A body after the head that answers a HEAD is dropped, and spoils the connection.
    assert events[0].keep_alive == (data == OK[:-2])


def test_a_memo_hit_leaves_the_parser_ready_for_the_next_response() -> None:
    warm_response()
    p = response_parser()
    p.feed(OK)
    p.expect(b"GET")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    events = p.feed(chunked)
    assert isinstance(events[0], Response) and events[0].chunked
    assert [e.data for e in events if isinstance(e, Data)] == [b"hi"] and events[-1] is END


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 3000 + b"\r\nContent-Length: 2\r\n\r\nok",
], ids=["chunked", "close", "http10", "204", "interim", "large"])
def test_only_keep_alive_responses_framed_by_length_are_memoised(data: bytes) -> None:
    for _ in range(3):
        response_parser().feed(data)
    assert response_memo() == {}


@pytest.mark.parametrize("seed", [1, 2])
def test_memo_hits_agree_with_full_parses_on_every_corpus_and_mutated_response(
        seed: int) -> None:
    seeds = [v for v in RESPONSE_CORPUS.values() if len(v) < 200]
    for m in list(RESPONSE_CORPUS.values()) + _mutated(seeds, seed, 600):
        for method in (b"GET", b"HEAD"):
            full, hit = _cold_and_warm(HttptoolsResponseParser, m, method)
            assert full == hit, (m, method)


# -- heads built from memoised messages (wire.py) ------------------------------------------

def _memoised_request(data: bytes = GET) -> Request:
    (req, _) = parse_request(data, 3)
    assert isinstance(req, Request) and req.raw == data
    return req


def test_a_memoised_upstream_head_is_the_one_built_for_its_inputs() -> None:
    req = _memoised_request()
    inputs = [(b"/a", "10.0.0.1", b"x-cert: A\r\n"), (b"/a", "10.0.0.2", b"x-cert: A\r\n"),
              (b"/a", "10.0.0.1", b"x-cert: B\r\n"), (b"/b", "10.0.0.1", b"x-cert: A\r\n")]
    plain = dataclasses.replace(req, raw=b"")  # built afresh every time
    def head(r: Request, *args: Any) -> bytes:
        # Without the X-Request-Id the proxy generates for each request (none came).
        return re.sub(rb"x-request-id: [0-9a-f]{32}\r\n", b"",
                      wire.upstream_request_head(r, *args, memos=MEMOS))
    for _ in range(3):
        for target, ip, block in inputs:
            assert head(req, target, ip, block) == head(plain, target, ip, block)
    heads = {head(req, *i) for i in inputs}
    assert len(heads) == len(inputs)


def test_a_memoised_upstream_head_is_never_reused_where_more_names_are_replaced() -> None:
    # A head built where a client's Tenant-Id was kept (a route without the token rule)
    # must not be handed to a route that protects Tenant-Id (found by an attack: the
    # memo's key lacked ``replaced``).
    req = dataclasses.replace(_memoised_request(),
                              headers=[(b"host", b"a"), (b"tenant-id", b"acme-admin")])
    memos = HeadMemos()
    for _ in range(3):
        open_head = wire.upstream_request_head(req, b"/a", "10.0.0.1", b"", memos=memos)
        assert b"tenant-id: acme-admin" in open_head
    protected = wire.upstream_request_head(req, b"/a", "10.0.0.1", b"",
                                           replaced=frozenset({b"tenant-id"}), memos=memos)
    assert b"tenant-id" not in protected


def test_a_memoised_client_head_follows_the_drain() -> None:
    req = _memoised_request()
    warm_response()
    (resp, *_) = response_parser().feed(OK)
    assert isinstance(resp, Response) and resp.raw
    open_head, _, keep = wire.client_response_head(req, resp, False, MEMOS)
    closing_head, _, keep_draining = wire.client_response_head(req, resp, True, MEMOS)
    assert keep and not keep_draining
    assert b"connection: close" in closing_head and b"connection: close" not in open_head
    assert wire.client_response_head(req, resp, False, MEMOS)[0] == open_head


@pytest.mark.parametrize("draining", [False, True])
def test_a_memoised_client_head_is_the_one_built_for_any_request_it_answers(
        draining: bool) -> None:
    # Keyed by the response's bytes and what of the request the head depends on (HEAD,
    # HTTP/1.0, keep-alive): requests that never repeat share it, and each gets its own.
    warm_response()
    (resp, *_) = response_parser().feed(OK)
    assert isinstance(resp, Response) and resp.raw
    plain_resp = dataclasses.replace(resp, raw=b"")
    memos = HeadMemos()
    requests = [make_request(method, b"/u%d" % i, version, headers, validated=True)
                for i, (method, version, headers) in enumerate([
                    (b"GET", b"1.1", [(b"host", b"a")]),
                    (b"HEAD", b"1.1", [(b"host", b"a")]),
                    (b"GET", b"1.0", []),
                    (b"GET", b"1.0", [(b"connection", b"keep-alive")]),
                    (b"GET", b"1.1", [(b"host", b"a"), (b"connection", b"close")]),
                    (b"DELETE", b"1.1", [(b"host", b"b"), (b"x-trace", b"1")]),
                ])]
    for _ in range(3):
        for req in requests:
            assert wire.client_response_head(req, resp, draining, memos) == \
                wire.client_response_head(req, plain_resp, draining)
    assert memos.client_heads.entries  # stored, and hit on the third round


def test_the_wire_memos_store_on_the_second_sighting_and_stay_bounded() -> None:
    req = _memoised_request()
    wire.upstream_request_head(req, b"/a", "10.0.0.1", b"", memos=MEMOS)
    assert MEMOS.upstream_heads.entries == {}
    wire.upstream_request_head(req, b"/a", "10.0.0.1", b"", memos=MEMOS)
    assert len(MEMOS.upstream_heads.entries) == 1
    for i in range(600):
        for _ in range(2):
            wire.upstream_request_head(req, b"/a", f"10.0.{i // 256}.{i % 256}", b"",
                                       memos=MEMOS)
    assert 0 < len(MEMOS.upstream_heads.entries) <= 256


def test_random_requests_through_the_memo_match_their_full_parse() -> None:
    # Requests that differ in one header out of many: the memo must never hand one
    # request's fields to another.
    rng = random.Random(7)
    heads = [b"GET /%d HTTP/1.1\r\nHost: x\r\nX-N: %d\r\n\r\n" % (rng.randrange(40),
                                                                   rng.randrange(40))
             for _ in range(400)]
    for head in heads:
        (req, _) = HttptoolsRequestParser(memos=MEMOS).feed(head)
        assert isinstance(req, Request)
        target, n = head.split(b" ")[1], head.split(b"X-N: ")[1].split(b"\r\n")[0]
        assert req.target == target and (b"x-n", n) in req.headers


# -- a connection whose heads do not repeat rests from the memo -----------------------------

def _unique_request(i: int) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: %d\r\n\r\n" % i


def test_a_request_parser_that_keeps_missing_rests_from_the_memo_then_looks_again() -> None:
    parse_request(GET, 2)  # stored: a third sighting would be a hit
    p = HttptoolsRequestParser(memos=MEMOS)
    for i in range(MISS_STREAK):
        p.feed(_unique_request(i))
    (resting, _) = p.feed(GET)
    assert isinstance(resting, Request) and resting.raw == b""  # parsed in full
    for i in range(RESTING - 1):
        p.feed(_unique_request(100 + i))
    (again, _) = p.feed(GET)
    assert isinstance(again, Request) and again.raw == GET  # looking again: a hit
    assert resting == dataclasses.replace(again, raw=b"")


def test_a_hit_ends_a_run_of_misses() -> None:
    parse_request(GET, 2)
    p = HttptoolsRequestParser(memos=MEMOS)
    for round_ in range(3):
        for i in range(MISS_STREAK - 1):
            p.feed(_unique_request(round_ * 100 + i))
        (req, _) = p.feed(GET)
        assert isinstance(req, Request) and req.raw == GET


def test_a_response_parser_that_keeps_missing_rests_from_the_memo_then_looks_again() -> None:
    warm_response()
    p = HttptoolsResponseParser(memos=MEMOS)

    def answer(data: bytes) -> Response:
        p.expect(b"GET")
        (resp, *_) = p.feed(data)
        assert isinstance(resp, Response)
        return resp

    for i in range(MISS_STREAK):
        answer(OK[:17] + b"X-Request-Id: %d\r\n" % i + OK[17:])
    assert answer(OK).raw == b""
    for i in range(RESTING - 1):
        answer(OK[:17] + b"X-Request-Id: %d\r\n" % (100 + i) + OK[17:])
    assert answer(OK).raw == OK[:-2]
