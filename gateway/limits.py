"""Per-person limits a clone that bills per minute needs: how often WhatsApp turns may run,
and how much one person may cost in a day.

- **Turns**: a token bucket per person (`WHATSAPP_BURST` turns at once, refilled at
  `WHATSAPP_PER_HOUR`). A message that finds the bucket empty waits in the queue until a turn
  is free; the person is told once per wait, and everything they sent meanwhile is answered
  in that one turn (see gateway.whatsapp). Buckets live in memory: a restart forgives.
- **Budget**: the person's spend since 00:00 UTC, from the usage table priced with
  `config/prices.toml`. Over `DAILY_BUDGET_USD`, no model runs for them until tomorrow: a
  polite fixed message instead, and an alert for the operator (dashboard and /metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.observability import OVER_BUDGET, PEOPLE_OVER_BUDGET
from gateway.phones import mask_number
from gateway.usage import priced

if TYPE_CHECKING:
    from gateway.runtime import Runtime
    from gateway.settings import Settings
    from gateway.store import Person

IDLE_BUCKETS_KEPT_S = 3600.0  # a full bucket carries no state worth keeping
ALERTS_KEPT = 200


@dataclass
class TokenBucket:
    capacity: float
    per_s: float
    tokens: float
    at: float

    def take(self, now: float) -> float:
        """0 if a turn may run now (one token taken), else the seconds until one can."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_s

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.at) * self.per_s >= self.capacity


@dataclass(frozen=True)
class Alert:
    at: str
    number: str  # masked
    spent_usd: float
    channel: str


@dataclass
class Limits:
    """The owner's limits, applied per person; what tripped them is kept for the dashboard."""

    burst: int
    per_hour: int
    daily_budget_usd: float
    clock: Callable[[], float] = time.monotonic
    buckets: dict[int, TokenBucket] = field(default_factory=dict)
    told: set[int] = field(default_factory=set)  # people told to wait, until their next turn
    alerts: list[Alert] = field(default_factory=list)
    over_today: dict[int, str] = field(default_factory=dict)  # person id -> UTC day

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.whatsapp_burst, s.whatsapp_per_hour, s.daily_budget_usd)

    def take_turn(self, person_id: int) -> float:
        """0: the turn may run; else how long its message should wait."""
        now = self.clock()
        bucket = self.buckets.get(person_id)
        if bucket is None:
            bucket = TokenBucket(self.burst, self.per_hour / 3600, self.burst, now)
            self.buckets[person_id] = bucket
            self._forget_idle(now)
        wait = bucket.take(now)
        if wait == 0:
            self.told.discard(person_id)
        return wait

    def first_wait(self, person_id: int) -> bool:
        """True once per wait: the person is told they will be answered a little later."""
        if person_id in self.told:
            return False
        self.told.add(person_id)
        return True

    def _forget_idle(self, now: float) -> None:
        if len(self.buckets) % 256 == 0:
            idle = [p for p, b in self.buckets.items() if b.full(now) and p not in self.told]
            for person_id in idle:
                del self.buckets[person_id]

    async def spent_today(self, rt: Runtime, person_id: int) -> float | None:
        """USD since 00:00 UTC; None if a model used has no price."""
        assert rt.store is not None
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        rows = await rt.store.usage_by_model(person_id, midnight.isoformat())
        return priced(rows, rt.prices, rt.settings.realtime_model)

    async def over_budget(self, rt: Runtime, person: Person, channel: str) -> bool:
        """True if this person's spend today reached the budget (alerted once a day)."""
        if self.daily_budget_usd <= 0:
            return False
        spent = await self.spent_today(rt, person.id)
        if spent is None or spent < self.daily_budget_usd:
            return False
        OVER_BUDGET.labels(channel).inc()
        today = datetime.now(UTC).date().isoformat()
        if self.over_today.get(person.id) != today:
            self.over_today[person.id] = today
            self._alert(Alert(_now(), mask_number(person.e164), round(spent, 4), channel))
        self._count_over(today)
        return True

    async def forget(self, person_id: int) -> None:
        """Erasure: nothing of the person stays here (alerts hold only a masked number)."""
        self.buckets.pop(person_id, None)
        self.told.discard(person_id)
        self.over_today.pop(person_id, None)

    def changed(self, person_id: int) -> None:
        """A memory holder in name only: limits keep no memory to bring up to date."""

    def _alert(self, alert: Alert) -> None:
        self.alerts.append(alert)
        del self.alerts[:-ALERTS_KEPT]

    def _count_over(self, today: str) -> None:
        PEOPLE_OVER_BUDGET.set(sum(day == today for day in self.over_today.values()))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
