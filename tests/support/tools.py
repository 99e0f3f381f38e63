"""Small helpers shared by test modules: console scripts, polling, freed objects."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def require_tool(name: str, package: str) -> None:
    """A system tool the test runs: skip with the package to install when it is missing,
    except under ``CI=true``, where a missing tool is a failure (CI installs them all)."""
    if shutil.which(name) is not None:
        return
    message = f"{name} is not installed: apt-get install -y {package}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_file(path: str, package: str) -> None:
    """A file a system package installs (headers): as ``require_tool``."""
    if Path(path).exists():
        return
    message = f"{path} is missing: apt-get install -y {package}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str) -> str:
    """A console script of the test extras: beside this interpreter first (a fresh pyenv or
    venv may not have it on PATH yet), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def freeing_thread(obj: object) -> list[str]:
    """A list that receives the name of the thread on which ``obj`` is freed."""
    import weakref
    names: list[str] = []
    weakref.finalize(obj, lambda: names.append(threading.current_thread().name))
    return names


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll until ``predicate()``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


async def read_post_body(reader: asyncio.StreamReader) -> bytes:
    """The body of one Content-Length request, for the small servers tests run."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return await reader.readexactly(length)
