"""What the tests read and write about the WhatsApp inbound queue, through the store's
public interface (`accept_inbound_batch`, the webhook's own path, and `Store.rows`).

The product never needs these: it accepts in batches and never asks after one message.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway.store import Store
from gateway.store.store import Arrival

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
    """Rows of a running gateway's SQLite file, read beside it on a connection of the test's
    own (what an operator with `sqlite3` would see)."""
    db = sqlite3.connect(gateway.runtime.settings.database_path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()
