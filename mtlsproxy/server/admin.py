"""The admin listener: /metrics, /healthz, /readyz, /truststore (plain HTTP, loopback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_MAX_HEAD = 8192


class AdminServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: Callable[[], bool], truststores: Callable[[], dict[str, Any]],
                 reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port
        self.host, self.port = host, port
        self.registry = registry
        self.ready = ready
        self.truststores = truststores
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port,
                                                 reuse_address=True,
                                                 reuse_port=self.reuse_port or None)

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; no I/O."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "application/json", b'{"message":"Method Not Allowed"}'
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            return (200, "text/plain", b"ready\n") if self.ready() else \
                (503, "text/plain", b"not ready\n")
        if path == "/truststore":
            return 200, "application/json", json.dumps(self.truststores(), indent=2).encode()
        return 404, "application/json", b'{"message":"Not Found"}'

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(30):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                if len(head) > _MAX_HEAD:
                    return
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                if len(parts) != 3:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
                    return
                method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
                status, ctype, body = self.respond(method, target)
                close = b"connection: close" in head.lower()
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                    f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()
                    + (b"" if method == "HEAD" else body))
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()
