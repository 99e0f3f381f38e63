"""The gRPC ends of bench/h2.py: a grpcio server (generic handlers, no generated code) and
a grpc.aio client that keeps a number of calls in flight through a proxy.

    python bench/grpc_peer.py serve PORT_FILE
    python bench/grpc_peer.py unary TARGET PKI_DIR --calls N --inflight K
    python bench/grpc_peer.py stream TARGET PKI_DIR --calls N --messages M --size S

The client prints one JSON line: calls, messages, bytes and wall seconds. Every call must
succeed (a failed one ends the run with its status).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

SERVICE = "bench.Echo"


def serve(port_file: Path) -> None:
    def unary(request: bytes, context: Any) -> bytes:
        return request

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        count, size = (int(x) for x in request.split(b","))
        block = b"x" * size
        for _ in range(count):
            yield block

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()


async def drive(args: argparse.Namespace) -> dict[str, float]:
    pki = Path(args.pki)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "root-ca.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes(),
        certificate_chain=(pki / "client.pem").read_bytes())
    options = [("grpc.enable_http_proxy", 0), ("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(args.target, creds, options=options) as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
        remaining = args.calls
        messages = 0
        received = 0
        if args.mode == "unary":
            call = ch.unary_unary(f"/{SERVICE}/Unary")
            payload = b"x" * args.size

            async def worker() -> None:
                nonlocal remaining, messages, received
                while remaining > 0:
                    remaining -= 1
                    reply = await call(payload, timeout=30)
                    messages += 1
                    received += len(reply)
        else:
            stream = ch.unary_stream(f"/{SERVICE}/ServerStream")
            request = b"%d,%d" % (args.messages, args.size)

            async def worker() -> None:
                nonlocal remaining, messages, received
                while remaining > 0:
                    remaining -= 1
                    async for reply in stream(request, timeout=120):
                        messages += 1
                        received += len(reply)
        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.inflight)))
        return {"calls": args.calls, "messages": messages, "bytes": received,
                "seconds": time.monotonic() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("serve", "unary", "stream"))
    ap.add_argument("target", help="PORT_FILE for serve; host:port of the proxy otherwise")
    ap.add_argument("pki", nargs="?", help="a dev PKI directory (root-ca.pem, client.pem/.key)")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    if args.mode == "serve":
        serve(Path(args.target))
        return 0
    try:
        result = asyncio.run(drive(args))
    except grpc.RpcError as exc:
        print(f"call failed: {exc.code()} {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
