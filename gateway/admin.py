"""Admin actions behind ADMIN_TOKEN: per-person usage and cost, the LGPD export and
erasure of everything the gateway keeps about one person, and the leads as CSV."""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import orjson
from aiohttp import web

from gateway import privacy
from gateway.auth import PRIVATE_HEADERS, admin_only
from gateway.phones import mask_number, normalize_number
from gateway.runtime import RUNTIME, Runtime
from gateway.store import LeadRow, Person
from gateway.usage import priced

log = logging.getLogger(__name__)


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/people/{number}/export", admin_only(export_person))
    app.router.add_get("/admin/people/{number}/usage", admin_only(person_usage))
    app.router.add_delete("/admin/people/{number}", admin_only(erase_person))
    app.router.add_get("/admin/privacy-requests", admin_only(privacy_requests))
    app.router.add_get("/admin/leads.csv", admin_only(leads_csv))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers=PRIVATE_HEADERS)  # fmt: skip


async def _person(request: web.Request) -> tuple[Runtime, Person | web.Response]:
    rt = request.app[RUNTIME]
    try:
        number = normalize_number(request.match_info["number"])
    except ValueError:
        return rt, _json({"error": "not a phone number"}, 400)
    person = await rt.store.person_by_number(number)
    if person is None:
        return rt, _json({"error": "no such person"}, 404)
    return rt, person


async def usage_report(rt: Runtime, person_id: int) -> dict[str, Any]:
    rows = await rt.store.usage_by_model(person_id)
    total = priced(rows, rt.prices, rt.settings.realtime_model)
    return {"by_model": rows, "total_cost_usd": total}


async def person_usage(request: web.Request) -> web.Response:
    rt, person = await _person(request)
    if isinstance(person, web.Response):
        return person
    return _json({"person": mask_number(person.e164), **await usage_report(rt, person.id)})


async def export_person(request: web.Request) -> web.Response:
    rt, person = await _person(request)
    if isinstance(person, web.Response):
        return person
    data = await rt.store.export_person(person.id)
    data["usage_report"] = [await usage_report(rt, person.id)]  # type: ignore[list-item]
    log.warning("admin exported the data of person %d", person.id)
    return _json(data)


async def erase_person(request: web.Request) -> web.Response:
    rt, person = await _person(request)
    if isinstance(person, web.Response):
        return person
    counts = await privacy.erase_person(rt.store, rt.holders, person)
    if not counts["people"]:  # an erasure running beside this one took them first
        return _json({"error": "no such person"}, 404)
    log.warning("admin erased person %d: %s", person.id, counts)
    return _json({"erased": counts})


async def privacy_requests(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rows = await rt.store.privacy_requests(open_only=request.query.get("all") != "1")
    return _json({"requests": rows})


LEAD_COLUMNS = ("id", "created_at", "updated_at", "phone", "channel", "name", "interest",
                "company", "city", "budget", "timeline", "notes", "crm_status")  # fmt: skip
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


async def leads_csv(request: web.Request) -> web.Response:
    """Every lead, newest first, as CSV (UTF-8) for a spreadsheet or a CRM import."""
    rows = await request.app[RUNTIME].store.leads()
    log.warning("admin downloaded the leads (%d)", len(rows))
    return web.Response(
        body=leads_as_csv(rows).encode("utf-8"),
        content_type="text/csv",
        charset="utf-8",
        headers={**PRIVATE_HEADERS, "Content-Disposition": 'attachment; filename="leads.csv"'},
    )


def leads_as_csv(rows: list[LeadRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(LEAD_COLUMNS)
    for row in rows:
        writer.writerow([_cell(getattr(row, column)) for column in LEAD_COLUMNS])
    return out.getvalue()


def _cell(value: object) -> str:
    """A value as a cell no spreadsheet will run: a leading formula character is quoted."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text
