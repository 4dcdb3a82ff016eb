"""SQL for the leads the clone takes (the save_lead tool) and for the outbox that carries each
save to the CRM webhook (gateway/crm.py sends it). Mixed into `Store`.

A lead belongs to a person and, when it was taken in one, to a conversation: within one
conversation every save updates the same row, so a caller who adds their city after their
budget still makes one lead. Each save, in the same transaction, puts the lead as it now
stands into `crm_outbox` (only while a CRM is configured: `leads_to_crm`), so a CRM that is
down loses nothing and the receiver gets one body per save, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from gateway.observability import LEADS_SAVED

if TYPE_CHECKING:
    from gateway.store.connection import Connection

INTERESTS = ("advertising", "digital_marketing", "ai", "real_estate", "agribusiness", "other")
CHANNELS = ("call", "whatsapp")
# A lead's CRM state, from its latest outbox row: no row (no CRM when it was saved), waiting
# for its first try, failed and waiting for a retry, taken by the CRM, or given up.
CRM_STATUSES = ("not_queued", "pending", "retrying", "delivered", "failed")


@dataclass(frozen=True)
class Lead:
    """What the clone heard; only name and interest are required."""

    name: str
    interest: str  # one of INTERESTS
    company: str | None = None
    city: str | None = None
    budget: str | None = None
    timeline: str | None = None
    notes: str | None = None


_OPTIONAL = ("company", "city", "budget", "timeline", "notes")


@dataclass(frozen=True)
class LeadRow:
    """A stored lead, with its person's number (full: mask it anywhere but the admin's CSV)
    and its CRM delivery state (one of CRM_STATUSES)."""

    id: int
    person_id: int
    phone: str
    conversation_id: int | None
    channel: str
    name: str
    interest: str
    company: str | None
    city: str | None
    budget: str | None
    timeline: str | None
    notes: str | None
    created_at: str
    updated_at: str
    crm_status: str


@dataclass(frozen=True)
class Delivery:
    """One outbox row due: the body exactly as it is signed and sent."""

    id: int
    lead_id: int
    body: bytes
    attempts: int  # tries before this one
    created_at: str


@dataclass(frozen=True)
class OutboxCounts:
    pending: int  # not delivered yet, still tried
    failed: int  # given up
    delivered: int


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds")


# An outbox row (alias o) still to be sent, and one not held back behind an earlier unsent
# row of its lead: a lead's saves reach the CRM in the order they were made.
# A delivery takes at most the CRM request's timeout; an instance that dies mid-delivery
# frees the row after this.
CRM_LEASE_S = 60.0
_PENDING = "o.delivered_at IS NULL AND o.next_attempt_at IS NOT NULL"
_FIRST_OF_ITS_LEAD = (
    "NOT EXISTS (SELECT 1 FROM crm_outbox e WHERE e.lead_id = o.lead_id "
    "AND e.delivered_at IS NULL AND e.next_attempt_at IS NOT NULL AND e.id < o.id)"
)
_CRM_STATUS = (
    "CASE WHEN o.id IS NULL THEN 'not_queued' WHEN o.delivered_at IS NOT NULL THEN 'delivered' "
    "WHEN o.next_attempt_at IS NULL THEN 'failed' WHEN o.attempts = 0 THEN 'pending' "
    "ELSE 'retrying' END"
)
_LEAD_ROWS = (
    f"SELECT l.*, p.e164 AS phone, {_CRM_STATUS} AS crm_status FROM leads l "
    "JOIN people p ON p.id = l.person_id LEFT JOIN crm_outbox o "
    "ON o.id = (SELECT MAX(x.id) FROM crm_outbox x WHERE x.lead_id = l.id)"
)


class LeadQueries:
    _db: Connection
    _skip_locked: Callable[[str], str]  # the store's
    # Set when CRM_WEBHOOK_URL is (gateway/app.py): each save is then queued for the CRM.
    # Without a CRM nothing is queued; the leads table and /admin/leads.csv are the record.
    leads_to_crm: bool = False

    async def save_lead(
        self, person_id: int, conversation_id: int | None, lead: Lead, *, channel: str
    ) -> int:
        """Keep a lead and queue it for the CRM, in one transaction; returns the lead's id.

        Within one conversation a second save updates the same row: the fields given
        overwrite, None (or blank) fields keep what was there. ValueError for an interest
        not in INTERESTS, an unknown channel or a blank name; `Erased` when the person (or
        the conversation) was erased meanwhile.
        """
        fields = _checked(lead, channel)
        now = _stamp(_now())
        async with self._db.transaction():
            lead_id = await self._upsert_lead(person_id, conversation_id, channel, fields, now)
            if self.leads_to_crm:
                row = (await self._lead_rows("WHERE l.id = ?", (lead_id,)))[0]
                await self._db.execute(
                    "INSERT INTO crm_outbox (lead_id, body, next_attempt_at, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (lead_id, crm_body(row).decode(), now, now),
                )
        LEADS_SAVED.labels(channel).inc()
        return lead_id

    async def _upsert_lead(
        self,
        person_id: int,
        conversation_id: int | None,
        channel: str,
        fields: dict[str, str | None],
        now: str,
    ) -> int:
        if conversation_id is not None:
            async with self._db.execute(
                "SELECT id FROM leads WHERE conversation_id = ?", (conversation_id,)
            ) as cur:
                found = await cur.fetchone()
            if found is not None:
                keep = ", ".join(f"{name} = COALESCE(?, {name})" for name in _OPTIONAL)
                await self._db.execute(
                    f"UPDATE leads SET name = ?, interest = ?, {keep}, updated_at = ? WHERE id = ?",
                    (*fields.values(), now, found[0]),
                )
                return int(found[0])
        return await self._db.insert(
            "INSERT INTO leads (person_id, conversation_id, channel, name, interest, "
            f"{', '.join(_OPTIONAL)}, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (person_id, conversation_id, channel, *fields.values(), now, now),
        )

    async def leads(self, limit: int | None = None) -> list[LeadRow]:
        """Every lead (or the latest `limit`), newest first, with its CRM state."""
        if limit is None:
            return await self._lead_rows("ORDER BY l.id DESC", ())
        return await self._lead_rows("ORDER BY l.id DESC LIMIT ?", (limit,))

    async def _lead_rows(self, tail: str, args: tuple[Any, ...]) -> list[LeadRow]:
        async with self._db.execute(f"{_LEAD_ROWS} {tail}", args) as cur:
            rows = await cur.fetchall()
        return [LeadRow(**{name: row[name] for name in _LEAD_ROW_FIELDS}) for row in rows]

    # the CRM outbox
    async def crm_due(self, limit: int = 20, lease_s: float = CRM_LEASE_S) -> list[Delivery]:
        """Claim outbox rows due now, oldest first; a row waits while an earlier one of its
        lead is unsent. Each is leased for `lease_s` (its retry time if this instance dies
        mid-delivery), so with several instances a delivery is made by one."""
        now = _now()
        async with self._db.execute(
            "UPDATE crm_outbox SET next_attempt_at = ? WHERE id IN (SELECT o.id FROM crm_outbox o "
            f"WHERE {_PENDING} AND o.next_attempt_at <= ? AND {_FIRST_OF_ITS_LEAD} "
            f"ORDER BY o.id LIMIT ?{self._skip_locked('o')}) "
            "RETURNING id, lead_id, body, attempts, created_at",
            (_stamp(now + timedelta(seconds=lease_s)), _stamp(now), limit),
        ) as cur:
            rows = sorted(await cur.fetchall(), key=lambda r: r[0])
        return [Delivery(r[0], r[1], r[2].encode(), r[3], r[4]) for r in rows]

    async def crm_release(self, delivery_ids: list[int]) -> None:
        """Claimed rows not tried after all (a stop): due again now, not after the lease."""
        if delivery_ids:
            marks = ", ".join("?" * len(delivery_ids))
            await self._db.execute(
                f"UPDATE crm_outbox SET next_attempt_at = ? WHERE id IN ({marks}) "
                "AND delivered_at IS NULL AND next_attempt_at IS NOT NULL",
                (_stamp(_now()), *delivery_ids),
            )

    async def crm_next_due(self) -> datetime | None:
        """When the earliest sendable outbox row falls due (None: nothing to send)."""
        async with self._db.execute(
            f"SELECT MIN(o.next_attempt_at) FROM crm_outbox o WHERE {_PENDING} "
            f"AND {_FIRST_OF_ITS_LEAD}"
        ) as cur:
            (due,) = await cur.fetchone()
        return datetime.fromisoformat(due) if due else None

    async def crm_delivered(self, delivery_id: int) -> None:
        await self._db.execute(
            "UPDATE crm_outbox SET attempts = attempts + 1, delivered_at = ?, "
            "next_attempt_at = NULL, last_error = NULL WHERE id = ?",
            (_stamp(_now()), delivery_id),
        )

    async def crm_failed(self, delivery_id: int, error: str, retry_in_s: float | None) -> None:
        """A try that the CRM did not take: again after `retry_in_s`, or never (None)."""
        due = None if retry_in_s is None else _stamp(_now() + timedelta(seconds=retry_in_s))
        await self._db.execute(
            "UPDATE crm_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
            "WHERE id = ?",
            (due, error, delivery_id),
        )

    async def crm_outbox_counts(self) -> OutboxCounts:
        async with self._db.execute(
            "SELECT COUNT(*) FILTER (WHERE o.delivered_at IS NULL "
            "AND o.next_attempt_at IS NOT NULL), COUNT(*) FILTER (WHERE o.delivered_at IS NULL "
            "AND o.next_attempt_at IS NULL), COUNT(*) FILTER (WHERE o.delivered_at IS NOT NULL) "
            "FROM crm_outbox o"
        ) as cur:
            pending, failed, delivered = await cur.fetchone()
        return OutboxCounts(pending, failed, delivered)


_LEAD_ROW_FIELDS = tuple(LeadRow.__dataclass_fields__)


def crm_body(row: LeadRow) -> bytes:
    """The JSON the CRM receives for one save: the lead as it stands after it."""
    return orjson.dumps(
        {
            "lead_id": row.id,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "phone": row.phone,
            "conversation_id": row.conversation_id,
            "channel": row.channel,
            "name": row.name,
            "interest": row.interest,
            **{name: getattr(row, name) for name in _OPTIONAL},
        }
    )


def _checked(lead: Lead, channel: str) -> dict[str, str | None]:
    """The lead's columns in table order, blanks as None; ValueError for what cannot be kept."""
    if lead.interest not in INTERESTS:
        raise ValueError(f"interest must be one of {', '.join(INTERESTS)}")
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
    name = (lead.name or "").strip()
    if not name:
        raise ValueError("a lead needs a name")
    optional = {field: (getattr(lead, field) or "").strip() or None for field in _OPTIONAL}
    return {"name": name, "interest": lead.interest, **optional}
