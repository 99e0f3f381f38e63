"""Writes held to the end of the event loop's pass: all of a pass's sends after its reads.

Why: uvloop sends at once when a transport's buffer is empty, so a pass over N ready
connections interleaves N reads with N sends. Each send to a peer on the same host runs
the peer's receive path in our system call and wakes the peer when it sleeps in
epoll_wait; interleaved, the peer (a load generator, the upstream server) wakes, handles
one message and sleeps again between two of our sends, and every wake-up is a
cross-core interrupt (a VM exit on a virtual machine). Sent after the pass, the first
send wakes it and the others find it awake (measured with the bench's keep-alive
scenario: docs/performance.md; perf put the difference in ``sock_def_readable``'s
wake-ups). Envoy defers likewise: ``ConnectionImpl::write`` only
moves the data into the connection's write buffer and activates the socket's write event
(source/common/network/connection_impl.cc); the dispatcher sends later in its loop.

Rules of this module:
- A deferred connection keeps its bytes, in order, where it already buffers them (TLS:
  the outgoing ``MemoryBIO``; upstream: a list) and sends them in ``flush_deferred``.
- Whatever closes or aborts a connection flushes it first, so nothing deferred is lost.
- One ``call_soon`` callback per pass. uvloop and asyncio both run it after the I/O
  callbacks of the pass that scheduled it, before the loop next waits.
- Latency: a response waits at most for the rest of its pass (at low load, a pass is
  one or two connections).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("mtlsproxy")


class Deferred(Protocol):
    def flush_deferred(self) -> None: ...


class WriteBatch:
    """The connections with bytes to send at the end of this pass."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[Deferred] = []

    def __repr__(self) -> str:
        return f"<WriteBatch pending={len(self._pending)}>"

    def add(self, conn: Deferred) -> None:
        """``conn`` has bytes to send; called once per write (a repeat flushes nothing)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(conn)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for conn in pending:
            try:
                conn.flush_deferred()
            except Exception:  # one broken connection must not keep the others' bytes
                log.exception("deferred write to %r failed", conn)
