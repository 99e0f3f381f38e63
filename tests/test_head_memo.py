"""The head memo (http/parser.py, "the head memo"; http/wire.py): a read that repeats the
exact bytes of a head parsed before is answered from a memo instead of llhttp's callbacks,
and the heads built from such a request or response are memoised too.

What must hold: a hit gives exactly what a full parse gives from the same state; a hit is
only taken where llhttp stands between messages; nothing a hit hands out is shared; and
the heads built from memoised requests never mix one client's identity into another's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http import parser as parser_module
from mtlsproxy.http import wire
from mtlsproxy.http.parser import (
    END,
    Data,
    Event,
    HttptoolsRequestParser,
    HttptoolsResponseParser,
    Request,
    Response,
)
from tests.conftest import Harness, make_cert
from tests.test_fast_path import fast_exchanges
from tests.test_parser import _REQUEST_SEEDS, CORPUS, RESPONSE_CORPUS, _mutated

GET = b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"
OK = (b"HTTP/1.1 200 OK\r\nServer: s\r\nDate: Mon, 30 Nov 2026 10:00:00 GMT\r\n"
      b"Content-Length: 2\r\n\r\nok")


@pytest.fixture(autouse=True)
def empty_memos() -> Iterator[None]:
    """Each test starts with cold memos (they are per process)."""
    for memos in (parser_module._REQUEST_MEMOS, parser_module._RESPONSE_MEMOS):
        for memo in memos.values():
            memo.clear()
    wire._UPSTREAM_HEADS.clear()
    wire._CLIENT_HEADS.clear()
    yield


def request_memo(limit: int = 32768) -> dict[bytes, object]:
    return parser_module._REQUEST_MEMOS.get(limit, {})  # type: ignore[return-value]


def response_memo(limit: int = 65536) -> dict[bytes, object]:
    return parser_module._RESPONSE_MEMOS.get(limit, {})  # type: ignore[return-value]


def outcome(parser: HttptoolsRequestParser | HttptoolsResponseParser,
            *reads: bytes) -> object:
    events: list[Event] = []
    try:
        for data in reads:
            events += parser.feed(data)
    except RemoteProtocolError as exc:
        return ("rejected", exc.status_hint)
    # ``raw`` aside: it is set on hits only (the key for the memos in wire.py).
    return ("accepted", [(type(e).__name__, getattr(e, "__slots__", None) and
                          {s: getattr(e, s) for s in e.__slots__ if s != "raw"})
                         for e in events])


def response_parser(method: bytes = b"GET") -> HttptoolsResponseParser:
    p = HttptoolsResponseParser()
    p.expect(method)
    return p


# -- requests ---------------------------------------------------------------------------

def test_a_repeated_request_read_gives_what_its_full_parse_gave() -> None:
    first = HttptoolsRequestParser().feed(GET)
    assert GET in request_memo()
    second = HttptoolsRequestParser().feed(GET)
    assert isinstance(first[0], Request) and isinstance(second[0], Request)
    # raw names a hit (a head seen twice): only those key the memos of wire.py.
    assert first[0].raw == b"" and second[0].raw == GET
    first[0].raw = GET
    assert second == first and second[1] is END


def test_request_memo_hits_hand_out_fresh_objects() -> None:
    HttptoolsRequestParser().feed(GET)
    a, _ = HttptoolsRequestParser().feed(GET)
    assert isinstance(a, Request)
    a.headers.append((b"x-client-cert", b"mine"))
    a.keep_alive = False
    b, _ = HttptoolsRequestParser().feed(GET)
    assert isinstance(b, Request)
    assert b is not a and b.keep_alive and (b"x-client-cert", b"mine") not in b.headers


def test_a_request_after_one_that_closes_the_connection_is_refused_even_if_memoised() -> None:
    HttptoolsRequestParser().feed(GET)
    p = HttptoolsRequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        p.feed(GET)


@pytest.mark.parametrize("before", [b"GET /x", b"POST / HTTP/1.1\r\nHost: x\r\n",
                                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70\r\n\r\n",
                                    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                                    b"\r\n\r\n46\r\n"],
                         ids=["mid_request_line", "mid_head", "mid_body", "mid_chunk"])
def test_memoised_bytes_inside_a_message_are_parsed_as_its_continuation(before: bytes) -> None:
    HttptoolsRequestParser().feed(GET)
    warm = outcome(HttptoolsRequestParser(), before, GET)
    for memo in parser_module._REQUEST_MEMOS.values():
        memo.clear()
    assert warm == outcome(HttptoolsRequestParser(), before, GET)
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
    p = HttptoolsRequestParser()
    for data in reads:
        p.feed(data)
    assert request_memo() == {}


def test_memos_are_kept_per_header_limit() -> None:
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 200 + b"\r\n\r\n"
    HttptoolsRequestParser(4096).feed(big)
    assert big in request_memo(4096)
    with pytest.raises(RemoteProtocolError) as err:
        HttptoolsRequestParser(100).feed(big)
    assert err.value.status_hint == 431


def test_a_full_request_memo_is_emptied_and_goes_on_memoising() -> None:
    limit = parser_module._MEMO_ENTRIES
    heads = [b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(limit + 1)]
    for head in heads:
        HttptoolsRequestParser().feed(head)
    assert list(request_memo()) == [heads[-1]]
    again = HttptoolsRequestParser().feed(heads[0])
    assert isinstance(again[0], Request) and again[0].target == b"/0"


def _cold_and_warm(make: type, m: bytes, expect: bytes | None = None) -> tuple[object, object]:
    for memos in (parser_module._REQUEST_MEMOS, parser_module._RESPONSE_MEMOS):
        for memo in memos.values():
            memo.clear()
    results = []
    for _ in range(2):
        p = make()
        if expect is not None:
            p.expect(expect)
        results.append(outcome(p, m))
    return results[0], results[1]


@pytest.mark.parametrize("seed", [1, 2])
def test_memo_hits_agree_with_full_parses_on_every_corpus_and_mutated_request(seed: int) -> None:
    for m in list(CORPUS.values()) + _mutated(_REQUEST_SEEDS, seed, 600):
        cold, warm = _cold_and_warm(HttptoolsRequestParser, m)
        assert cold == warm, m


# -- responses --------------------------------------------------------------------------

def test_a_repeated_response_read_gives_what_its_full_parse_gave() -> None:
    first = response_parser().feed(OK)
    assert OK[:-2] in response_memo()
    second = response_parser().feed(OK)
    assert isinstance(first[0], Response) and isinstance(second[0], Response)
    assert first[0].raw == b"" and second[0].raw == OK[:-2]
    first[0].raw = OK[:-2]
    assert second == first and len(second) == 3 and second[2] is END
    assert isinstance(second[1], Data) and second[1].data == b"ok"


def test_a_memoised_head_with_another_body_of_its_length_gives_that_body() -> None:
    response_parser().feed(OK)
    events = response_parser().feed(OK[:-2] + b"no")
    assert isinstance(events[1], Data) and events[1].data == b"no"


def test_a_spoiled_memo_hit_does_not_spoil_the_memo() -> None:
    response_parser().feed(OK)
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
    response_parser().feed(OK)
    warm = outcome(response_parser(), data)
    response_memo().clear()
    assert warm == outcome(response_parser(), data)


@pytest.mark.parametrize("data", [OK[:-2], OK], ids=["head", "head_and_a_body"])
def test_an_answer_to_head_is_never_taken_from_the_memo(data: bytes) -> None:
    response_parser().feed(OK)
    p = response_parser(b"HEAD")
    events = p.feed(data)
    assert [type(e) for e in events] == [Response, type(END)]
    assert isinstance(events[0], Response) and events[0].raw == b""
    # A body after the head that answers a HEAD is dropped, and spoils the connection.
    assert events[0].keep_alive == (data == OK[:-2])


def test_a_memo_hit_leaves_the_parser_ready_for_the_next_response() -> None:
    response_parser().feed(OK)
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
    response_parser().feed(data)
    assert response_memo() == {}


@pytest.mark.parametrize("seed", [1, 2])
def test_memo_hits_agree_with_full_parses_on_every_corpus_and_mutated_response(
        seed: int) -> None:
    seeds = [v for v in RESPONSE_CORPUS.values() if len(v) < 200]
    for m in list(RESPONSE_CORPUS.values()) + _mutated(seeds, seed, 600):
        for method in (b"GET", b"HEAD"):
            cold, warm = _cold_and_warm(HttptoolsResponseParser, m, method)
            assert cold == warm, (m, method)


# -- heads built from memoised messages (wire.py) ------------------------------------------

def _memoised_request(data: bytes = GET) -> Request:
    HttptoolsRequestParser().feed(data)
    (req, _) = HttptoolsRequestParser().feed(data)
    assert isinstance(req, Request) and req.raw == data
    return req


def test_a_memoised_upstream_head_is_the_one_built_for_its_inputs() -> None:
    req = _memoised_request()
    inputs = [(b"/a", "10.0.0.1", b"x-cert: A\r\n"), (b"/a", "10.0.0.2", b"x-cert: A\r\n"),
              (b"/a", "10.0.0.1", b"x-cert: B\r\n"), (b"/b", "10.0.0.1", b"x-cert: A\r\n")]
    for _ in range(2):
        for target, ip, block in inputs:
            assert wire.upstream_request_head(req, target, ip, block) == \
                wire._upstream_request_head(req, target, ip, block)
    heads = {wire.upstream_request_head(req, *i) for i in inputs}
    assert len(heads) == len(inputs)


def test_a_memoised_client_head_follows_the_drain() -> None:
    req = _memoised_request()
    response_parser().feed(OK)
    (resp, *_) = response_parser().feed(OK)
    assert isinstance(resp, Response) and resp.raw
    open_head, _, keep = wire.client_response_head(req, resp, False)
    closing_head, _, keep_draining = wire.client_response_head(req, resp, True)
    assert keep and not keep_draining
    assert b"connection: close" in closing_head and b"connection: close" not in open_head
    assert wire.client_response_head(req, resp, False)[0] == open_head


def test_the_wire_memos_stay_bounded() -> None:
    req = _memoised_request()
    for i in range(wire._MEMO_ENTRIES * 2):
        wire.upstream_request_head(req, b"/a", f"10.0.{i // 256}.{i % 256}", b"")
    assert 0 < len(wire._UPSTREAM_HEADS) <= wire._MEMO_ENTRIES


# -- through the proxy ----------------------------------------------------------------------

def test_identical_requests_from_two_clients_carry_each_its_own_identity(
        proxy: Harness, parser_kind: str) -> None:
    other = make_cert("other-client", proxy.pki.inter, dns=("other.example.test",))
    clients = [proxy.https(), proxy.https(proxy.client_context(other, name="other"))]
    seen: list[list[dict[str, str]]] = [[], []]
    for _ in range(3):
        for i, conn in enumerate(clients):  # byte-identical requests, interleaved
            conn.request("GET", "/same")
            r = conn.getresponse()
            assert r.status == 200
            seen[i].append({n: v for n, v in json.loads(r.read())["headers"]})
    for conn in clients:
        conn.close()
    assert fast_exchanges(proxy) >= 4  # at least the 2nd and 3rd of each client
    if parser_kind == "httptools":  # both clients' heads came through the memos
        assert sum(b"/same" in key[0] for key in list(wire._UPSTREAM_HEADS)) == 2
    for own in seen:
        assert own[0] == own[1] == own[2]
    subjects = [{v for n, v in own[0].items() if "subject" in n or n == "client-cert"}
                for own in seen]
    assert subjects[0] and subjects[1] and subjects[0] != subjects[1]
    assert any("good-client" in v for v in subjects[0])
    assert any("other-client" in v for v in subjects[1])


def test_random_requests_through_the_memo_match_their_full_parse() -> None:
    # Requests that differ in one header out of many: the memo must never hand one
    # request's fields to another.
    rng = random.Random(7)
    heads = [b"GET /%d HTTP/1.1\r\nHost: x\r\nX-N: %d\r\n\r\n" % (rng.randrange(40),
                                                                   rng.randrange(40))
             for _ in range(400)]
    for head in heads:
        (req, _) = HttptoolsRequestParser().feed(head)
        assert isinstance(req, Request)
        target, n = head.split(b" ")[1], head.split(b"X-N: ")[1].split(b"\r\n")[0]
        assert req.target == target and (b"x-n", n) in req.headers
