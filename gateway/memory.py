"""Who the person is and what was said before, as the persona composer wants it."""

from __future__ import annotations

from datetime import datetime

from gateway.observability import mask_number
from gateway.persona import Channel, MemoryContext, MemoryTurn, Persona, compose_instructions
from gateway.store import Person, Store, Turn

HISTORY_TURNS = 80  # more than any budget keeps; the composer drops the oldest
INSTRUCTIONS_BUDGET_TOKENS = 4000


def _channel_of(turn: Turn) -> str:
    if turn.channel == "call":
        return "call"
    return "whatsapp_voice" if turn.audio_ms else "whatsapp_text"


async def load_memory(store: Store, person: Person) -> MemoryContext:
    turns = await store.recent_turns(person.id, HISTORY_TURNS)
    said = [t for t in turns if t.role in ("user", "assistant")]
    return MemoryContext(
        name=person.name,
        phone_hint=mask_number(person.e164),
        summary=person.summary,
        turns=[
            MemoryTurn(t.role, t.text, _channel_of(t), datetime.fromisoformat(t.at)) for t in said
        ],
        first_contact=not said and not person.summary,
    )


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
