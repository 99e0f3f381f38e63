"""The thread that builds truststores and contexts, below the event loop's priority.

Why: a large truststore costs a lot of CPU to analyse and load. The build already runs off
the event loop, but a thread still competes with the loop for the core (and for the GIL):
with the proxy on one core, requests served during a swap waited twice as long (bench/run.py
scenario 7). So builds go to ONE dedicated thread with a raised Linux nice value: the
scheduler favours the loop whenever both want the core, and the build takes longer. Nice 19
starves the build at full load (by the scheduler's weights a saturated loop leaves it a
sliver of the core, and a truststore change must not wait for the load to drop); nice 5
gives the build about a quarter of the core (docs/performance.md). The nice value alone does
not bound how long the loop waits once the build has the core (a scheduler tick): the
build's loops also pace themselves (pacing.py). Raising one's own niceness needs no
privilege; where it is not possible the thread runs at normal priority.

What a swap leaves on the loop is small on purpose: the one assignment, and a log line.
The metrics of the new truststore are published here too, and the replaced generation is
freed here (``dispose``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from mtlsproxy.runtime import pacing

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
    pacing.enable()


def executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            # ONE thread, so builds run in the order they are queued: the revocation
            # watcher's retry relies on it (RevocationWatcher.refresh).
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlsproxy-build",
                                           initializer=_lower_priority)
        return _executor


def dispose(obj: object) -> None:
    """Let the build thread drop a reference; the caller then drops its own.

    When the thread's is the last one, the deallocation happens there, not on the event
    loop: a replaced generation of 1,000 CAs (its SSLContext's X509_STORE and the parsed
    certificates) takes milliseconds to free, with the GIL held. The thread's work item keeps
    ``obj`` until it has run (concurrent.futures.thread._worker deletes it there)."""
    try:
        executor().submit(_keep, obj)
    except RuntimeError:  # the interpreter is exiting: the caller's reference frees it
        pass


def _keep(obj: object) -> None:
    pass


async def run_build(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking build (parse, analyse, SSLContext) on the low-priority thread."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)
