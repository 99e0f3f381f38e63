"""Latency at one fixed request rate: the same load for every proxy (open loop per slot).

    python bench/paced_client.py PORT CONNS RATE SECONDS CERT KEY CA [unique]

CONNS keep-alive mTLS connections share RATE requests/s: connection i sends its k-th
request at start + (k * CONNS + i) / RATE, whether or not the proxy kept up, and the
latency is measured from that scheduled instant (so a stall is not hidden by the client
waiting: no coordinated omission). Prints ``p50_ms p99_ms max_ms requests errors``.
With ``unique``, every request carries its own ``X-Request-Id`` (as traced services'
requests do), so no two request heads are the same bytes, as in real traffic.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time


async def main(port: int, conns: int, rate: float, seconds: float, cert: str, key: str,
               ca: str, unique: bool = False) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    latencies: list[float] = []
    errors = 0
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    streams = [await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                             server_hostname="localhost")
               for _ in range(conns)]
    start = time.perf_counter() + 0.2
    start_id = time.time_ns()  # ids unique across runs too
    total = int(rate * seconds)

    async def worker(i: int) -> None:
        nonlocal errors
        reader, writer = streams[i]
        for k in range(i, total, conns):
            due = start + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                writer.write(request if not unique else
                             b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: %d-%d\r\n\r\n"
                             % (k, start_id))
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                return
            latencies.append(time.perf_counter() - due)
    await asyncio.gather(*(worker(i) for i in range(conns)))
    for _, writer in streams:
        writer.close()
    latencies.sort()
    n = len(latencies)
    if not n:
        print("0 0 0 0", errors)
        return
    print(f"{latencies[n // 2] * 1e3:.3f} {latencies[min(n - 1, int(n * 0.99))] * 1e3:.3f} "
          f"{latencies[-1] * 1e3:.3f} {n} {errors}")


if __name__ == "__main__":
    import uvloop
    a = sys.argv
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(a[1]), int(a[2]), float(a[3]), float(a[4]), a[5], a[6], a[7],
                        a[8:9] == ["unique"]))
