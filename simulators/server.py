"""The loopback server a simulator runs on: its aiohttp app started on a port (0: a free
one), closed with its own shutdown first, and usable as `async with`."""

from __future__ import annotations

import asyncio
from typing import Self

from aiohttp import web


class SimServer:
    """Subclasses mount their routes on `self.app` and may override `warm` and
    `_on_shutdown`."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    def warm(self) -> None:
        """Blocking work to do before serving (caches): run in a thread by `start`."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        await asyncio.to_thread(self.warm)
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        await self._on_shutdown(self.app)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _on_shutdown(self, app: web.Application) -> None:
        """Live sessions are ended here, before the server goes."""

    async def __aenter__(self) -> Self:
        return await self.start() if self.port is None else self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
