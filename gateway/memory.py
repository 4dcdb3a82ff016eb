"""Who the person is and what was said before, as the persona composer wants it."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any, Protocol

from gateway.persona import (
    Channel,
    MemoryContext,
    MemoryTurn,
    Persona,
    compose_instructions,
    compose_news,
)
from gateway.phones import phone_hint
from gateway.store import Person, Store, Turn

log = logging.getLogger(__name__)

HISTORY_TURNS = 80  # more than any budget keeps; the composer drops the oldest
INSTRUCTIONS_BUDGET_TOKENS = 4000


def _channel_of(turn: Turn) -> str:
    if turn.channel == "call":
        return "call"
    return "whatsapp_voice" if turn.audio_ms else "whatsapp_text"


def _memory_turn(turn: Turn) -> MemoryTurn:
    role = "user" if turn.role == "user" else "assistant"
    return MemoryTurn(role, turn.text, _channel_of(turn), datetime.fromisoformat(turn.at))


async def load_memory(store: Store, person: Person) -> MemoryContext:
    return (await load_memory_marked(store, person))[0]


async def load_memory_marked(store: Store, person: Person) -> tuple[MemoryContext, int]:
    """The memory, and the id of the newest turn it covers: news is what comes after."""
    turns = await store.recent_turns(person.id, HISTORY_TURNS)
    said = [t for t in turns if t.role in ("user", "assistant")]
    memory = MemoryContext(
        name=person.name,
        phone_hint=phone_hint(person.e164),
        summary=person.summary,
        turns=[_memory_turn(t) for t in said],
        first_contact=not said and not person.summary,
    )
    return memory, max((t.id for t in turns), default=0)


async def news_since(
    store: Store, persona: Persona, person_id: int, mark: int, own_conversation: int | None
) -> tuple[dict[str, Any] | None, int]:
    """What the person said or heard elsewhere since `mark`, as the conversation item that
    tells an open session (None: nothing new), and the new mark.

    An item rather than a reopened session: one indexed query and one event (well under a
    millisecond here) against a new connect and the whole instructions again (see
    BENCHMARKS.md); the session keeps its own turns and the model's audio context."""
    turns = await store.turns_since(person_id, mark, own_conversation)
    if not turns:
        return None, mark
    text = compose_news(persona, [_memory_turn(t) for t in turns], now=datetime.now().astimezone())
    item = {"type": "message", "role": "system", "content": [{"type": "input_text", "text": text}]}
    return {"type": "conversation.item.create", "item": item}, turns[-1].id


def with_transcript(
    memory: MemoryContext, transcript: list[tuple[str, str]], channel: str
) -> MemoryContext:
    """The memory plus turns of the live conversation not yet in the store (reconnects)."""
    known = {(t.role, t.text) for t in memory.turns}
    now = datetime.now().astimezone()
    extra = [
        MemoryTurn(role, text, channel, now)
        for role, text in transcript
        if (role, text) not in known
    ]
    return MemoryContext(
        memory.name,
        memory.phone_hint,
        memory.summary,
        [*memory.turns, *extra],
        memory.first_contact,
    )


def instructions_for(persona: Persona, channel: Channel, memory: MemoryContext) -> str:
    return compose_instructions(
        persona,
        channel,
        memory,
        budget_tokens=INSTRUCTIONS_BUDGET_TOKENS,
        now=datetime.now().astimezone(),
    )


class Holder(Protocol):
    """A part of the gateway that keeps people's memory in hand: warm WhatsApp sessions,
    live and parked calls, queue work in flight."""

    async def forget(self, person_id: int) -> None:
        """Drop or detach everything of this person, and finish their writes in flight, so
        nothing of theirs is written once it returns."""

    def changed(self, person_id: int) -> None:
        """The person's memory grew elsewhere: open sessions should hear of it."""


class MemoryHolders:
    """Every holder of a person's memory in this process, told at erasure before the rows go.

    An erased id is kept here as a tombstone: ids are never reused, so work that started
    before the erasure can ask `erased()` and stop instead of writing."""

    FORGET_TIMEOUT_S = 5.0  # a holder that cannot let go in this long is reported, not waited

    def __init__(self) -> None:
        self._holders: list[Holder] = []
        self._erased: set[int] = set()

    def register(self, holder: Holder) -> None:
        self._holders.append(holder)

    def erased(self, person_id: int) -> bool:
        return person_id in self._erased

    def changed(self, person_id: int) -> None:
        for holder in self._holders:
            holder.changed(person_id)

    async def forget(self, person_id: int) -> None:
        self._erased.add(person_id)
        try:
            async with asyncio.timeout(self.FORGET_TIMEOUT_S):
                await asyncio.gather(*(h.forget(person_id) for h in self._holders))
        except TimeoutError:
            log.error("erasure of person %d: a holder did not let go in time", person_id)
