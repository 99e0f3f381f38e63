"""The sans-IO parsing seam, without sockets: both implementations, and a differential
test that holds them to accepting exactly the same messages."""

from __future__ import annotations

import random

import pytest

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http import wire
from mtlsproxy.http.parser import (
    END,
    Data,
    EndOfMessage,
    Event,
    H11RequestParser,
    H11ResponseParser,
    HttptoolsRequestParser,
    HttptoolsResponseParser,
    Request,
    Response,
    request_parser,
    response_parser,
)


def feed_all(parser_kind: str, data: bytes, split: int | None = None) -> list[Event]:
    p = request_parser(parser_kind, 32768)
    if split is None:
        return p.feed(data)
    events: list[Event] = []
    for i in range(0, len(data), split):
        events += p.feed(data[i:i + split])
    return events


@pytest.mark.parametrize("split", [None, 1, 9])
def test_an_upgrade_request_stops_the_parser_and_holds_what_follows(
        parser_kind: str, split: int | None) -> None:
    p = request_parser(parser_kind, 32768)
    head = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n"
            b"Upgrade: websocket, h2c\r\n\r\n")
    after = b"\x81\x05hello" + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    data = head + after
    events: list[Event] = []
    step = split or len(data)
    for i in range(0, len(data), step):
        events += p.feed(data[i:i + step])
    assert [type(e) for e in events] == [Request, EndOfMessage]
    req = events[0]
    assert isinstance(req, Request)
    assert req.upgrade == b"websocket" and not req.keep_alive
    assert p.take_held() == after and p.take_held() == b""
    assert p.feed(b"more") == [] and p.take_held() == b"more"


