"""The gateway's memory in SQL (aiosqlite): people, conversations, turns, inbound queue,
media and usage. The only module that speaks SQL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.store.migrations import migrate


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def normalize_number(raw: str) -> str:
    """'whatsapp:+55 16 99999-0001' and '+5516999990001' are the same person."""
    number = raw.strip().removeprefix("whatsapp:").strip()
    digits = "".join(ch for ch in number if ch.isdigit())
    if not digits or len(digits) > 15:
        raise ValueError(f"not an E.164 number: {raw!r}")
    return "+" + digits


@dataclass(frozen=True)
class Person:
    id: int
    e164: str
    name: str | None
    summary: str | None
    first_seen: str
    last_seen: str


@dataclass(frozen=True)
class Turn:
    id: int
    conversation_id: int
    channel: str
    role: str
    text: str
    audio_ms: int | None
    at: str


@dataclass(frozen=True)
class InboundMessage:
    message_sid: str
    person_id: int
    payload: dict[str, Any]
    status: str
    attempts: int


class Store:
    """One aiosqlite connection in WAL mode; a single writer process (see README)."""

    def __init__(self, db: aiosqlite.Connection, schema_version: int) -> None:
        self._db = db
        self.schema_version = schema_version

    @classmethod
    async def open(cls, database_url: str) -> Store:
        path = database_url.removeprefix("sqlite:///")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        for pragma in (
            "journal_mode=WAL",
            "foreign_keys=ON",
            "busy_timeout=5000",
            "synchronous=NORMAL",
        ):
            await db.execute(f"PRAGMA {pragma}")
        return cls(db, await migrate(db))

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> bool:
        try:
            async with self._db.execute("SELECT 1") as cur:
                return (await cur.fetchone())[0] == 1
        except Exception:
            return False

    # people
    async def person_for(self, number: str, name: str | None = None) -> Person:
        """Find or create the person behind a number; a known name stays unless a new one comes."""
        e164, now = normalize_number(number), utcnow()
        await self._db.execute(
            "INSERT INTO people (e164, name, first_seen, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(e164) DO UPDATE SET last_seen = excluded.last_seen, "
            "name = COALESCE(excluded.name, people.name)",
            (e164, name or None, now, now),
        )
        person = await self.person_by_number(e164)
        assert person is not None
        return person

    async def person_by_number(self, number: str) -> Person | None:
        return await self._one_person(
            "SELECT * FROM people WHERE e164 = ?", normalize_number(number)
        )

    async def person_by_id(self, person_id: int) -> Person | None:
        return await self._one_person("SELECT * FROM people WHERE id = ?", person_id)

    async def _one_person(self, sql: str, arg: Any) -> Person | None:
        async with self._db.execute(sql, (arg,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return Person(
            row["id"], row["e164"], row["name"], row["summary"], row["first_seen"], row["last_seen"]
        )

    async def set_summary(self, person_id: int, summary: str) -> None:
        await self._db.execute(
            "UPDATE people SET summary = ?, summary_updated_at = ? WHERE id = ?",
            (summary, utcnow(), person_id),
        )

    # conversations and turns
    async def start_conversation(
        self, person_id: int, channel: str, external_id: str | None = None
    ) -> int:
        now = utcnow()
        cur = await self._db.execute(
            "INSERT INTO conversations (person_id, channel, external_id, started_at, "
            "last_activity_at) VALUES (?, ?, ?, ?, ?)",
            (person_id, channel, external_id, now, now),
        )
        return cur.lastrowid

    async def end_conversation(self, conversation_id: int) -> None:
        await self._db.execute(
            "UPDATE conversations SET ended_at = COALESCE(ended_at, ?) WHERE id = ?",
            (utcnow(), conversation_id),
        )

    async def add_turn(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        audio_ms: int | None = None,
        response_latency_ms: float | None = None,
        upstream_first_audio_ms: float | None = None,
    ) -> int:
        now = utcnow()
        cur = await self._db.execute(
            "INSERT INTO turns (conversation_id, role, text, audio_ms, at, response_latency_ms, "
            "upstream_first_audio_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                conversation_id,
                role,
                text,
                audio_ms,
                now,
                response_latency_ms,
                upstream_first_audio_ms,
            ),
        )
        await self._db.execute(
            "UPDATE conversations SET last_activity_at = ? WHERE id = ?", (now, conversation_id)
        )
        return cur.lastrowid

    async def recent_turns(self, person_id: int, limit: int = 50) -> list[Turn]:
        """The person's latest turns across every channel, oldest first."""
        async with self._db.execute(
            "SELECT t.*, c.channel FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "WHERE c.person_id = ? ORDER BY t.id DESC LIMIT ?",
            (person_id, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [
            Turn(
                r["id"],
                r["conversation_id"],
                r["channel"],
                r["role"],
                r["text"],
                r["audio_ms"],
                r["at"],
            )
            for r in reversed(rows)
        ]

    # the durable inbound queue
    async def accept_inbound(
        self, message_sid: str, person_id: int, payload: dict[str, Any]
    ) -> bool:
        """Store a webhook before it is acknowledged; False for a MessageSid already seen."""
        now = utcnow()
        cur = await self._db.execute(
            "INSERT OR IGNORE INTO inbound_messages (message_sid, person_id, payload, "
            "next_try_at, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (message_sid, person_id, json.dumps(payload, ensure_ascii=False), now, now, now),
        )
        return cur.rowcount == 1

    async def claim_inbound(self, stale_after_s: float = 300.0) -> InboundMessage | None:
        """Claim the oldest ready message: pending and due, or processing for too long (a crash)."""
        now = datetime.now(UTC)
        stale = (now - timedelta(seconds=stale_after_s)).isoformat(timespec="milliseconds")
        stamp = now.isoformat(timespec="milliseconds")
        async with self._db.execute(
            "UPDATE inbound_messages SET status = 'processing', attempts = attempts + 1, "
            "updated_at = ? WHERE message_sid = (SELECT message_sid FROM inbound_messages "
            "WHERE (status = 'pending' AND next_try_at <= ?) "
            "OR (status = 'processing' AND updated_at <= ?) ORDER BY received_at LIMIT 1) "
            "RETURNING *",
            (stamp, stamp, stale),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return InboundMessage(
            row["message_sid"],
            row["person_id"],
            json.loads(row["payload"]),
            row["status"],
            row["attempts"],
        )

    async def release_stale_processing(self) -> int:
        """At start-up nothing is in flight, so any 'processing' row was cut off by a crash."""
        cur = await self._db.execute(
            "UPDATE inbound_messages SET status = 'pending', updated_at = ? "
            "WHERE status = 'processing'",
            (utcnow(),),
        )
        return cur.rowcount

    async def finish_inbound(
        self, message_sid: str, *, error: str | None = None, retry_in_s: float | None = None
    ) -> None:
        """Mark done, failed, or back to pending for a retry after `retry_in_s`."""
        now = datetime.now(UTC)
        if retry_in_s is not None:
            status = "pending"
            next_try = (now + timedelta(seconds=retry_in_s)).isoformat(timespec="milliseconds")
        else:
            status, next_try = (
                ("failed" if error else "done"),
                now.isoformat(timespec="milliseconds"),
            )
        await self._db.execute(
            "UPDATE inbound_messages SET status = ?, error = ?, next_try_at = ?, updated_at = ? "
            "WHERE message_sid = ?",
            (status, error, next_try, now.isoformat(timespec="milliseconds"), message_sid),
        )

    async def inbound_status(self, message_sid: str) -> str | None:
        async with self._db.execute(
            "SELECT status FROM inbound_messages WHERE message_sid = ?", (message_sid,)
        ) as cur:
            row = await cur.fetchone()
        return row["status"] if row else None

    # usage
    async def add_usage(
        self,
        person_id: int,
        conversation_id: int | None,
        response_id: str | None,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        input_audio_tokens: int = 0,
        output_audio_tokens: int = 0,
        audio_seconds: float = 0.0,
    ) -> None:
        await self._db.execute(
            "INSERT INTO usage (person_id, conversation_id, response_id, input_tokens, "
            "output_tokens, input_audio_tokens, output_audio_tokens, audio_seconds, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                person_id,
                conversation_id,
                response_id,
                input_tokens,
                output_tokens,
                input_audio_tokens,
                output_audio_tokens,
                audio_seconds,
                utcnow(),
            ),
        )
