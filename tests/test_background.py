"""The build thread (background.py) runs below the event loop's priority."""

from __future__ import annotations

import asyncio
import os
import threading

from mtlsproxy import background


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_builds_run_on_one_thread_niced_below_the_event_loop() -> None:
    async def go() -> tuple[int, str, int, str]:
        a = await background.run_build(_nice)
        name_a = await background.run_build(lambda: threading.current_thread().name)
        b = await background.run_build(_nice)
        name_b = await background.run_build(lambda: threading.current_thread().name)
        return a, name_a, b, name_b
    base = _nice()
    a, name_a, b, name_b = asyncio.run(go())
    assert a == b == min(19, base + background.NICE)
    assert name_a == name_b and name_a.startswith("mtlsproxy-build")
    assert _nice() == base  # the caller's thread is untouched
