"""The loopback server a simulator runs on: its aiohttp app started on a port (0: a free
one; https/wss with an SSL context), closed with its own shutdown first, usable as
`async with`; and the command line's serve-until-Ctrl-C around it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Self

from aiohttp import web


class SimServer:
    """Subclasses mount their routes on `self.app` and may override `warm` and
    `_on_shutdown`."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.scheme = "http"
        self._runner: web.AppRunner | None = None

    def warm(self) -> None:
        """Blocking work to do before serving (caches): run in a thread by `start`."""

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> Self:
        await asyncio.to_thread(self.warm)
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        self.scheme = "https" if ssl_context is not None else "http"
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


async def serve(sim: SimServer, host: str, port: int, banner: Callable[[], list[str]]) -> None:
    """Start `sim`, print its banner (it may name the port), and serve until cancelled."""
    await sim.start(host, port)
    for line in banner():
        print(line, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.close()


def run(serving: Coroutine[Any, Any, None], log_level: str) -> None:
    """A simulator's command line: log at `log_level`, serve until Ctrl-C."""
    logging.basicConfig(level=log_level.upper())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serving)
