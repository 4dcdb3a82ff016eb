"""The persona's fixed WhatsApp messages as voice notes too, so every reply carries one.

Each message (`persona.toml [messages]`: unsupported media, broken audio, over budget...) is
read once per process in the persona's voice (a short Realtime session of its own,
`whatsapp_turns.read_aloud`) and the audio kept in memory: a few hundred KB for all of them,
and no model cost after the first. If the reading fails (the reply may be the apology for a
Realtime that is down), that reply goes as text alone, logged, and the next one tries again.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.runtime import Runtime
from gateway.whatsapp_turns import read_aloud

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 8.0  # a fixed reply waits this long for its voice at most


class FixedVoices:
    def __init__(self, rt: Runtime, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.rt = rt
        self.timeout_s = timeout_s
        self._notes: dict[str, list[bytes]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def notes(self, key: str) -> list[bytes]:
        """The voice notes of message `key`, read now or kept from before; [] if unreadable."""
        if key in self._notes:
            return self._notes[key]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if key not in self._notes:
                notes = await self._read(key)
                if not notes:
                    return []
                self._notes[key] = notes
        return self._notes[key]

    async def _read(self, key: str) -> list[bytes]:
        persona = self.rt.persona
        instruction = persona.tools["results"]["read_aloud"]
        try:
            async with asyncio.timeout(self.timeout_s):
                return await read_aloud(self.rt, None, persona.messages[key], instruction)
        except Exception as err:
            log.warning("fixed message %s sent without its voice: %s: %s", key,
                        type(err).__name__, err)  # fmt: skip
            return []
