"""Read-only queries behind the dashboard: who spoke lately, and how fast we answered.

Functions over a `Store` rather than methods on it, so the operator's views live apart from
the queries the calls and messages depend on. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.store.store import Store

RECENT_TURNS = 2000
RECENT_CONVERSATIONS = 200


@dataclass(frozen=True)
class TurnLine:
    role: str
    text: str
    at: str
    latency_ms: float | None


@dataclass(frozen=True)
class ConversationReport:
    id: int
    channel: str
    started_at: str
    ended_at: str | None
    turns: list[TurnLine] = field(default_factory=list)


@dataclass(frozen=True)
class PersonReport:
    id: int
    e164: str
    name: str | None
    last_activity_at: str
    conversations: list[ConversationReport] = field(default_factory=list)


@dataclass(frozen=True)
class LatencySamples:
    """Milliseconds from the latest call turns, newest first."""

    response_ms: list[float]  # caller's end of speech -> first reply frame to Twilio
    greeting_ms: list[float]  # media stream start -> first greeting frame
    upstream_ms: list[float]  # Realtime's speech_stopped -> its first audio delta


async def recent_people(
    store: Store, *, people: int = 10, conversations: int = 3, turns: int = 40
) -> list[PersonReport]:
    """The people heard from most recently, each with their latest conversations and turns."""
    found = await _people(store, people)
    convs = await _conversations(store, [p.id for p in found], conversations)
    lines = await _turns(store, [c.id for _, c in convs], turns)
    by_id = {p.id: p for p in found}
    for person_id, conv in convs:
        conv.turns.extend(lines.get(conv.id, []))
        by_id[person_id].conversations.append(conv)
    return found


async def latency_samples(store: Store, *, limit: int = 2000) -> LatencySamples:
    """Latency fields of the latest `limit` timed assistant turns and greetings of calls."""
    turns = await store.rows(
        "SELECT t.response_latency_ms AS latency, t.upstream_first_audio_ms AS upstream "
        "FROM turns t JOIN conversations c ON c.id = t.conversation_id "
        "WHERE t.role = 'assistant' AND c.channel = 'call' "
        "AND (t.response_latency_ms IS NOT NULL OR t.upstream_first_audio_ms IS NOT NULL) "
        "ORDER BY t.id DESC LIMIT ?",
        (limit,),
    )
    greetings = await store.rows(
        "SELECT greeting_latency_ms FROM conversations WHERE channel = 'call' "
        "AND greeting_latency_ms IS NOT NULL ORDER BY id DESC LIMIT ?",
        (limit,),
    )
    return LatencySamples(
        response_ms=[float(r["latency"]) for r in turns if r["latency"] is not None],
        greeting_ms=[float(r[0]) for r in greetings],
        upstream_ms=[float(r["upstream"]) for r in turns if r["upstream"] is not None],
    )


async def _people(store: Store, limit: int) -> list[PersonReport]:
    # Anyone active lately has one of the latest turns or started one of the latest
    # conversations; looking only there keeps a poll's cost flat as the store grows (the
    # dashboard shares the one connection with live calls).
    rows = await store.rows(
        "WITH recent(id) AS (SELECT conversation_id FROM (SELECT conversation_id FROM turns "
        "ORDER BY id DESC LIMIT ?) AS t UNION SELECT id FROM (SELECT id FROM conversations "
        "ORDER BY id DESC LIMIT ?) AS c) "
        "SELECT p.id, p.e164, p.name, MAX(c.last_activity_at) AS active "
        "FROM recent JOIN conversations c ON c.id = recent.id JOIN people p ON p.id = c.person_id "
        "GROUP BY p.id ORDER BY active DESC, p.id DESC LIMIT ?",
        (RECENT_TURNS, RECENT_CONVERSATIONS, limit),
    )
    return [PersonReport(r["id"], r["e164"], r["name"], r["active"]) for r in rows]


async def _conversations(
    store: Store, person_ids: Sequence[int], per_person: int
) -> list[tuple[int, ConversationReport]]:
    if not person_ids:
        return []
    rows = await store.rows(
        "SELECT * FROM (SELECT id, person_id, channel, started_at, ended_at, ROW_NUMBER() "
        "OVER (PARTITION BY person_id ORDER BY started_at DESC, id DESC) AS n "
        f"FROM conversations WHERE person_id IN ({_marks(person_ids)})) AS ranked "
        "WHERE n <= ? ORDER BY started_at DESC, id DESC",
        (*person_ids, per_person),
    )
    return [
        (r["person_id"], ConversationReport(r["id"], r["channel"], r["started_at"], r["ended_at"]))
        for r in rows
    ]


async def _turns(
    store: Store, conversation_ids: Sequence[int], per_conversation: int
) -> dict[int, list[TurnLine]]:
    """The latest turns of each conversation, oldest first."""
    if not conversation_ids:
        return {}
    rows = await store.rows(
        "SELECT * FROM (SELECT id, conversation_id, role, text, at, response_latency_ms, "
        "ROW_NUMBER() OVER (PARTITION BY conversation_id ORDER BY id DESC) AS n FROM turns "
        f"WHERE conversation_id IN ({_marks(conversation_ids)})) AS ranked WHERE n <= ? "
        "ORDER BY id",
        (*conversation_ids, per_conversation),
    )
    lines: dict[int, list[TurnLine]] = {}
    for r in rows:
        line = TurnLine(r["role"], r["text"], r["at"], r["response_latency_ms"])
        lines.setdefault(r["conversation_id"], []).append(line)
    return lines


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)
