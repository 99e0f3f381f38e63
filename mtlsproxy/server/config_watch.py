"""The config file followed without a signal: a ConfigMap mounted as a directory (no
``subPath``) is updated by the kubelet with an atomic ``..data`` symlink swap, and nothing
sends SIGHUP.

Every ``config_watch_interval`` seconds the file is stat'ed through its symlinks; when
the file behind them changed (another inode, size or mtime) and its bytes did too, it is
reloaded exactly as SIGHUP reloads it (``ProxyServer.reload_from_file``: what can change
live is applied, anything else refuses the whole change, counted in
``mtlsproxy_config_reloads_total{result}``). A change that was refused is not tried again
until the file changes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from mtlsproxy.runtime.periodic import Periodic

log = logging.getLogger("mtlsproxy.config")


def file_state(path: Path) -> tuple[tuple[int, int, int], str] | None:
    """Blocking: (stat signature, SHA-256) of the file behind ``path``'s symlinks."""
    try:
        st = os.stat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # mid-swap, or gone: the next check sees what is there
    return (st.st_ino, st.st_size, st.st_mtime_ns), digest


class ConfigWatcher(Periodic):
    def __init__(self, path: Path, interval: float,
                 reload: Callable[[], Awaitable[list[str]]]) -> None:
        self.path = path
        self.interval = interval
        self._reload = reload
        state = file_state(path)
        self._signature = state[0] if state else None
        self._digest = state[1] if state else None

    def __repr__(self) -> str:
        return f"<ConfigWatcher {self.path} every {self.interval}s>"

    def next_wait(self) -> float:
        return self.interval

    def seen(self) -> None:
        """The file as it is now has been loaded (a SIGHUP reload): not a change."""
        state = file_state(self.path)
        if state is not None:
            self._signature, self._digest = state

    async def refresh(self) -> str | None:
        """One check: ``applied``, ``failed``, or None (unchanged)."""
        state = await asyncio.get_running_loop().run_in_executor(None, file_state, self.path)
        if state is None or state[0] == self._signature:
            return None
        self._signature = state[0]
        if state[1] == self._digest:
            return None  # touched, or swapped for the same bytes
        self._digest = state[1]
        log.info("config file %s changed: reloading it", self.path)
        problems = await self._reload()
        return "failed" if problems else "applied"
