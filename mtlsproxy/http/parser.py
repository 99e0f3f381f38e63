"""The sans-IO HTTP/1.1 parsing seam: bytes in, events out, no sockets.

Two implementations sit behind it: httptools (llhttp, ``llhttp_parser.py``), the fast
default, and h11 (``h11_parser.py``), the strict reference. The proxy re-serialises every
message itself (``http/wire.py``), so a parser's job ends at events (``events.py``);
the checks that decide which messages are acceptable are shared (``checks.py``), so both
parsers accept exactly the same messages (the differential test holds them to that).
The events are re-exported here: this module is the seam's one name.
"""

from __future__ import annotations

from mtlsproxy.http.events import (
    END,
    Data,
    EndOfMessage,
    Event,
    Headers,
    Informational,
    Request,
    RequestParser,
    Response,
    ResponseParser,
)
from mtlsproxy.http.h11_parser import H11RequestParser, H11ResponseParser
from mtlsproxy.http.llhttp_parser import HttptoolsRequestParser, HttptoolsResponseParser

__all__ = [
    "END", "Data", "EndOfMessage", "Event", "H11RequestParser", "H11ResponseParser",
    "Headers", "HttptoolsRequestParser", "HttptoolsResponseParser", "Informational",
    "Request", "RequestParser", "Response", "ResponseParser", "request_parser",
    "response_parser",
]


def request_parser(kind: str, max_header_bytes: int) -> RequestParser:
    if kind == "h11":
        return H11RequestParser(max_header_bytes)
    return HttptoolsRequestParser(max_header_bytes)


def response_parser(kind: str) -> ResponseParser:
    if kind == "h11":
        return H11ResponseParser()
    return HttptoolsResponseParser()
