"""What the dashboard shows, as one JSON-ready dict: health, live calls, latency, people,
leads.

Built fresh on every poll from the running gateway and the store. Phone numbers leave here
masked; everything else a caller said is passed as text, and the page only ever puts it in
the DOM as text.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from gateway.calls import REGISTRY, LiveCallView
from gateway.health import health_report
from gateway.phones import mask_number
from gateway.runtime import RUNTIME, Runtime
from gateway.stats import percentile
from gateway.store import LeadRow, Store, utcnow
from gateway.store.leads import OutboxCounts
from gateway.store.reports import (
    ConversationReport,
    LatencySamples,
    PersonReport,
    latency_samples,
    recent_people,
)

# Lower edges of the histogram's buckets (ms); the last bucket is open. Finer where calls
# land: VAD silence (~500 ms) plus the upstream's first audio (~300-700 ms).
HISTOGRAM_EDGES_MS = (0, 200, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1700, 2000, 3000)
PERCENTILES = (50, 95, 99)
LATEST_LEADS = 20


async def build(app: web.Application) -> dict[str, Any]:
    rt = app[RUNTIME]
    store = rt.store
    store_ok = store is not None and await store.ping()
    people: list[PersonReport] = []
    samples = LatencySamples([], [], [])
    lead_rows: list[LeadRow] = []
    outbox = OutboxCounts(0, 0, 0)
    instances: list[dict[str, Any]] = []
    if store_ok:
        assert store is not None
        people, samples = await _from_store(store)
        lead_rows, outbox = await store.leads(LATEST_LEADS), await store.crm_outbox_counts()
        instances = await store.live_instances()
    registry = app.get(REGISTRY)
    calls = registry.snapshot() if registry is not None else []
    return {
        "generated_at": utcnow(),
        "health": health_report(rt, store_ok),
        "instances": instances,
        "live_calls": [live_call(c) for c in calls],
        "latency": latency(samples),
        "people": [person(p) for p in people],
        "limits": limits(rt),
        "leads": leads(rt, lead_rows, outbox),
    }


def leads(rt: Runtime, rows: list[LeadRow], outbox: OutboxCounts) -> dict[str, Any]:
    """The latest leads (numbers masked) and the CRM outbox: still being tried, given up."""
    return {
        "crm": rt.settings.crm_webhook_url is not None,
        "pending": outbox.pending,
        "failed": outbox.failed,
        "latest": [
            {
                "id": r.id,
                "number": mask_number(r.phone),
                "name": r.name,
                "interest": r.interest,
                "city": r.city,
                "channel": r.channel,
                "updated_at": r.updated_at,
                "crm_status": r.crm_status,
            }
            for r in rows
        ],
    }


def limits(rt: Runtime) -> dict[str, Any]:
    """The owner's limits as set, and who tripped the budget (newest first, masked)."""
    s, state = rt.settings, rt.limits
    return {
        "whatsapp_burst": s.whatsapp_burst,
        "whatsapp_per_hour": s.whatsapp_per_hour,
        "daily_budget_usd": s.daily_budget_usd,
        "max_live_calls": s.max_live_calls,
        "max_parked_calls": s.max_parked_calls,
        "alerts": [
            {"at": a.at, "number": a.number, "spent_usd": a.spent_usd, "channel": a.channel}
            for a in reversed(state.alerts[-20:])
        ],
    }


async def _from_store(store: Store) -> tuple[list[PersonReport], LatencySamples]:
    return await recent_people(store), await latency_samples(store)


def live_call(call: LiveCallView) -> dict[str, Any]:
    return {
        "call_sid": call.call_sid,
        "number": mask_number(call.e164) if call.e164 is not None else None,
        "name": call.name,
        "duration_s": _round(call.duration_s),
        "turns": call.turns,
        "last_latency_ms": _round(call.last_latency_ms),
        "greeting_ms": _round(call.greeting_ms),
        "reconnects": call.reconnects,
    }


def person(report: PersonReport) -> dict[str, Any]:
    return {
        "number": mask_number(report.e164),
        "name": report.name,
        "last_activity_at": report.last_activity_at,
        "conversations": [conversation(c) for c in report.conversations],
    }


def conversation(report: ConversationReport) -> dict[str, Any]:
    return {
        "id": report.id,
        "channel": report.channel,
        "started_at": report.started_at,
        "ended_at": report.ended_at,
        "turns": [
            {"role": t.role, "text": t.text, "at": t.at, "latency_ms": _round(t.latency_ms)}
            for t in report.turns
        ],
    }


def latency(samples: LatencySamples) -> dict[str, Any]:
    return {
        "response": summary(samples.response_ms),
        "greeting": summary(samples.greeting_ms),
        "upstream": summary(samples.upstream_ms),
        "histogram": {
            "edges_ms": list(HISTOGRAM_EDGES_MS),
            "counts": histogram(samples.response_ms),
        },
    }


def summary(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    result: dict[str, Any] = {"count": len(ordered)}
    for q in PERCENTILES:
        result[f"p{q}"] = _round(percentile(ordered, q))
    return result


def histogram(values: Sequence[float], edges: Sequence[float] = HISTOGRAM_EDGES_MS) -> list[int]:
    """Counts per bucket [edges[i], edges[i+1]); the last bucket takes everything above."""
    counts = [0] * len(edges)
    for value in values:
        counts[max(0, bisect.bisect_right(edges, value) - 1)] += 1
    return counts


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