def test_a_simple_request_parses_to_head_and_end(parser_kind: str) -> None:
    events = feed_all(parser_kind, b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Y:  z \r\n\r\n")
    assert len(events) == 2
    req = events[0]
    assert isinstance(req, Request)
    assert (req.method, req.target, req.http_version) == (b"GET", b"/a?b=c", b"1.1")
    assert req.headers == [(b"host", b"x"), (b"x-y", b"z")]
    assert req.keep_alive and not req.has_body
    assert isinstance(events[1], EndOfMessage)


def test_bodies_parse_the_same_fed_byte_by_byte(parser_kind: str) -> None:
    msg = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
           b"PUT /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    events = feed_all(parser_kind, msg, split=1)
    heads = [e for e in events if isinstance(e, Request)]
    assert [h.target for h in heads] == [b"/", b"/2"]
    assert heads[0].chunked and heads[1].content_length == 3
    body = b"".join(e.data for e in events if isinstance(e, Data))
    assert body == b"hello worldabc"
    assert sum(isinstance(e, EndOfMessage) for e in events) == 2


def test_http10_and_connection_close_are_not_keep_alive(parser_kind: str) -> None:
    (req, _) = feed_all(parser_kind, b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(req, Request) and not req.keep_alive
    (req, _) = feed_all(parser_kind, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert isinstance(req, Request) and not req.keep_alive


def test_an_endless_header_line_hits_431_before_it_ends(parser_kind: str) -> None:
    p = request_parser(parser_kind, 4096)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ")
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(10):
            p.feed(b"a" * 1000)
    assert info.value.status_hint == 431


# Malformed and ambiguous inputs (request smuggling vectors and friends).
CHUNK_LINES = {
    "ext_space": b"2; x=y", "ext_space_before_eq": b"2;x =y", "ext_tab": b"2;\t=y",
    "bare_semicolon": b"2;", "trailing_semicolon": b"2;x=y;", "empty_name": b"2;=y",
    "empty_exts": b"2;;x", "quoted": b'2;x="a b"', "quoted_then_junk": b'2;x="a"b',
    "two_equals": b"2;x=y=z", "size_space": b"2 ", "size_leading_zeros": b"0002",
    "token_then_quoted": b'2;x=a"b c"', "two_quoted": b'2;x="a""b"',
}

CORPUS = {
    "ok": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 3\r\n\r\n0\r\n\r\n",
    "two_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
    # RFC 9110 section 8.6 lets a recipient take identical values; llhttp and nginx refuse.
    "cl_list_same": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "two_same_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                   b"Content-Length: 3\r\n\r\nabc",
    # RFC 9112 section 6.1: a Transfer-Encoding in HTTP/1.0 is faulty framing.
    "http10_te": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    # Host values nginx refuses (ngx_http_validate_host), and ones it takes.
    "host_slash": b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    "host_space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "host_empty": b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
    "host_dotdot": b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
    "host_backslash": b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n",
    "host_port": b"GET / HTTP/1.1\r\nHost: api.example:8443\r\n\r\n",
    "host_ipv6": b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
    "te_gzip": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_identity": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    "te_space": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
    "obs_fold_tab": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare_lf_header": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "bare_lf_last_header": b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    "bare_lf_blank_line": b"GET / HTTP/1.1\r\nHost: a\r\n\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "nul_value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "nul_name": b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: b\r\n\r\n",
    "nul_target": b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "no_host": b"GET / HTTP/1.1\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "http2_version": b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    "http12_version": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    "lower_method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    "unknown_method": b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
    "connect": b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    # After an upgrade request nothing is parsed: a request smuggled behind it never is.
    "websocket_then_more": b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                           b"Upgrade: WebSocket/13\r\nSec-WebSocket-Key: x\r\n\r\n"
                           b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "upgrade_with_body": b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
    "upgrade_http10": b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\nGET /smuggled HTTP/1.0\r\n\r\n",
    "chunk_bad_size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk_bare_lf": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\nabc\n0\n\n",
    # RFC 9112 section 7.1.2: trailer fields after the last chunk (dropped by both).
    "chunk_trailers": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n"
                      b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    "chunk_ext": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3;x=y\r\nabc\r\n0\r\n\r\n",
    "absolute_fragment_after_authority": b"GET http://h#p HTTP/1.1\r\nHost: h\r\n\r\n",
    "absolute_fragment_after_port": b"GET http://h:80# HTTP/1.1\r\nHost: h\r\n\r\n",
    "absolute_fragment_in_path": b"GET http://h/p#f HTTP/1.1\r\nHost: h\r\n\r\n",
    "te_trailing_tab": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n"
                       b"2\r\nok\r\n0\r\n\r\n",
    "te_trailing_spaces": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked  \r\n\r\n"
                          b"2\r\nok\r\n0\r\n\r\n",
    "absolute_quote_in_authority": b'GET http://h"p/ HTTP/1.1\r\nHost: h\r\n\r\n',
    "absolute_brace_in_authority": b"GET http://h{p/ HTTP/1.1\r\nHost: h\r\n\r\n",
    "absolute_ipv6_authority": b"GET http://[::1]:8080/p HTTP/1.1\r\nHost: h\r\n\r\n",
    "absolute_subdelims_authority": b"GET http://a-b.c_d~e/p HTTP/1.1\r\nHost: h\r\n\r\n",
    "http10_close_then_empty_line": b"GET / HTTP/1.0\r\n\r\n\r\n",
    "http10_close_then_request": b"GET / HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
    "close_then_request": b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                          b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    # Chunk-size lines as llhttp (strict) takes them: no spaces, no bare ";".
    **{f"chunk_line_{name}": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
       + line + b"\r\nok\r\n0\r\n\r\n" for name, line in CHUNK_LINES.items()},
    "neg_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "plus_cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "header_no_colon": b"GET / HTTP/1.1\r\nHost: a\r\nfoo\r\n\r\n",
    "target_space": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "target_not_origin": b"GET a HTTP/1.1\r\nHost: a\r\n\r\n",
    # RFC 9112 section 3.2.2: absolute-form, which a server MUST accept; the authority
    # replaces the Host header (both parsers turn it into the same origin-form request).
    "absolute_form": b"GET http://api.example:8443/v1?x=1 HTTP/1.1\r\nHost: other\r\n\r\n",
    "absolute_form_http10_no_host": b"GET https://api.example HTTP/1.0\r\n\r\n",
    "absolute_form_userinfo": b"GET http://u:p@api.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "oversized": b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40000 + b"\r\n\r\n",
    "utf8_value": "GET / HTTP/1.1\r\nHost: a\r\nX: é\r\n\r\n".encode(),
    "tab_value": b"GET / HTTP/1.1\r\nHost: a\r\nX:\tb\t\r\n\r\n",
    "pipelined": b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    # The line rules hold for a pipelined head that arrives with the one before it.
    "pipelined_bare_lf": b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                         b"GET /2 HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "pipelined_obs_fold": b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                          b"GET /2 HTTP/1.1\r\nHost: a\r\nX: y\r\n z\r\n\r\n",
    # RFC 9112 section 2.2: empty lines before a request line are ignored (llhttp skips
    # any CR and LF bytes there), e.g. the CRLF some clients send after a POST body.
    "leading_crlf": b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "leading_lf": b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "crlf_after_body": b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab\r\n"
                       b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
    "http10_keep_alive_pipelined": b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                                   b"GET /2 HTTP/1.0\r\n\r\n",
    "http10_data_after_close": b"GET /1 HTTP/1.0\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
}


def _outcome(kind: str, data: bytes, split: int | None) -> tuple[str, object]:
    try:
        events = feed_all(kind, data, split)
    except RemoteProtocolError as exc:
        return "rejected", exc.status_hint
    return "accepted", [(type(e).__name__, getattr(e, "target", None),
                         getattr(e, "headers", None), getattr(e, "data", None))
                        for e in events]


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("split", [None, 7])
def test_both_parsers_agree_on_what_to_accept(name: str, split: int | None) -> None:
    """Neither parser forwards anything the other rejects; accepted messages are the same."""
    fast = _outcome("httptools", CORPUS[name], split)
    strict = _outcome("h11", CORPUS[name], split)
    assert fast[0] == strict[0], (fast, strict)
    if fast[0] == "accepted":
        assert fast == strict


@pytest.mark.parametrize("name", ["cl_and_te", "te_and_cl", "two_cl", "cl_list_same",
                                  "two_same_cl", "http10_te", "host_slash", "host_space",
                                  "host_empty", "host_dotdot", "obs_fold", "bare_lf",
                                  "nul_value", "chunk_bare_lf", "no_host", "oversized"])
def test_smuggling_vectors_are_rejected(name: str, parser_kind: str) -> None:
    with pytest.raises(RemoteProtocolError):
        feed_all(parser_kind, CORPUS[name])


@pytest.mark.parametrize("name, status", [("oversized", 431), ("te_gzip", 501),
                                          ("http2_version", 505), ("connect", 501),
                                          ("upgrade_with_body", 400)])
def test_rejections_carry_the_status_to_answer(name: str, status: int,
                                               parser_kind: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        feed_all(parser_kind, CORPUS[name])
    assert info.value.status_hint == status


# -- responses ------------------------------------------------------------------------

# Upstream responses held to the same agreement: the upstream is configured rather than
# chosen by a client, but h11 is the reference only if it refuses what llhttp refuses
# (parser: h11 must not forward a response the default would answer with 502).
RESPONSE_CORPUS = {
    "ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "close_delimited": b"HTTP/1.1 200 OK\r\n\r\nabc",
    "http10": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "no_reason": b"HTTP/1.1 204 \r\n\r\n",
    "interim_then_final": b"HTTP/1.1 100 Continue\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "interim_then_bare_lf": b"HTTP/1.1 100 Continue\r\n\r\n"
                            b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    "chunk_trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\n\r\n",
    "chunk_ext": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\n\r\n",
    **{f"chunk_line_{name}": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
       + line + b"\r\nok\r\n0\r\n\r\n" for name, line in CHUNK_LINES.items()},
    "tab_value": b"HTTP/1.1 200 OK\r\nX:\tb\t\r\nContent-Length: 0\r\n\r\n",
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nok\r\n0\r\n\r\n",
    "two_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
    "two_same_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl_list_same": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "neg_cl": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "te_gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "bare_lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "bare_lf_header": b"HTTP/1.1 200 OK\r\nX: y\nContent-Length: 0\r\n\r\n",
    "bare_lf_last_header": b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n",
    "bare_lf_blank_line": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n",
    "nul_value": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "space_before_colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "header_no_colon": b"HTTP/1.1 200 OK\r\nfoo\r\nContent-Length: 0\r\n\r\n",
    "status_four_digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "http2_version": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http09_version": b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http12_version": b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status_below_100": b"HTTP/1.1 034 X\r\nContent-Length: 0\r\n\r\n",
    "status_000": b"HTTP/1.1 000 X\r\nContent-Length: 0\r\n\r\n",
    "status_600": b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n",
    "status_599": b"HTTP/1.1 599 X\r\nContent-Length: 0\r\n\r\n",
    "interim_bad_version": b"HTTP/1.7 100 Continue\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "leading_crlf": b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "leading_lf": b"\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "te_trailing_tab": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\t\r\n\r\n"
                       b"2\r\nok\r\n0\r\n\r\n",
    "http10_then_more": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok7",
    "http10_then_more_later": b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nokkkkkkk",
    "interim_nul_reason": b"HTTP/1.1 100 \x00ontinue\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "trailer_del_value": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nok\r\n0\r\nGrpc-Status:\x7f 0\r\n\r\n",
    "trailer_no_colon": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n0\r\nGrpc-Status\r\n\r\n",
    "trailer_space_before_colon": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"2\r\nok\r\n0\r\nGrpc-Status : 0\r\n\r\n",
    # Bytes after a complete response: dropped, and the connection is not reused
    # (keep_alive False), whichever read they come in.
    "two_responses": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    "body_after_204": b"HTTP/1.1 204 No Content\r\n\r\nabc",
    "garbage_after_response": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\x00\x01",
    "chunk_bad_size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "chunk_bare_lf": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\n0\n\n",
    "chunk_bare_lf_after_last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"2\r\nok\r\n0\r\n\n",
    "chunk_bare_lf_size_line": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"2\nok\r\n0\r\n\r\n",
    "nul_in_reason": b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",
    "control_in_reason": b"HTTP/1.1 200 O\x1bK\r\nContent-Length: 0\r\n\r\n",
    "tab_in_reason": b"HTTP/1.1 200 O\tK\r\nContent-Length: 0\r\n\r\n",
    "oversized": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
    # Framing fields spelt in other cases, with tabs, look-alike names, or naming others.
    "framing_mixed_case": b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 2\r\nCONNECTION: Close\r\n\r\nok",
    "framing_value_tabs": b"HTTP/1.1 200 OK\r\nContent-Length:\t2\t\r\n\r\nok",
    "framing_lookalikes": b"HTTP/1.1 200 OK\r\nX-Content-Length: 9\r\nConnection-X: close\r\n"
                          b"Content-Length: 2\r\n\r\nok",
    "empty_cl": b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
    "connection_names_field": b"HTTP/1.1 200 OK\r\nConnection: X-A\r\nX-A: 1\r\n"
                              b"Content-Length: 2\r\n\r\nok",
    "http10_keep_alive": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                         b"Content-Length: 2\r\n\r\nok",
}


def _response_outcome(kind: str, data: bytes, split: int | None) -> tuple[str, object]:
    p = response_parser(kind)
    p.expect(b"GET")
    pieces = [data] if split is None else [data[i:i + split] for i in range(0, len(data), split)]
    events: list[Event] = []
    try:
        for piece in pieces:
            events += p.feed(piece)
        if not any(e is END for e in events):
            events += p.feed_eof()
    except RemoteProtocolError as exc:
        return "rejected", exc.status_hint
    # Bodies compared whole: the parsers may cut the same bytes into different events.
    heads = [(type(e).__name__, getattr(e, "status", None), getattr(e, "headers", None),
              getattr(e, "keep_alive", None)) for e in events if not isinstance(e, Data)]
    return "accepted", (heads, b"".join(e.data for e in events if isinstance(e, Data)))


@pytest.mark.parametrize("name", sorted(RESPONSE_CORPUS))
@pytest.mark.parametrize("split", [None, 7])
def test_both_response_parsers_agree_on_what_to_accept(name: str, split: int | None) -> None:
    fast = _response_outcome("httptools", RESPONSE_CORPUS[name], split)
    strict = _response_outcome("h11", RESPONSE_CORPUS[name], split)
    assert fast[0] == strict[0], (fast, strict)
    if fast[0] == "accepted":
        assert fast == strict
    else:
        assert fast[1] == strict[1] == 502


def _final_response(kind: str, data: bytes) -> Response:
    p = response_parser(kind)
    p.expect(b"GET")
    events = p.feed(data)
    if not any(e is END for e in events):
        events += p.feed_eof()
    return next(e for e in events if isinstance(e, Response))


@pytest.mark.parametrize("name", sorted(
    n for n in RESPONSE_CORPUS if _response_outcome("h11", RESPONSE_CORPUS[n], None)[0]
    == "accepted"))
@pytest.mark.parametrize("client", [b"1.1", b"1.0"])
def test_both_response_parsers_give_the_client_the_same_head(name: str, client: bytes) -> None:
    # Not only the same events: the same head for the client, whichever parser read the
    # upstream's (HTTP/1.0 clients get close-delimited and chunked bodies unchunked).
    req = Request(b"GET", b"/", client, [], True, False, None)
    heads = []
    for kind in ("httptools", "h11"):
        head, rechunk, keep = wire.client_response_head(
            req, _final_response(kind, RESPONSE_CORPUS[name]), False)
        assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
        heads.append((head, rechunk, keep))
    assert heads[0] == heads[1]


@pytest.mark.parametrize("cls", [HttptoolsResponseParser, H11ResponseParser])
def test_response_to_head_ends_after_its_head(cls: type) -> None:
    p = cls()
    p.expect(b"HEAD")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert isinstance(events[0], Response) and events[1:] == [END]
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert [type(e) for e in events] == [Response, Data, EndOfMessage]


@pytest.mark.parametrize("cls", [HttptoolsResponseParser, H11ResponseParser])
def test_close_delimited_response_ends_at_eof(cls: type) -> None:
    p = cls()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.0 200 OK\r\n\r\nabc")
    assert isinstance(events[0], Response) and events[0].close_delimited
    assert not events[0].keep_alive
    assert [type(e) for e in p.feed_eof()] == [EndOfMessage]


@pytest.mark.parametrize("cls", [HttptoolsResponseParser, H11ResponseParser])
def test_truncated_response_is_an_error_at_eof(cls: type) -> None:
    p = cls()
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(RemoteProtocolError):
        p.feed_eof()


@pytest.mark.parametrize("kind", ["httptools", "h11"])
def test_interim_responses_are_reported_separately(kind: str) -> None:
    p = response_parser(kind)
    p.expect(b"POST")
    events = p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert [type(e).__name__ for e in events] == ["Informational", "Response", "EndOfMessage"]


def test_request_parsers_are_the_named_implementations() -> None:
    assert isinstance(request_parser("httptools", 1024), HttptoolsRequestParser)
    assert isinstance(request_parser("h11", 1024), H11RequestParser)



def test_connection_tokens_are_remembered_per_value_within_a_bound() -> None:
    from mtlsproxy.http import checks
    p = request_parser("httptools", 32768)
    for i in range(600):  # values a client chooses must not grow memory without bound
        events = p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-%d\r\n\r\n"
                        % i)
        req = events[0]
        assert isinstance(req, Request) and req.connection == {b"keep-alive", b"x-%d" % i}
    assert len(checks.TOKENS_OF) <= 256


# -- the header-size limit, checked without counting per header (httptools) -----------

def test_a_whole_request_head_over_the_limit_in_one_read_gets_431(parser_kind: str) -> None:
    p = request_parser(parser_kind, 4096)
    with pytest.raises(RemoteProtocolError) as info:
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: %s\r\n" % (b"a" * 5000) + b"\r\n")
    assert info.value.status_hint == 431


def test_a_small_head_in_a_large_read_is_not_held_to_the_read_size(parser_kind: str) -> None:
    p = request_parser(parser_kind, 4096)
    body = b"b" * 20000
    events = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n" + body
                    + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    heads = [e for e in events if isinstance(e, Request)]
    assert [h.target for h in heads] == [b"/", b"/next"]


def test_a_head_just_under_the_limit_passes_and_just_over_fails() -> None:
    # size = url + sum(name + value + 4): "/" 1, host 4+1+4, content-length 14+4+4,
    # x-a 3+n+4: 39 + n. A large read (the body) makes the exact sum necessary.
    for n, ok in ((4096 - 39, True), (4096 - 39 + 1, False)):
        p = HttptoolsRequestParser(4096)
        data = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                b"X-A: %s\r\n\r\n" % (b"a" * n) + b"z" * 5000)
        if ok:
            assert isinstance(p.feed(data)[0], Request)
        else:
            with pytest.raises(RemoteProtocolError) as info:
                p.feed(data)
            assert info.value.status_hint == 431


@pytest.mark.parametrize("piece", [None, 1000], ids=["one_read", "in_pieces"])
@pytest.mark.parametrize("cls", [HttptoolsResponseParser, H11ResponseParser])
def test_a_response_head_over_the_limit_gets_502(cls: type, piece: int | None) -> None:
    big = b"HTTP/1.1 200 OK\r\nX-A: %s\r\nContent-Length: 0\r\n\r\n" % (b"a" * 70000)
    step = piece or len(big)
    p = cls()
    p.expect(b"GET")
    with pytest.raises(RemoteProtocolError) as info:
        for i in range(0, len(big), step):
            p.feed(big[i:i + step])
    assert info.value.status_hint == 502


# -- the HTTP version of each message --------------------------------------------------

def test_each_pipelined_request_keeps_its_own_http_version(parser_kind: str) -> None:
    msg = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.0\r\n\r\n"
    for split in (None, 1, 20):
        heads = [e for e in feed_all(parser_kind, msg, split) if isinstance(e, Request)]
        assert [(h.http_version, h.keep_alive) for h in heads] == [(b"1.1", True),
                                                                  (b"1.0", False)], split


def test_a_request_after_a_body_in_the_same_read_keeps_its_own_version(
        parser_kind: str) -> None:
    msg = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
           b"GET /b HTTP/1.0\r\n\r\n")
    heads = [e for e in feed_all(parser_kind, msg) if isinstance(e, Request)]
    assert [h.http_version for h in heads] == [b"1.1", b"1.0"]


def test_a_request_after_leading_empty_lines_has_its_version() -> None:
    # llhttp skips an empty line before a request line (RFC 9112 section 2.2); h11 does not.
    (req, _) = HttptoolsRequestParser().feed(b"\r\nGET / HTTP/1.0\r\n\r\n")
    assert isinstance(req, Request) and req.http_version == b"1.0"


@pytest.mark.parametrize("split", [None, 1, 10])
@pytest.mark.parametrize("cls", [HttptoolsResponseParser, H11ResponseParser])
def test_a_final_response_after_an_interim_one_keeps_its_own_version(
        cls: type, split: int | None) -> None:
    msg = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nabc"
    p = cls()
    p.expect(b"POST")
    events: list[Event] = []
    for i in range(0, len(msg), split or len(msg)):
        events += p.feed(msg[i:i + (split or len(msg))])
    (resp,) = [e for e in events if isinstance(e, Response)]
    assert resp.http_version == b"1.0" and resp.close_delimited and not resp.keep_alive



def test_http10_keep_alive_requests_follow_each_other(parser_kind: str) -> None:
    # ab -k sends these; h11 alone would refuse the second as data after the end.
    req = b"GET /%d HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: x\r\n\r\n"
    p = request_parser(parser_kind, 32768)
    heads = [e for i in range(3) for e in p.feed(req % i) if isinstance(e, Request)]
    heads += [e for e in p.feed(req % 3 + req % 4) if isinstance(e, Request)]
    assert [(h.target, h.keep_alive) for h in heads] == [(b"/%d" % i, True) for i in range(5)]


def test_an_endless_trailer_line_is_refused(parser_kind: str) -> None:
    # httptools holds a trailer line until it ends: without a bound, one endless line
    # would grow without limit (a memory exhaustion).
    p = request_parser(parser_kind, 32768)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: ")
    with pytest.raises(RemoteProtocolError):
        for _ in range(100):
            p.feed(b"a" * 4096)


def test_a_long_chunked_body_read_in_pieces_is_not_mistaken_for_trailers(
        parser_kind: str) -> None:
    # Feeds that end right after a chunk's size line: the next one brings data.
    p = request_parser(parser_kind, 1024)
    events = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(50):
        events += p.feed(b"800\r\n")
        events += p.feed(b"x" * 0x800 + b"\r\n")
    events += p.feed(b"0\r\n\r\n")
    assert sum(len(e.data) for e in events if isinstance(e, Data)) == 50 * 0x800
    assert isinstance(events[-1], EndOfMessage)


@pytest.mark.parametrize("cls", [HttptoolsResponseParser, H11ResponseParser])
def test_a_chunked_response_with_trailers_ends_without_them(cls: type) -> None:
    p = cls()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n")
    assert [type(e).__name__ for e in events] == ["Response", "Data", "EndOfMessage"]
    assert events[1].data == b"abc"


def test_an_absolute_form_target_becomes_origin_form_with_its_authority_as_host(
        parser_kind: str) -> None:
    events = feed_all(parser_kind, CORPUS["absolute_form"])
    req = events[0]
    assert isinstance(req, Request)
    assert (req.target, req.host) == (b"/v1?x=1", b"api.example:8443")
    assert req.headers == [(b"host", b"api.example:8443")]
    req = feed_all(parser_kind, CORPUS["absolute_form_http10_no_host"])[0]
    assert isinstance(req, Request)
    assert (req.target, req.headers) == (b"/", [(b"host", b"api.example")])
    with pytest.raises(RemoteProtocolError):
        feed_all(parser_kind, CORPUS["absolute_form_userinfo"])


@pytest.mark.parametrize("kind", ["request", "response"])
def test_h11_checks_a_head_sent_a_byte_at_a_time_once_not_per_byte(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Checking the whole partial head on every read made a head trickled a byte per read
    # cost quadratic time on the event loop (a 30 KB head: 9.6 s of CPU).
    import mtlsproxy.http.checks as checks_module
    calls: list[int] = []
    real = checks_module.check_raw_head

    def counting(raw: bytes) -> None:
        calls.append(len(raw))
        real(raw)
    monkeypatch.setattr(checks_module, "check_raw_head", counting)
    lines = b"".join(b"x-%d: y\r\n" % i for i in range(200))
    p: H11RequestParser | H11ResponseParser
    if kind == "request":
        p = H11RequestParser()
        head = b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n"
    else:
        p = H11ResponseParser()
        p.expect(b"GET")
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + lines + b"\r\n"
    events: list[Event] = []
    for i in range(len(head)):
        events += p.feed(head[i:i + 1])
    assert calls == [len(head)]
    assert isinstance(events[0], Request if kind == "request" else Response)


# -- differential fuzzing ---------------------------------------------------------------

# Bytes that make parsers disagree when inserted, replaced or deleted: line ends, spaces,
# separators, digits, letters, control and non-ASCII bytes.
_MUTATION_BYTES = b"\r\n :\t,;0123456789aAzZ-/\x00\x7f\x80\"=?#"
_REQUEST_SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok",
    b"POST /x?y HTTP/1.1\r\nHost: a.b:80\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://h/p HTTP/1.1\r\nHost: h\r\n\r\n",
]


def _mutated(seeds: list[bytes], seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b) + 1)
            c = _MUTATION_BYTES[rng.randrange(len(_MUTATION_BYTES))]
            op = rng.random()
            if op < 0.4:
                b.insert(i, c)
            elif i < len(b):
                if op < 0.7:
                    b[i] = c
                else:
                    del b[i]
        out.append(bytes(b))
    return out


