"""The refresh loop shared by the watchers (truststore, CRLs, server certificates)."""

from __future__ import annotations

import asyncio


class Periodic:
    """Calls ``refresh()`` every ``next_wait()`` seconds between ``start()`` and ``stop()``.

    ``refresh`` must not raise: a watcher keeps the old state on failure and says so.
    """

    _task: asyncio.Task[None] | None = None

    def next_wait(self) -> float:
        raise NotImplementedError

    async def refresh(self) -> object:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.next_wait())
            await self.refresh()
