"""The gateway's memory in SQL (SQLite by aiosqlite, or PostgreSQL by asyncpg): people,
conversations, turns, inbound queue, media and usage. The SQL is written once for both."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.phones import normalize_number
from gateway.store.connection import Connection
from gateway.store.leads import LeadQueries
from gateway.store.lifecycle import LifecycleQueries
from gateway.store.migrations import migrate, migrate_postgres
from gateway.store.postgres import PgConnection

# A queued message (alias m) waits while an earlier one of its person is unfinished, so
# replies reach each person in the order they asked. Earlier means accepted earlier: the
# id, which also orders the messages of one stored batch.
_NOT_HELD_BACK = (
    "NOT EXISTS (SELECT 1 FROM inbound_messages e WHERE e.person_id = m.person_id "
    "AND e.status IN ('pending', 'processing') AND e.id < m.id)"
)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


# A processing row (alias m) whose claimer is presumed dead: another instance, not seen
# within INSTANCE_TIMEOUT_S. Parameters: our instance id, the alive-after moment.
_CLAIMER_GONE = (
    "(m.claimed_by IS NOT NULL AND m.claimed_by <> ? AND NOT EXISTS (SELECT 1 FROM instances i "
    "WHERE i.id = m.claimed_by AND i.seen_at > ?))"
)
# An outcome is written only by the claim's holder: an instance presumed dead that wakes up
# (a long pause) must not overwrite what the instance that took over is doing.
_STILL_OURS = "(claimed_by IS NULL OR claimed_by = ?)"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
    received_at: str = ""


class Store(LifecycleQueries, LeadQueries):
    """SQLite: one aiosqlite connection in WAL mode, a single writer process. PostgreSQL: a
    pool shared by several gateway instances (README, "Running several instances").

    Every write of several statements runs in `transaction()` (see gateway.store.connection
    and gateway.store.postgres for what each engine makes of it).
    """

    def __init__(self, db: Connection | PgConnection, schema_version: int) -> None:
        self._db = db
        self.schema_version = schema_version
        # Set by the app (INSTANCE_ID, INSTANCE_TIMEOUT_S): queue claims carry the name, and
        # a claim whose instance has not been seen for the timeout is presumed dead.
        self.instance_id = "local"
        self.instance_timeout_s = 15.0

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._db.transaction()

    @classmethod
    async def open(cls, database_url: str) -> Store:
        if database_url.startswith(POSTGRES_SCHEMES):
            pg = await PgConnection.open(database_url)
            try:
                return cls(pg, await migrate_postgres(pg))
            except BaseException:
                await pg.close()
                raise
        path = database_url.removeprefix("sqlite:///")
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        raw = await aiosqlite.connect(path, isolation_level=None)
        raw.row_factory = aiosqlite.Row
        db = Connection(raw)
        for pragma in ("journal_mode=WAL", "busy_timeout=5000", "synchronous=NORMAL"):
            await db.execute(f"PRAGMA {pragma}")
        version = await migrate(db)  # with foreign keys off: a migration may rebuild a table
        await db.execute("PRAGMA foreign_keys=ON")
        return cls(db, version)

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> bool:
        try:
            async with self._db.execute("SELECT 1") as cur:
                return (await cur.fetchone())[0] == 1
        except Exception:
            return False

    async def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one read, for queries that live beside the store in this package
        (reports.py) rather than in it. Writes go through the named methods."""
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            raise ValueError("Store.rows only reads")
        async with self._db.execute(sql, args) as cur:
            return list(await cur.fetchall())

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
        return await self._db.insert(
            "INSERT INTO conversations (person_id, channel, external_id, started_at, "
            "last_activity_at) VALUES (?, ?, ?, ?, ?)",
            (person_id, channel, external_id, now, now),
        )

    async def set_greeting_latency(self, conversation_id: int, ms: float) -> None:
        """Media stream start -> the greeting's first frame, for the call's conversation."""
        await self._db.execute(
            "UPDATE conversations SET greeting_latency_ms = ? WHERE id = ?", (ms, conversation_id)
        )

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
        async with self.transaction():
            return await self._insert_turn(
                conversation_id,
                role,
                text,
                audio_ms=audio_ms,
                response_latency_ms=response_latency_ms,
                upstream_first_audio_ms=upstream_first_audio_ms,
            )

    async def _insert_turn(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        audio_ms: int | None = None,
        response_latency_ms: float | None = None,
        upstream_first_audio_ms: float | None = None,
        at: str | None = None,
    ) -> int:
        """The one place a turn is written, for every channel; inside a transaction."""
        now = at or utcnow()
        turn_id = await self._db.insert(
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
        return turn_id

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

    async def turns_since(
        self, person_id: int, after_turn_id: int, other_than_conversation: int | None
    ) -> list[Turn]:
        """What the person said or heard after a turn id, in any other conversation, oldest
        first: the news a session opened before them has not seen."""
        async with self._db.execute(
            "SELECT t.*, c.channel FROM turns t JOIN conversations c ON c.id = t.conversation_id "
            "WHERE c.person_id = ? AND t.id > ? AND t.conversation_id IS DISTINCT FROM ? "
            "AND t.role IN ('user', 'assistant') ORDER BY t.id",
            (person_id, after_turn_id, other_than_conversation),
        ) as cur:
            rows = await cur.fetchall()
        return [
            Turn(r["id"], r["conversation_id"], r["channel"], r["role"], r["text"],
                 r["audio_ms"], r["at"])
            for r in rows
        ]  # fmt: skip

    # instances (several gateways on one PostgreSQL store)
    def _alive_after(self) -> str:
        """Instances seen after this moment are alive."""
        gone = datetime.now(UTC) - timedelta(seconds=self.instance_timeout_s)
        return gone.isoformat(timespec="milliseconds")

    async def heartbeat(self, started_at: str) -> None:
        """This instance is alive (every third of INSTANCE_TIMEOUT_S)."""
        await self._db.execute(
            "INSERT INTO instances (id, started_at, seen_at) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET started_at = excluded.started_at, "
            "seen_at = excluded.seen_at",
            (self.instance_id, started_at, utcnow()),
        )

    async def instance_gone(self) -> None:
        """A clean stop: this instance's cut-off claims go to the others at once."""
        await self._db.execute("DELETE FROM instances WHERE id = ?", (self.instance_id,))

    async def live_instances(self) -> list[dict[str, Any]]:
        async with self._db.execute(
            "SELECT id, started_at, seen_at FROM instances WHERE seen_at > ? ORDER BY id",
            (self._alive_after(),),
        ) as cur:
            return [dict(row) for row in await cur.fetchall()]

    # the durable inbound queue
    async def claim_inbound(self, stale_after_s: float = 300.0) -> InboundMessage | None:
        """Claim the oldest ready message for this instance: pending and due, or processing
        by an instance presumed dead, or for too long (a hung worker); never one held back
        behind an earlier unfinished message of its person.

        On PostgreSQL the row is locked as it is chosen and rows other instances are claiming
        are skipped; a person's later message is held back by the earlier one whether that
        one is being claimed (still pending to others) or claimed, so order holds across
        instances without a lock of our own."""
        now = datetime.now(UTC)
        stale = (now - timedelta(seconds=stale_after_s)).isoformat(timespec="milliseconds")
        stamp = now.isoformat(timespec="milliseconds")
        async with self._db.execute(
            "UPDATE inbound_messages SET status = 'processing', attempts = attempts + 1, "
            "updated_at = ?, claimed_by = ? WHERE id = (SELECT m.id FROM inbound_messages m "
            "WHERE ((m.status = 'pending' AND m.next_try_at <= ?) "
            f"OR (m.status = 'processing' AND (m.updated_at <= ? OR {_CLAIMER_GONE}))) "
            f"AND {_NOT_HELD_BACK} ORDER BY m.received_at, m.id LIMIT 1{self._skip_locked('m')}) "
            "RETURNING *",
            (stamp, self.instance_id, stamp, stale, self.instance_id, self._alive_after()),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _inbound(row)

    def _skip_locked(self, alias: str) -> str:
        """PostgreSQL's row lock for a claim; SQLite has one writer and no such clause."""
        return f" FOR UPDATE OF {alias} SKIP LOCKED" if self.dialect == "postgresql" else ""

    async def release_stale_processing(self) -> int:
        """At start-up: this instance's claims were cut off by its crash, and so were those
        of instances presumed dead (and claims made before instances were named)."""
        cur = await self._db.execute(
            "UPDATE inbound_messages AS m SET status = 'pending', claimed_by = NULL, "
            "updated_at = ? WHERE m.status = 'processing' AND (m.claimed_by IS NULL "
            f"OR m.claimed_by = ? OR {_CLAIMER_GONE})",
            (utcnow(), self.instance_id, self.instance_id, self._alive_after()),
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
            "UPDATE inbound_messages SET status = ?, error = ?, next_try_at = ?, updated_at = ?, "
            f"claimed_by = NULL WHERE message_sid = ? AND {_STILL_OURS}",
            (
                status,
                error,
                next_try,
                now.isoformat(timespec="milliseconds"),
                message_sid,
                self.instance_id,
            ),
        )

    async def defer_inbound(self, message_sid: str, delay_s: float, reason: str) -> None:
        """Back to pending until `delay_s` from now, the claim not counted as an attempt: a
        message held by a limit has not failed."""
        now = datetime.now(UTC)
        await self._db.execute(
            "UPDATE inbound_messages SET status = 'pending', "
            "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, error = ?, "
            f"next_try_at = ?, updated_at = ?, claimed_by = NULL WHERE message_sid = ? "
            f"AND {_STILL_OURS}",
            (
                reason,
                (now + timedelta(seconds=delay_s)).isoformat(timespec="milliseconds"),
                now.isoformat(timespec="milliseconds"),
                message_sid,
                self.instance_id,
            ),
        )

    async def waiting_behind(self, message: InboundMessage) -> list[InboundMessage]:
        """The person's messages merged into this one already (a resumed turn), then those
        pending behind it, oldest first: held back by it, so no other task claims them."""
        async with self._db.execute(
            "SELECT * FROM inbound_messages WHERE merged_into = ? OR (person_id = ? AND "
            "status = 'pending' AND merged_into IS NULL AND id > (SELECT id FROM "
            "inbound_messages WHERE message_sid = ?)) ORDER BY id",
            (message.message_sid, message.person_id, message.message_sid),
        ) as cur:
            rows = await cur.fetchall()
        return [_inbound(row) for row in rows]

    async def merge_into(self, message_sid: str, merged: list[str]) -> None:
        """These messages are answered by `message_sid`'s reply: done, pointing at it."""
        stamp = utcnow()
        marks = ", ".join("?" * len(merged))
        await self._db.execute(
            "UPDATE inbound_messages SET status = 'done', merged_into = ?, updated_at = ? "
            f"WHERE message_sid IN ({marks}) AND status = 'pending'",
            (message_sid, stamp, *merged),
        )

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
        model: str | None = None,
        characters: int = 0,
        session_seconds: float = 0.0,
    ) -> None:
        await self._db.execute(
            "INSERT INTO usage (person_id, conversation_id, response_id, input_tokens, "
            "output_tokens, input_audio_tokens, output_audio_tokens, audio_seconds, at, model, "
            "characters, session_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                model,
                characters,
                session_seconds,
            ),
        )

    # ---- WhatsApp: queue timing, replies, outbound messages, published media -------------

    async def accept_inbound_batch(self, arrivals: list[Arrival]) -> list[bool]:
        """Accept many webhooks in one transaction; True for each MessageSid not seen before.

        Group commit for bursts: a few statements and one commit whatever the batch size,
        instead of three round trips and commits per webhook. One batch at a time.
        """
        async with self.transaction():
            return await self._accept_in_transaction(arrivals)

    async def _accept_in_transaction(self, arrivals: list[Arrival]) -> list[bool]:
        now = utcnow()
        people = {a.e164: a.name for a in arrivals}
        await self._db.executemany(
            _UPSERT_PERSON, [(e164, name, now, now) for e164, name in people.items()]
        )
        seen = await self._known_sids([a.message_sid for a in arrivals])
        fresh = []
        for arrival in arrivals:
            fresh.append(arrival.message_sid not in seen)
            seen.add(arrival.message_sid)  # the same SID twice in one batch: once
        await self._db.executemany(
            "INSERT INTO inbound_messages (message_sid, person_id, payload, "
            "next_try_at, received_at, updated_at) SELECT ?, id, ?, ?, ?, ? FROM people "
            "WHERE e164 = ? ON CONFLICT DO NOTHING",
            [
                (a.message_sid, json.dumps(a.payload, ensure_ascii=False), now, now, now, a.e164)
                for a, new in zip(arrivals, fresh, strict=True)
                if new
            ],
        )
        return fresh

    async def _known_sids(self, sids: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(sids), _SQLITE_MAX_PARAMS):
            chunk = sids[start : start + _SQLITE_MAX_PARAMS]
            marks = ",".join("?" * len(chunk))
            async with self._db.execute(
                f"SELECT message_sid FROM inbound_messages WHERE message_sid IN ({marks})", chunk
            ) as cur:
                known.update(row[0] for row in await cur.fetchall())
        return known

    async def next_inbound_due(self) -> datetime | None:
        """When the earliest pending message becomes claimable (None: nothing pending).

        Messages held back behind an earlier one of their person do not count: they become
        claimable when that one ends, and the worker is woken then.
        """
        async with self._db.execute(
            "SELECT MIN(m.next_try_at) FROM inbound_messages m "
            f"WHERE m.status = 'pending' AND {_NOT_HELD_BACK}"
        ) as cur:
            (due,) = await cur.fetchone()
        return datetime.fromisoformat(due) if due else None

    async def save_reply(self, reply: WhatsAppReply) -> None:
        """Keep a reply, and a model reply's two turns with it in one transaction: a crash can
        never leave turns without their reply, which a retry would then write a second time."""
        now = utcnow()
        async with self.transaction():
            await self._db.execute(
                "INSERT INTO whatsapp_replies (message_sid, person_id, conversation_id, kind, "
                "user_text, user_audio_ms, text, audio_ms, media_ids, response_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    reply.message_sid,
                    reply.person_id,
                    reply.conversation_id,
                    reply.kind,
                    reply.user_text,
                    reply.user_audio_ms,
                    reply.text,
                    reply.audio_ms,
                    json.dumps(reply.media_ids),
                    reply.response_id,
                    now,
                ),
            )
            if reply.conversation_id is not None:
                user = reply.user_text or ""
                await self._insert_turn(
                    reply.conversation_id, "user", user, audio_ms=reply.user_audio_ms, at=now
                )
                await self._insert_turn(
                    reply.conversation_id, "assistant", reply.text, audio_ms=reply.audio_ms, at=now
                )

    async def reply_for(self, message_sid: str) -> WhatsAppReply | None:
        async with self._db.execute(
            "SELECT * FROM whatsapp_replies WHERE message_sid = ?", (message_sid,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return WhatsAppReply(
            message_sid=row["message_sid"],
            person_id=row["person_id"],
            conversation_id=row["conversation_id"],
            kind=row["kind"],
            text=row["text"],
            user_text=row["user_text"],
            user_audio_ms=row["user_audio_ms"],
            audio_ms=row["audio_ms"],
            media_ids=json.loads(row["media_ids"]),
            response_id=row["response_id"],
        )

    async def begin_outbound(self, inbound_sid: str, part: int, kind: str) -> str | None:
        """Written before Twilio is asked to create one part of a reply. Returns when an
        earlier attempt at that part began if its outcome was never recorded (the process
        died, or the answer was lost, after Twilio may have accepted it): look before
        sending again. `None` for a first attempt."""
        async with self._db.execute(
            "SELECT created_at FROM outbound_messages "
            "WHERE inbound_sid = ? AND part = ? AND status = ?",
            (inbound_sid, part, CREATING),
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            return str(row["created_at"])
        now = utcnow()
        await self._db.execute(
            "INSERT INTO outbound_messages (message_sid, inbound_sid, part, kind, status, "
            "status_rank, created_at, updated_at) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (inbound_sid, part, kind, CREATING, status_rank(CREATING), now, now),
        )
        return None

    async def forget_outbound(self, inbound_sid: str, part: int) -> None:
        """Twilio answered a create with an error: the part is not there, its attempt ends."""
        await self._db.execute(
            "DELETE FROM outbound_messages WHERE inbound_sid = ? AND part = ? AND status = ?",
            (inbound_sid, part, CREATING),
        )

    async def outbound_recorded(self, message_sid: str) -> bool:
        """Whether a message Twilio has is already recorded as some reply's part."""
        async with self._db.execute(
            "SELECT 1 FROM outbound_messages WHERE message_sid = ? AND inbound_sid IS NOT NULL",
            (message_sid,),
        ) as cur:
            return await cur.fetchone() is not None

    async def record_outbound(
        self,
        inbound_sid: str,
        part: int,
        kind: str,
        *,
        message_sid: str | None,
        status: str,
        error_code: int | None = None,
        error_message: str | None = None,
    ) -> None:
        """One part of a reply went to Twilio (or Twilio refused it: no SID, an error code).
        It replaces the part's `begin_outbound` row.

        A status callback may already have created the row by SID; its status is kept when it
        is further along than the create's answer.
        """
        now = utcnow()
        async with self._db.transaction():
            await self.forget_outbound(inbound_sid, part)
            await self._db.execute(
                "INSERT INTO outbound_messages (message_sid, inbound_sid, part, kind, status, "
                "status_rank, error_code, error_message, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(message_sid) DO UPDATE SET "
                "inbound_sid = excluded.inbound_sid, part = excluded.part, kind = excluded.kind, "
                + _KEEP_FURTHEST_STATUS,
                (
                    message_sid,
                    inbound_sid,
                    part,
                    kind,
                    status,
                    status_rank(status),
                    error_code,
                    error_message,
                    now,
                    now,
                ),
            )

    async def update_outbound_status(
        self,
        message_sid: str,
        status: str,
        error_code: int | None = None,
        error_message: str | None = None,
    ) -> None:
        """A status callback; callbacks can arrive out of order, so a status never goes back."""
        now = utcnow()
        await self._db.execute(
            "INSERT INTO outbound_messages (message_sid, status, status_rank, error_code, "
            "error_message, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(message_sid) DO UPDATE SET " + _KEEP_FURTHEST_STATUS,
            (message_sid, status, status_rank(status), error_code, error_message, now, now),
        )

    async def outbound_for(self, inbound_sid: str) -> list[OutboundMessage]:
        """The messages sent for one inbound message, in reply order."""
        async with self._db.execute(
            "SELECT * FROM outbound_messages WHERE inbound_sid = ? ORDER BY part",
            (inbound_sid,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            OutboundMessage(
                r["message_sid"],
                r["inbound_sid"],
                r["part"],
                r["kind"],
                r["status"],
                r["error_code"],
                r["error_message"],
            )
            for r in rows
        ]

    async def put_media(
        self,
        media_id: str,
        data: bytes,
        content_type: str,
        *,
        person_id: int | None,
        ttl_s: float,
    ) -> None:
        now = datetime.now(UTC)
        await self._db.execute(
            "INSERT INTO media (id, person_id, content_type, data, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                media_id,
                person_id,
                content_type,
                data,
                now.isoformat(timespec="milliseconds"),
                (now + timedelta(seconds=ttl_s)).isoformat(timespec="milliseconds"),
            ),
        )

    async def get_media(self, media_id: str) -> tuple[bytes, str] | None:
        """(data, content type) of a published file that has not expired."""
        async with self._db.execute(
            "SELECT data, content_type FROM media WHERE id = ? AND expires_at > ?",
            (media_id, utcnow()),
        ) as cur:
            row = await cur.fetchone()
        return (bytes(row["data"]), row["content_type"]) if row else None

    async def delete_expired_media(self) -> int:
        cur = await self._db.execute("DELETE FROM media WHERE expires_at <= ?", (utcnow(),))
        return cur.rowcount


@dataclass(frozen=True)
class WhatsAppReply:
    """What we answer to one inbound message: the model's reply or a fixed message."""

    message_sid: str
    person_id: int
    conversation_id: int | None  # set for model replies: their turns belong to it
    kind: str  # "model" | "fixed"
    text: str
    user_text: str | None = None
    user_audio_ms: int | None = None
    audio_ms: int | None = None
    media_ids: list[str] = field(default_factory=list)  # published voice notes, in order
    response_id: str | None = None


@dataclass(frozen=True)
class OutboundMessage:
    message_sid: str | None
    inbound_sid: str | None
    part: int | None
    kind: str | None
    status: str
    error_code: int | None
    error_message: str | None


# Twilio's message statuses in the order they happen; terminal ones last. A callback that
# arrives late (sent after delivered) must not move a message backwards.
_STATUS_RANKS = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 0,
    "sending": 1,
    "sent": 2,
    "partially_delivered": 3,
    "delivered": 3,
    "read": 4,
    "canceled": 5,
    "undelivered": 5,
    "failed": 5,
}


def _inbound(row: Any) -> InboundMessage:
    return InboundMessage(
        row["message_sid"],
        row["person_id"],
        json.loads(row["payload"]),
        row["status"],
        row["attempts"],
        row["received_at"],
    )


CREATING = "creating"  # not a Twilio status: a part being created, its outcome not yet known


def status_rank(status: str) -> int:
    return _STATUS_RANKS.get(status, 0)


_KEEP_FURTHEST_STATUS = (
    "status = CASE WHEN excluded.status_rank >= outbound_messages.status_rank "
    "THEN excluded.status ELSE outbound_messages.status END, "
    "status_rank = CASE WHEN excluded.status_rank >= outbound_messages.status_rank "
    "THEN excluded.status_rank ELSE outbound_messages.status_rank END, "
    "error_code = COALESCE(excluded.error_code, outbound_messages.error_code), "
    "error_message = COALESCE(excluded.error_message, outbound_messages.error_message), "
    "updated_at = excluded.updated_at"
)


@dataclass(frozen=True)
class Arrival:
    """One webhook to accept: who sent it (E.164), their profile name, its SID and fields."""

    e164: str
    name: str | None
    message_sid: str
    payload: dict[str, Any]


_UPSERT_PERSON = (
    "INSERT INTO people (e164, name, first_seen, last_seen) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(e164) DO UPDATE SET last_seen = excluded.last_seen, "
    "name = COALESCE(excluded.name, people.name)"
)
_SQLITE_MAX_PARAMS = 900  # below SQLite's default limit of 999 host parameters
