"""A small bounded memo with a doorkeeper, for the head memos (http/parser.py, wire.py).

Rules of this module:
- An entry is stored the second time its key is offered: the doorkeeper remembers the
  hashes of keys offered once (as TinyLFU's doorkeeper does). Keys that never repeat - a
  request head with a tracing id, say - store nothing, and so keep no objects alive that
  would only feed the cyclic GC: storing every head made gen-0 collections ~4x as frequent
  and added full ones, 3-16 us per request in-process when no head repeated.
- Bounded: at most ``size`` entries and ``seen`` hashes, each emptied when full (heads with
  a Date change every second; the memo refills with current ones). A hash collision in the
  doorkeeper stores an entry one sighting early, nothing worse: entries are keyed by the
  whole key.
- Pure bookkeeping; what makes a value a function of its key is the caller's business.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    __slots__ = ("entries", "_seen", "_size", "_seen_size")

    def __init__(self, size: int = 256, seen: int = 4096) -> None:
        self.entries: dict[K, V] = {}  # read directly on hot paths: entries.get(key)
        self._seen: set[int] = set()
        self._size = size
        self._seen_size = seen

    def __repr__(self) -> str:
        return f"<Memo entries={len(self.entries)}/{self._size} seen={len(self._seen)}>"

    def admit(self, key: K) -> bool:
        """True when ``key`` was offered before: store its value now (``store``)."""
        h = hash(key)
        seen = self._seen
        if h in seen:
            return True
        if len(seen) >= self._seen_size:
            seen.clear()
        seen.add(h)
        return False

    def store(self, key: K, value: V) -> None:
        entries = self.entries
        if len(entries) >= self._size:
            entries.clear()
        entries[key] = value

    def clear(self) -> None:
        self.entries.clear()
        self._seen.clear()
