"""The thread that builds truststores and contexts, below the event loop's priority.

Why: a 1,000-CA truststore costs ~0.5 s of CPU to analyse and load. The build already
runs off the event loop, but a thread still competes with the loop for the core (and for
the GIL): with the proxy on one core, requests served during a swap waited twice as long
(bench/run.py scenario 7). So builds go to ONE dedicated thread with a raised Linux nice
value: the scheduler favours the loop whenever both want the core, and the build takes
longer. Measured with the proxy saturated on one core: nice 0 (a plain executor) p99
during swaps 2.18x the p99 without; nice 19 starved the build (no swap finished during a
4 s run); nice 5 gives the build about a quarter of the core: swaps finish within about 2 s
at full load and p99 during swaps was 1.46x. Raising one's own niceness needs no
privilege; where it is not possible the thread runs at normal priority.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

NICE = 5
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _lower_priority() -> None:
    try:
        # PRIO_PROCESS with a thread id sets that thread's nice value on Linux; relative
        # to the process's own, so a proxy already started under nice stays below it.
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                 + NICE))
    except (OSError, AttributeError):
        pass


def executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlsproxy-build",
                                           initializer=_lower_priority)
        return _executor


async def run_build(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking build (parse, analyse, SSLContext) on the low-priority thread."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)
