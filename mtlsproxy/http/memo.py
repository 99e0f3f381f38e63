"""A small bounded memo with a doorkeeper, and ``HeadMemos``: every head memo in one home.

Rules of this module:
- An entry is stored the second time its key is offered: the doorkeeper remembers the
  hashes of keys offered once (as TinyLFU's doorkeeper does). Keys that never repeat - a
  request head with a tracing id, say - store nothing, and so keep no objects alive that
  would only feed the cyclic GC: storing every head made gen-0 collections several times
  as frequent and added full ones when no head repeated (docs/performance.md).
- Bounded: at most ``size`` entries and ``seen`` hashes, each emptied when full (heads with
  a Date change every second; the memo refills with current ones). A hash collision in the
  doorkeeper stores an entry one sighting early, nothing worse: entries are keyed by the
  whole key.
- Pure bookkeeping; what makes a value a function of its key is the caller's business.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

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


class HeadMemos:
    """The head memos of one process (llhttp_parser.py, wire.py), made by their owner (the
    server) and handed to what uses them, so that one bound holds for all of them and one
    ``clear`` empties them. Parsers and head builders given none memoise nothing across
    connections."""

    __slots__ = ("size", "seen", "_requests", "_responses", "upstream_heads", "client_heads")

    def __init__(self, size: int = 256, seen: int = 4096) -> None:
        self.size, self.seen = size, seen
        # Parsed heads by header limit (a hit must stand for a parse under the same limit).
        self._requests: dict[int, Memo[bytes, Any]] = {}
        self._responses: dict[int, Memo[bytes, Any]] = {}
        # Heads built from memoised requests and responses (wire.py).
        self.upstream_heads: Memo[Any, bytes] = Memo(size, seen)
        self.client_heads: Memo[Any, tuple[bytes, bool, bool]] = Memo(size, seen)

    def requests(self, max_header_bytes: int) -> Memo[bytes, Any]:
        memo = self._requests.get(max_header_bytes)
        if memo is None:
            memo = self._requests[max_header_bytes] = Memo(self.size, self.seen)
        return memo

    def responses(self, max_header_bytes: int) -> Memo[bytes, Any]:
        memo = self._responses.get(max_header_bytes)
        if memo is None:
            memo = self._responses[max_header_bytes] = Memo(self.size, self.seen)
        return memo

    def clear(self) -> None:
        for memo in (*self._requests.values(), *self._responses.values(),
                     self.upstream_heads, self.client_heads):
            memo.clear()

    def __repr__(self) -> str:
        return (f"<HeadMemos requests={self._requests} responses={self._responses} "
                f"upstream={self.upstream_heads!r} client={self.client_heads!r}>")
