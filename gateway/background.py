"""Long-running background tasks: started under a name, stopped by cancelling and waiting.

One way to do it, so every loop the gateway runs beside its handlers (the summarizer, the
media sweeper, the event-loop lag timer, the WhatsApp queue's claim loop) starts and stops
alike. A loop that crashes is logged once, when it crashes, with its name: nobody awaits it
until shutdown, and a crash surfacing only then (or never) would hide for hours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

log = logging.getLogger(__name__)


def start(name: str, loop: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run `loop` as a task named `name`; its crash, if any, is logged when it happens."""
    task = asyncio.create_task(loop, name=name)
    task.add_done_callback(_log_crash)
    return task


async def stop(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until each has finished; what they raised is not re-raised
    (a crash of a task from `start` was logged already)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


@asynccontextmanager
async def running(name: str, loop: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """`loop` runs as long as the body does (an aiohttp cleanup_ctx yields inside it)."""
    task = start(name, loop)
    try:
        yield
    finally:
        await stop(task)


def _log_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task %s crashed", task.get_name(), exc_info=error)
