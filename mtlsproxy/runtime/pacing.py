"""Pacing points for long builds on the build thread (background.py); no asyncio here.

Why: Linux preempts a running thread only at a scheduler tick (4 ms with HZ=250, the
kernel of our bench machine) or when another thread wakes with a stronger claim. A build
thread that got the core therefore held it for up to a tick while requests waited,
whatever its nice value (nice 10, SCHED_BATCH, a 1 ms GIL switch interval, a 100 us EEVDF
slice for the loop thread: the loop still stalled ~5 ms at p99; nice 19 did not stall it
but starved the build under load, see background.py). A 1,000-CA build is ~500 ms of CPU,
over a hundred such stalls. ``sched_yield`` hands the core to the event loop at once when
the loop is runnable, and costs about a microsecond when it is not. The loops of a build (per
certificate, per chunk of CAs handed to OpenSSL) call ``pace()``; it yields when the
build has run ``PACE_S`` since it last did. On any thread but the build thread
(start-up, the CLI, tests) it does nothing.

Measured (bench/run.py scenario 7, swaps back to back for 12 s at full keep-alive load,
proxy on one core, two alternating runs each): p99 during swaps / p99 without 2.27 and
2.31 without pacing, 1.11 and 1.52 with it; requests/s during swaps 0.70 of those
without, 0.79-0.92 with it; a swap took ~2 s at full load, 3.4-4.9 s with pacing (the
build yields to requests, which is the point). Unloaded, chunking the OpenSSL load costs
~15 ms more CPU per 1,000 CAs.
"""

from __future__ import annotations

import os
import threading
import time

PACE_S = 0.0005  # build time between two offers of the core (a chunk of 4 CAs: ~0.65 ms)

_local = threading.local()
yields = 0  # sched_yield calls made, for tests (an int add under the GIL: no lock)


def enable() -> None:
    """Make ``pace()`` yield on the calling thread (the build thread's initializer)."""
    _local.due = 0.0


def enabled() -> bool:
    return getattr(_local, "due", None) is not None


def pace() -> None:
    due = getattr(_local, "due", None)
    if due is None:
        return
    global yields
    now = time.perf_counter()
    if now >= due:
        yields += 1
        os.sched_yield()  # releases the GIL too (Modules/posixmodule.c)
        _local.due = time.perf_counter() + PACE_S
