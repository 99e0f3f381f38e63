"""Results cached until a deadline, with concurrent misses of one key sharing one call.

Used for the authorizer's decisions and OCSP answers: both are remote calls whose answer
says how long it holds, and a burst of new connections from one client must not become a
burst of calls. Bounded: past ``max_entries`` expired entries go first, then the oldest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CoalescingCache(Generic[K, V]):
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 10000) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._cache: dict[K, tuple[float, V]] = {}
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self.computed = 0

    def __repr__(self) -> str:
        return (f"<CoalescingCache entries={len(self._cache)} inflight={len(self._inflight)} "
                f"computed={self.computed}>")

    def peek(self, key: K) -> V | None:
        """The cached value while it holds, without computing anything."""
        cached = self._cache.get(key)
        return cached[1] if cached is not None and cached[0] > self.clock() else None

    def put(self, key: K, value: V, ttl: float) -> None:
        """Cache ``value`` under a key other than the one being computed."""
        if ttl > 0:
            self._store(key, value, ttl)

    async def get(self, key: K, compute: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """The cached value, the in-flight one, or ``compute()`` -> (value, seconds to keep)."""
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self.clock():
            return cached[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        self.computed += 1
        try:
            value, ttl = await compute()
        except BaseException as exc:
            # Waiters must never hang on a leader that failed or was cancelled.
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: no warning when nobody else waited
            raise
        finally:
            del self._inflight[key]
        if ttl > 0:
            self._store(key, value, ttl)
        future.set_result(value)
        return value

    def _store(self, key: K, value: V, ttl: float) -> None:
        now = self.clock()
        if len(self._cache) >= self.max_entries:
            for k in [k for k, (until, _) in self._cache.items() if until <= now]:
                del self._cache[k]
            while len(self._cache) >= self.max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + ttl, value)