def _known_request_difference(m: bytes) -> bool:
    """Where the request parsers may differ, both failing closed or neither forwarding
    anything wrong: llhttp takes several spaces between the parts of a request line (as
    nginx does), h11 refuses them; and bytes after a complete request that cannot start
    another one make llhttp refuse the whole read, while h11 answers the request first."""
    if b"  " in m.split(b"\r\n", 1)[0]:
        return True
    cut = m.find(b"\r\n\r\n") + 4
    return 4 <= cut < len(m) and _outcome("httptools", m[:cut], None) == _outcome(
        "h11", m[:cut], None)


def _known_response_difference(m: bytes) -> bool:
    """An empty line after a complete response: h11 sees it and stops reusing the
    connection; llhttp cannot tell it apart (it skips empty lines before a status line,
    so the next response parses all the same)."""
    stripped = m.rstrip(b"\r\n")
    return stripped != m and _response_outcome("httptools", stripped, None) == \
        _response_outcome("h11", stripped, None)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_request_parsers_agree_on_mutated_requests(seed: int) -> None:
    # Seeded: a failure names its message. Incomplete messages (no event from one parser
    # yet) say nothing and are skipped.
    for m in _mutated(_REQUEST_SEEDS, seed, 1500):
        for split in (None, 3):
            fast, strict = _outcome("httptools", m, split), _outcome("h11", m, split)
            if (fast == ("accepted", []) or strict == ("accepted", [])
                    or fast[0] == strict[0] == "rejected"):
                continue
            assert fast == strict or _known_request_difference(m), (m, split, fast, strict)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_response_parsers_agree_on_mutated_responses(seed: int) -> None:
    seeds = [v for v in RESPONSE_CORPUS.values() if len(v) < 200]
    for m in _mutated(seeds, seed, 1500):
        for split in (None, 3):
            fast = _response_outcome("httptools", m, split)
            strict = _response_outcome("h11", m, split)
            if fast[0] == strict[0] == "rejected":
                assert fast[1] == strict[1] == 502
                continue
            assert fast == strict or _known_response_difference(m), (m, split, fast, strict)
