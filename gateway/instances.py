"""This gateway among others on one store: its heartbeat, and what it wakes when it beats.

Each instance writes `instances.seen_at` every third of INSTANCE_TIMEOUT_S. A WhatsApp
message claimed by an instance not seen for the timeout is presumed cut off (SIGKILL, a lost
box) and is claimed again by a live one; each beat wakes the local queue worker to look for
such messages, since nothing else would (they are not 'pending', so no due time names them).
A clean stop deletes the row, so the others take over at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.store import Store, utcnow

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, store: Store, timeout_s: float, on_beat: Callable[[], None]) -> None:
        self.store = store
        self.interval_s = timeout_s / 3
        self.on_beat = on_beat
        self.started_at = utcnow()

    async def beat(self) -> None:
        await self.store.heartbeat(self.started_at)

    async def run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception as err:  # the store is down: said once, retried each beat
                if not failing:
                    log.warning("heartbeat not written (%s: %s)", type(err).__name__, err)
                failing = True
                continue
            if failing:
                log.info("heartbeat written again")
            failing = False
            self.on_beat()
