"""Event loops of either kind in a thread, for real sockets beside the test's thread."""

from __future__ import annotations

import asyncio
import collections
import gc
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


class LoopThread:
    """An event loop of the requested kind running in a daemon thread."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
        # What reached the loop's exception handler: an exception that escaped a protocol
        # callback or a task nobody awaited. The proxy must never let one escape
        # (``unhandled``; harness_for fails the test on any).
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._record)
        # Tasks started on the loop, by their coroutine's name: the proxy's fast path runs
        # in callbacks and starts none, so tests see which path a request took here.
        self.tasks_started: collections.Counter[str] = collections.Counter()
        self.loop.set_task_factory(self._count_task)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _count_task(self, loop: asyncio.AbstractEventLoop, coro: Any,
                    **kwargs: Any) -> asyncio.Task[Any]:
        self.tasks_started[getattr(coro, "__qualname__", "?")] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    def _record(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)

    def unhandled(self) -> list[str]:
        """The exceptions that escaped, less cancellations (the teardown cancels every
        task, and 3.11's asyncio.streams re-raises a cancelled handler's CancelledError
        from a callback)."""
        return [f"{c.get('message')}: {c.get('exception')!r}" for c in self.errors
                if not isinstance(c.get("exception"), asyncio.CancelledError)]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper())

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        self.run(cancel_all())
        # A task freed with its exception unread reports it when collected: generation 0
        # is enough for the young garbage of one test (a full collection per test cost the
        # suite ~30 s).
        self.call(lambda: gc.collect(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def start_slow_upstream(loop: LoopThread, on_request: Callable[[], None],
                        delay: float = 1.5) -> tuple[asyncio.Server, int]:
    """An upstream that answers ``done`` ``delay`` seconds after each request head arrives;
    ``on_request`` runs (on the loop) when a head arrives. For drain tests."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        on_request()
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        writer.close()

    async def serve() -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(slow, "127.0.0.1", 0)
        return server, int(server.sockets[0].getsockname()[1])
    return loop.run(serve())
