"""A small echo upstream (for ``demo`` and tests): answers what it received, as JSON.

``GET /bytes/N`` streams N bytes back (chunked); any other request gets
``{"method", "path", "headers", "body_bytes", "body_sha256"}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from mtlsproxy.errors import RemoteProtocolError
from mtlsproxy.http.parser import Data, EndOfMessage, HttptoolsRequestParser, Request

_BLOCK = b"x" * 65536


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    parser = HttptoolsRequestParser(65536)
    req: Request | None = None
    digest = hashlib.sha256()
    size = 0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            try:
                events = parser.feed(data)
            except RemoteProtocolError:
                writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
                return
            for ev in events:
                if isinstance(ev, Request):
                    req, digest, size = ev, hashlib.sha256(), 0
                elif isinstance(ev, Data):
                    digest.update(ev.data)
                    size += len(ev.data)
                elif isinstance(ev, EndOfMessage) and req is not None:
                    await _respond(writer, req, size, digest.hexdigest())
                    if not req.keep_alive:
                        return
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _respond(writer: asyncio.StreamWriter, req: Request, size: int, sha: str) -> None:
    path = req.target.decode("latin-1")
    if path.startswith("/bytes/") and path[7:].isdigit():
        remaining = int(path[7:])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        while remaining > 0:
            block = _BLOCK[:min(remaining, len(_BLOCK))]
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            remaining -= len(block)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return
    body = json.dumps({
        "method": req.method.decode(),
        "path": path,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in req.headers],
        "body_bytes": size,
        "body_sha256": sha,
    }).encode()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    return await asyncio.start_server(_handle, host, port)


async def start_echo_unix(path: str) -> asyncio.Server:
    """The same echo on a unix socket (``upstream: unix:/path``)."""
    return await asyncio.start_unix_server(_handle, path)
