"""A minimal HTTP/1.1 client for the proxy's own calls (authorizer, OCSP): one POST per
connection, bounded answer size, everything under one timeout."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from mtlsproxy.http.parser import Data, EndOfMessage, HttptoolsResponseParser, Response

MAX_RESPONSE = 64 * 1024


async def post(url: str, body: bytes, timeout: float,
               content_type: str = "application/json") -> tuple[int, bytes]:
    """One POST on a fresh connection (http or https); (status, body)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ctx = ssl.create_default_context() if tls else None
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=ctx)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
                         f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                         f"connection: close\r\n\r\n".encode() + body)
            parser = HttptoolsResponseParser()
            parser.expect(b"POST")
            status, chunks, size = 0, [], 0
            while True:
                data = await reader.read(65536)
                events = parser.feed(data) if data else parser.feed_eof()
                for ev in events:
                    if isinstance(ev, Response):
                        status = ev.status
                    elif isinstance(ev, Data):
                        size += len(ev.data)
                        if size > MAX_RESPONSE:
                            raise ValueError("answer too large")
                        chunks.append(ev.data)
                    elif isinstance(ev, EndOfMessage):
                        return status, b"".join(chunks)
                if not data:
                    raise ValueError("the server closed the connection mid-answer")
        finally:
            writer.close()
