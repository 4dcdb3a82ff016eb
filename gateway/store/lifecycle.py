"""SQL for what happens to memory over time: summaries, usage per person, and the LGPD
export and erasure of everything kept about one person. Mixed into `Store`."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.store.connection import Connection
    from gateway.store.store import Turn


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# A summary takes seconds; an instance that dies holding a conversation frees it after this.
SUMMARY_LEASE_S = 600.0


# Usage added up per model, the columns a price applies to (usage.cost_usd); callers add
# their WHERE and GROUP BY model. The load test reads a gateway's file with it too.
USAGE_TOTALS = (
    "SELECT COALESCE(model, '') AS model, COUNT(*) AS responses, "
    "SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens, "
    "SUM(input_audio_tokens) AS input_audio_tokens, "
    "SUM(output_audio_tokens) AS output_audio_tokens, "
    "SUM(audio_seconds) AS audio_seconds, SUM(characters) AS characters, "
    "SUM(session_seconds) AS session_seconds FROM usage"
)


@dataclass(frozen=True)
class ConversationRef:
    id: int
    person_id: int
    channel: str
    summary_attempts: int


# Every table holding a person's data, as (alias, FROM ... WHERE person = ?, ORDER BY): the
# export reads these, the erasure counts and deletes them. A new personal table goes here.
_PERSON_ROWS: dict[str, tuple[str, str, str]] = {
    "people": ("p", "FROM people p WHERE p.id = ?", "p.id"),
    "conversations": ("c", "FROM conversations c WHERE c.person_id = ?", "c.id"),
    "turns": (
        "t",
        "FROM turns t JOIN conversations c ON c.id = t.conversation_id WHERE c.person_id = ?",
        "t.id",
    ),
    "inbound_messages": ("i", "FROM inbound_messages i WHERE i.person_id = ?", "i.received_at"),
    "whatsapp_replies": ("r", "FROM whatsapp_replies r WHERE r.person_id = ?", "r.created_at"),
    "outbound_messages": (
        "o",
        "FROM outbound_messages o JOIN inbound_messages i ON i.message_sid = o.inbound_sid "
        "WHERE i.person_id = ?",
        "o.id",
    ),
    "media": ("m", "FROM media m WHERE m.person_id = ?", "m.created_at"),
    "usage": ("u", "FROM usage u WHERE u.person_id = ?", "u.id"),
    "leads": ("l", "FROM leads l WHERE l.person_id = ?", "l.id"),
    "crm_outbox": (
        "x",
        "FROM crm_outbox x JOIN leads l ON l.id = x.lead_id WHERE l.person_id = ?",
        "x.id",
    ),
    "privacy_requests": ("q", "FROM privacy_requests q WHERE q.person_id = ?", "q.id"),
}


class LifecycleQueries:
    _db: Connection
    _skip_locked: Callable[[str], str]  # the store's

    # summaries
    async def end_idle_conversations(self, channel: str, idle_before: datetime) -> int:
        """A chat with no activity for a while has ended, for the summarizer's purposes."""
        cur = await self._db.execute(
            "UPDATE conversations SET ended_at = last_activity_at WHERE channel = ? "
            "AND ended_at IS NULL AND last_activity_at <= ?",
            (channel, idle_before.isoformat(timespec="milliseconds")),
        )
        return cur.rowcount

    async def conversations_to_summarize(
        self, limit: int = 20, lease_s: float = SUMMARY_LEASE_S
    ) -> list[ConversationRef]:
        """Claim ended conversations due a summary, oldest ended first: each is leased to
        this instance for `lease_s` (its retry time if the instance dies), so with several
        instances each conversation is summarised once. A person's conversation waits while
        an earlier one of theirs is leased: their summary is rewritten by one at a time."""
        now = datetime.now(UTC)
        stamp = now.isoformat(timespec="milliseconds")
        lease = (now + timedelta(seconds=lease_s)).isoformat(timespec="milliseconds")
        async with self._db.execute(
            "UPDATE conversations SET summary_next_try_at = ? WHERE id IN (SELECT c.id "
            "FROM conversations c WHERE c.ended_at IS NOT NULL AND c.summarized_at IS NULL "
            "AND (c.summary_next_try_at IS NULL OR c.summary_next_try_at <= ?) "
            "AND NOT EXISTS (SELECT 1 FROM conversations e WHERE e.person_id = c.person_id "
            "AND e.id < c.id AND e.ended_at IS NOT NULL AND e.summarized_at IS NULL "
            f"AND e.summary_next_try_at > ?) ORDER BY c.ended_at LIMIT ?{self._skip_locked('c')}) "
            "RETURNING id, person_id, channel, summary_attempts, ended_at",
            (lease, stamp, stamp, limit),
        ) as cur:
            rows = await cur.fetchall()
        rows = sorted(rows, key=lambda r: (r[4], r[0]))  # RETURNING keeps no order
        return [ConversationRef(r[0], r[1], r[2], r[3]) for r in rows]

    async def release_summaries(self, conversation_ids: list[int]) -> None:
        """Claimed conversations not summarised after all (a stop): due again now."""
        if conversation_ids:
            marks = ", ".join("?" * len(conversation_ids))
            await self._db.execute(
                f"UPDATE conversations SET summary_next_try_at = ? WHERE id IN ({marks}) "
                "AND summarized_at IS NULL",
                (_now(), *conversation_ids),
            )

    async def conversation_turns(self, conversation_id: int) -> list[Turn]:
        from gateway.store.store import Turn

        async with self._db.execute(
            "SELECT t.id, t.conversation_id, c.channel, t.role, t.text, t.audio_ms, t.at "
            "FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "WHERE t.conversation_id = ? ORDER BY t.id",
            (conversation_id,),
        ) as cur:
            return [Turn(*row) for row in await cur.fetchall()]

    async def mark_summarized(self, conversation_id: int) -> None:
        await self._db.execute(
            "UPDATE conversations SET summarized_at = ? WHERE id = ?", (_now(), conversation_id)
        )

    async def summary_failed(self, conversation_id: int, retry_in_s: float) -> None:
        due = datetime.now(UTC) + timedelta(seconds=retry_in_s)
        await self._db.execute(
            "UPDATE conversations SET summary_attempts = summary_attempts + 1, "
            "summary_next_try_at = ? WHERE id = ?",
            (due.isoformat(timespec="milliseconds"), conversation_id),
        )

    # usage
    async def usage_by_model(
        self, person_id: int, since: str | None = None
    ) -> list[dict[str, Any]]:
        """Totals per model (a price applies per model) for one person, from `since` (an
        ISO time, UTC) if given."""
        async with self._db.execute(
            f"{USAGE_TOTALS} WHERE person_id = ? AND at >= ? GROUP BY model",
            (person_id, since or ""),
        ) as cur:
            return [dict(row) for row in await cur.fetchall()]

    # privacy
    async def record_privacy_request(self, person_id: int, e164: str, channel: str, kind: str,
                                     text: str) -> int:  # fmt: skip
        return await self._db.insert(
            "INSERT INTO privacy_requests (person_id, e164, channel, kind, text, requested_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (person_id, e164, channel, kind, text, _now()),
        )

    async def privacy_requests(self, open_only: bool = True) -> list[dict[str, Any]]:
        where = "WHERE handled_at IS NULL" if open_only else ""
        async with self._db.execute(
            f"SELECT * FROM privacy_requests {where} ORDER BY requested_at"
        ) as cur:
            return [dict(row) for row in await cur.fetchall()]

    async def export_person(self, person_id: int) -> dict[str, list[dict[str, Any]]]:
        """Everything kept about one person, table by table (media as base64)."""
        export: dict[str, list[dict[str, Any]]] = {}
        for table, (alias, source, order) in _PERSON_ROWS.items():
            sql = f"SELECT {alias}.* {source} ORDER BY {order}"
            async with self._db.execute(sql, (person_id,)) as cur:
                rows = [dict(row) for row in await cur.fetchall()]
            for row in rows:
                for key, value in row.items():
                    if isinstance(value, bytes):
                        row[key] = base64.b64encode(value).decode("ascii")
                    elif key in ("payload", "media_ids", "body") and isinstance(value, str):
                        row[key] = json.loads(value)
            export[table] = rows
        return export

    async def erase_person(self, person_id: int) -> dict[str, int]:
        """Delete every row of one person in one transaction; returns rows removed per table.

        The erasure request itself stays as an audit line, with the number and words removed.
        """
        counts: dict[str, int] = {}
        async with self._db.transaction():
            # The person's row lock first: on PostgreSQL an erasure beside this one waits
            # here, then finds nobody (SQLite runs one transaction at a time anyway).
            locked = await self._db.execute(
                "UPDATE people SET last_seen = last_seen WHERE id = ?", (person_id,)
            )
            if not locked.rowcount:
                return {table: 0 for table in _PERSON_ROWS}
            for table, (_, source, _) in _PERSON_ROWS.items():
                async with self._db.execute(f"SELECT COUNT(*) {source}", (person_id,)) as cur:
                    counts[table] = (await cur.fetchone())[0]
            await self._db.execute(
                "UPDATE privacy_requests SET e164 = '(apagado)', text = '', handled_at = "
                "COALESCE(handled_at, ?) WHERE person_id = ?",
                (_now(), person_id),
            )
            await self._db.execute("DELETE FROM media WHERE person_id = ?", (person_id,))
            # cascades: conversations, turns, queue, replies, usage, leads and their outbox
            await self._db.execute("DELETE FROM people WHERE id = ?", (person_id,))
        counts["privacy_requests"] = 0  # kept as anonymous audit lines
        return counts
