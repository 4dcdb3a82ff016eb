"""What the tests read and write about the WhatsApp inbound queue, through the store's
public interface (`accept_inbound_batch`, the webhook's own path, and `Store.rows`).

The product never needs these: it accepts in batches and never asks after one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.store import Store
from gateway.store.store import POSTGRES_SCHEMES, Arrival

SETTLED = ("done", "failed")
POLL_S = 0.02  # a retry is due 2 s later at the earliest (inbound_queue.Backoff): never missed


@dataclass(frozen=True)
class InboundRecord:
    """An inbound message's bookkeeping, without its payload."""

    message_sid: str
    person_id: int
    status: str
    attempts: int
    error: str | None


async def accept_inbound(
    store: Store, message_sid: str, person_id: int, payload: dict[str, Any]
) -> bool:
    """Store one message of a known person as the webhook does; False for a MessageSid
    already seen."""
    person = await store.person_by_id(person_id)
    assert person is not None
    [fresh] = await store.accept_inbound_batch([Arrival(person.e164, None, message_sid, payload)])
    return fresh


async def inbound_record(store: Store, message_sid: str) -> InboundRecord | None:
    rows = await store.rows(
        "SELECT message_sid, person_id, status, attempts, error FROM inbound_messages "
        "WHERE message_sid = ?",
        (message_sid,),
    )
    return InboundRecord(*rows[0]) if rows else None


async def inbound_status(store: Store, message_sid: str) -> str | None:
    record = await inbound_record(store, message_sid)
    return record.status if record else None


async def wait_settled(store: Store, message_sid: str, outcomes: tuple[str, ...] = SETTLED) -> str:
    """Wait until the worker has taken the message to one of `outcomes` ("done", "failed",
    "retry"), read from its row; bound it with asyncio.timeout."""
    while True:
        record = await inbound_record(store, message_sid)
        outcome = _outcome(record, outcomes) if record is not None else None
        if outcome is not None:
            return outcome
        await asyncio.sleep(POLL_S)


def _outcome(record: InboundRecord, wanted: tuple[str, ...]) -> str | None:
    if record.status in ("done", "failed") and record.status in wanted:
        return record.status
    # Requeued after a failed attempt (a deferral gives its attempt back, so it stays at 0);
    # a second attempt under way or over also means a retry came first.
    requeued = record.status == "pending" and record.error is not None and record.attempts >= 1
    if "retry" in wanted and (requeued or record.attempts >= 2):
        return "retry"
    return None


def sql_rows(gateway: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a running gateway's store, read beside it on a connection of the test's own
    (what an operator with `sqlite3` or `psql` would see)."""
    with connect(gateway) as db:
        return db.execute(sql, params).fetchall()


class _Pg:
    """A psycopg connection that takes the store's `?` placeholders, as sqlite3 does."""

    def __init__(self, url: str) -> None:
        import psycopg  # the sync driver (dev extra)

        self._conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql.replace("%", "%%").replace("?", "%s"), params)

    def close(self) -> None:
        self._conn.close()


def open_db(gateway_or_url: Any) -> Any:
    """A synchronous connection to a gateway's store (or a DATABASE_URL), SQLite or PostgreSQL;
    `execute(sql, params)` with `?` placeholders on both. The caller closes it."""
    settings = getattr(getattr(gateway_or_url, "runtime", None), "settings", None)
    url = settings.database_url if settings is not None else gateway_or_url
    if url.startswith(POSTGRES_SCHEMES):
        return _Pg(url)
    return sqlite3.connect(url.removeprefix("sqlite:///"))


@contextlib.contextmanager
def connect(gateway_or_url: Any) -> Iterator[Any]:
    db = open_db(gateway_or_url)
    try:
        yield db
    finally:
        db.close()


def table_names(db: Any) -> list[str]:
    """Every table of the store (either engine), but the engine's own."""
    if isinstance(db, sqlite3.Connection):
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    return sorted(row[0] for row in db.execute(sql).fetchall())
