"""WhatsApp turns on GPT-Live (VOICE_BACKEND=live), as far as its voice model allows.

Live has no manual turns: no commit, no user text item, no response.create for the voice
model (docs/gpt-live.md §5). So a message is put to it the way the protocol does allow:

* A voice note is appended as PCM16 24 kHz (Live's one format, both ways), faster than real
  time, then enough silence for the model's own turn-taking to end the person's turn.
* A written message is handed over as an instruction (`session.instructions.append`, at most
  500 tokens), which the model answers out loud; the persona words the hand-over.

The reply is read with the call's `LiveDialect`, which turns Live's stream into the
response events `ReplyCollector` already reads, so the voice note is encoded as it comes.
After it, silence as long as the reply is appended: Live keeps what it had time to "play"
on its input clock, and the whole reply was delivered.

Tools run on Live's Responses backend (delegation), as on calls: `DelegatedCalls` follows
the dialect's events with the same `ToolFlow` the Realtime path uses, so the turn knows
which calls to run and what to send back before the spoken answer comes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from gateway.live_dialect import MAX_APPEND_CHARS, SILENT_PCM, LiveDialect
from gateway.live_session import LiveSession
from gateway.persona import Persona
from gateway.tool_flow import ToolFlow
from gateway.tools import ToolCall
from gateway.transcode import PCM24K_BYTES_PER_MS

APPEND_MS = 1000  # per append event (Live acknowledges none)
TRAILING_SILENCE_MS = 1200  # past the model's end-of-turn silence (the simulator's is 500 ms)
TICK_S = 0.1  # how often the reply's end is looked for while no event comes


class DelegatedCalls:
    """The backend's function calls of one turn, from the dialect's events: which to run
    now (`take`), and what to send when each is done (`finished`)."""

    def __init__(self) -> None:
        self.flow = ToolFlow()
        self._calls: list[ToolCall] = []
        self._made_by: dict[str, str] = {}  # call id -> the backend response that made it
        self._done: set[str] = set()  # backend responses that are over

    def on_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Events to send now (a `response.create` whose outputs were all in)."""
        kind = event.get("type")
        rid = event.get("response_id") or (event.get("response") or {}).get("id")
        if kind == "gateway.delegated_response.created" and isinstance(rid, str):
            self.flow.on_response_created(rid)
        elif kind == "response.function_call_arguments.done":
            call = self.flow.on_arguments_done(event)
            if call is not None:
                self._calls.append(call)
                self._made_by[call.call_id] = str(rid)
        elif kind == "response.done" and isinstance(rid, str):
            self._done.add(rid)
            return self.flow.on_response_done(rid)
        return []

    @property
    def runnable(self) -> bool:
        """Calls whose response is over: the backend waits for their outputs."""
        return bool(self._ready())

    def take(self) -> list[ToolCall]:
        ready = self._ready()
        self._calls = [c for c in self._calls if c not in ready]
        return ready

    def _ready(self) -> list[ToolCall]:
        return [c for c in self._calls if self._made_by.get(c.call_id) in self._done]


def note_dialect() -> LiveDialect:
    return LiveDialect(silence=SILENT_PCM)


class LiveInput:
    """What one person's Live session has heard: its input timeline, in ms."""

    def __init__(self, session: LiveSession) -> None:
        self.session = session
        self.input_ms = 0

    async def audio(self, pcm: bytes) -> None:
        step = APPEND_MS * PCM24K_BYTES_PER_MS
        for start in range(0, len(pcm), step):
            chunk = pcm[start : start + step]
            event = {"type": "session.input_audio.append",
                     "audio": base64.b64encode(chunk).decode()}  # fmt: skip
            await self.session.send(event)
            self.input_ms += len(chunk) // PCM24K_BYTES_PER_MS

    async def silence(self, ms: int) -> None:
        await self.audio(bytes(max(0, ms) * PCM24K_BYTES_PER_MS))

    async def text(self, persona: Persona, text: str) -> None:
        content = persona.prompt["written_message"].format(text=text)[:MAX_APPEND_CHARS]
        event = {"type": "session.instructions.append", "content": content, "delegation_id": None}
        await self.session.send(event)


async def collect_live(
    heard: LiveInput, dialect: LiveDialect, on_event: Any, finished: Any
) -> None:
    """Live's events, as response events, into `on_event` until `finished()`; the dialect's
    clock runs between events, since a reply's end is a silence, not an event."""
    while not finished():
        try:
            async with asyncio.timeout(TICK_S):
                event = await heard.session.recv()
        except TimeoutError:
            events = dialect.tick(time.monotonic())
        else:
            now = time.monotonic()
            events = dialect.inbound(event, now, heard.input_ms) + dialect.tick(now)
        for each in events:
            on_event(each)
