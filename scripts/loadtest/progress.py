"""Calls and turns done so far, and the progress bar on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    """Counters for the progress bar; `listener` forwards events from a worker process."""

    calls: int = 0
    turns: int = 0
    live: int = 0
    peak_live: int = 0
    done: int = 0
    failed: int = 0
    turns_done: int = 0
    listener: Callable[[str], None] | None = None

    def apply(self, event: str) -> None:
        if event == "connected":
            self.live += 1
            self.peak_live = max(self.peak_live, self.live)
        elif event == "disconnected":
            self.live -= 1
        elif event == "turn":
            self.turns_done += 1
        elif event == "ok":
            self.done += 1
        elif event == "failed":
            self.done += 1
            self.failed += 1
        if self.listener is not None:
            self.listener(event)


class ProgressBar:
    """Plain text on stderr: redrawn in place on a terminal, a line every 5 s otherwise."""

    WIDTH = 30

    def __init__(self, progress: Progress, label: str, enabled: bool = True) -> None:
        self.progress = progress
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def line(self) -> str:
        p = self.progress
        total = max(p.calls, 1)
        filled = round(self.WIDTH * p.done / total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.monotonic() - self.started
        return (
            f"{self.label} [{bar}] {p.done}/{p.calls} done, {p.live} live, "
            f"turns {p.turns_done}/{p.turns}, failed {p.failed}, {elapsed:.0f} s"
        )

    async def __aenter__(self) -> ProgressBar:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)

    async def _run(self) -> None:
        period = 0.5 if self.tty else 5.0
        while True:
            await asyncio.sleep(period)
            if self.tty:
                print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            else:
                print(self.line(), file=sys.stderr, flush=True)
