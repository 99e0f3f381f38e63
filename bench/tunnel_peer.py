"""The servers and clients of bench/tunnels.py, one process each (on the load core).

    python bench/tunnel_peer.py tcp-echo PORT_FILE
    python bench/tunnel_peer.py ws-echo PORT_FILE
    python bench/tunnel_peer.py tcp-client HOST:PORT PKI_DIR --mib N --conns C
    python bench/tunnel_peer.py ws-client HOST:PORT PKI_DIR --mib N --size BYTES --conns C

The echo servers run on uvloop; the TCP client writes its bytes and reads them back at
once on each connection (both directions busy), the WebSocket client keeps up to 8
messages in flight per connection. Clients print JSON: ``{"bytes", "seconds"}`` with
``bytes`` the payload through the proxy in both directions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from pathlib import Path

import uvloop

CHUNK = 64 * 1024


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def tcp_echo(port_file: Path) -> None:
    server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


async def ws_echo(port_file: Path) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    server = await serve(echo, "127.0.0.1", 0, max_size=None, compression=None,
                         ping_interval=None)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


def client_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "root-ca.pem"))
    ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    ctx.check_hostname = False
    return ctx


async def tcp_client(target: str, pki: Path, mib: int, conns: int) -> None:
    host, port = target.rsplit(":", 1)
    per_conn = mib * 1024 * 1024 // conns
    block = b"x" * CHUNK
    ctx = client_context(pki)

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx,
                                                       server_hostname="localhost")

        async def send() -> None:
            left = per_conn
            while left > 0:
                writer.write(block[:min(left, CHUNK)])
                left -= CHUNK
                await writer.drain()

        sender = asyncio.ensure_future(send())
        got = 0
        while got < per_conn:
            data = await reader.read(1 << 20)
            if not data:
                raise SystemExit(f"closed after {got} of {per_conn} bytes")
            got += len(data)
        await sender
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    took = time.perf_counter() - start
    print(json.dumps({"bytes": 2 * per_conn * conns, "seconds": took}))


async def ws_client(target: str, pki: Path, mib: int, size: int, conns: int) -> None:
    from websockets.asyncio.client import connect

    per_conn = mib * 1024 * 1024 // size // conns
    message = b"x" * size
    ctx = client_context(pki)

    async def one() -> None:
        async with connect(f"wss://{target}/ws", ssl=ctx, server_hostname="localhost",
                           max_size=None, compression=None, ping_interval=None) as ws:
            window = asyncio.Semaphore(8)

            async def send() -> None:
                for _ in range(per_conn):
                    await window.acquire()
                    await ws.send(message)

            sender = asyncio.ensure_future(send())
            for _ in range(per_conn):
                reply = await ws.recv()
                assert len(reply) == size
                window.release()
            await sender

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    took = time.perf_counter() - start
    print(json.dumps({"bytes": 2 * per_conn * size * conns, "seconds": took}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("tcp-echo", "ws-echo", "tcp-client", "ws-client"))
    ap.add_argument("where")
    ap.add_argument("pki", nargs="?")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--size", type=int, default=64 * 1024)
    ap.add_argument("--conns", type=int, default=4)
    args = ap.parse_args()
    if args.mode == "tcp-echo":
        uvloop.run(tcp_echo(Path(args.where)))
    elif args.mode == "ws-echo":
        uvloop.run(ws_echo(Path(args.where)))
    elif args.mode == "tcp-client":
        uvloop.run(tcp_client(args.where, Path(args.pki), args.mib, args.conns))
    else:
        uvloop.run(ws_client(args.where, Path(args.pki), args.mib, args.size, args.conns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
