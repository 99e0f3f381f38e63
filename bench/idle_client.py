"""Open N mutual-TLS connections and hold them idle (the memory scenario's load).

    python bench/idle_client.py PORT N CERT KEY CA

Prints ``open N`` once every handshake is done (``failed K`` for refusals), then holds the
connections until stdin closes. Handshakes run 64 at a time.
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def main(port: int, n: int, cert: str, key: str, ca: str) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    gate = asyncio.Semaphore(64)
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                          server_hostname="localhost")
                writers.append(writer)
            except OSError:
                failed += 1
    await asyncio.gather(*(one() for _ in range(n)))
    print(f"open {len(writers)} failed {failed}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.transport.abort()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]))
