"""Pacing points for long builds on the build thread (background.py); no asyncio here.

Why: Linux preempts a running thread only at a scheduler tick or when another thread
wakes with a stronger claim. A build thread that got the core therefore held it for up to
a tick while requests waited, whatever its nice value (a higher nice value, SCHED_BATCH, a
shorter GIL switch interval and a shorter EEVDF slice for the loop thread all left the
loop stalling; nice 19 did not stall it but starved the build under load, see
background.py). A large truststore's build is many ticks of CPU. ``sched_yield`` hands the
core to the event loop at once when the loop is runnable, and costs next to nothing when it
is not. The loops of a build (per certificate, per chunk of CAs handed to OpenSSL) call
``pace()``; it yields when the build has run ``PACE_S`` since it last did. On any thread
but the build thread (start-up, the CLI, tests) it does nothing. What it bought (bench/run.py
scenario 7) is in docs/performance.md, "Truststore swaps under load".
"""

from __future__ import annotations

import os
import threading
import time

PACE_S = 0.0005  # build time between two offers of the core (about one chunk of CAs)

_local = threading.local()


def enable() -> None:
    """Make ``pace()`` yield on the calling thread (the build thread's initializer)."""
    _local.due = 0.0


def enabled() -> bool:
    return getattr(_local, "due", None) is not None


def pace() -> None:
    due = getattr(_local, "due", None)
    if due is None:
        return
    now = time.perf_counter()
    if now >= due:
        os.sched_yield()  # releases the GIL too (Modules/posixmodule.c)
        _local.due = time.perf_counter() + PACE_S
