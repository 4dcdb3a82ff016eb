"""Leads (the save_lead tool's store half), the admin's CSV and the dashboard, over loopback
with the gateway run as in the other tests."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import aiosqlite
import pytest

from gateway.dashboard import DATA_URL
from gateway.store import INTERESTS, Erased, Lead, Store
from gateway.store.connection import Connection
from gateway.store.migrations import available, migrate

ADMIN = "admin-token-for-leads"
ANA = "+5516999990001"
BRUNO = "+5517988880002"
EVIL_NAME = '<img src=x onerror="alert(3)">'


async def person_in_conversation(store: Store, number: str, channel: str = "call"):
    person = await store.person_for(number)
    return person, await store.start_conversation(person.id, channel)


async def admin_get(gateway, path: str, token: str | None = ADMIN) -> tuple[int, bytes, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(gateway.url + path, headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


# ---- the store ------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[Store]:
    s = await Store.open(f"sqlite:///{tmp_path}/leads.db")
    yield s
    await s.close()


async def test_a_second_save_in_a_conversation_updates_the_lead_and_keeps_what_it_omits(store):
    person, conversation = await person_in_conversation(store, ANA)
    first = await store.save_lead(
        person.id,
        conversation,
        Lead("Ana", "real_estate", company="Imobiliária Sol", budget="R$ 5 mil/mês"),
        channel="call",
    )
    await asyncio.sleep(0.002)  # timestamps have millisecond resolution
    again = await store.save_lead(
        person.id, conversation, Lead("Ana Paula", "real_estate", city="Ribeirão Preto",
                                      budget=""), channel="call"
    )  # fmt: skip
    assert again == first
    [row] = await store.leads()
    assert (row.name, row.company, row.city, row.budget) == (
        "Ana Paula", "Imobiliária Sol", "Ribeirão Preto", "R$ 5 mil/mês"
    )  # fmt: skip
    assert (row.phone, row.conversation_id, row.channel) == (ANA, conversation, "call")
    assert row.updated_at > row.created_at and row.crm_status == "not_queued"
    # Another conversation, or none, is another lead; newest first.
    _, other = await person_in_conversation(store, BRUNO, "whatsapp")
    bruno = await store.person_by_number(BRUNO)
    await store.save_lead(bruno.id, other, Lead("Bruno", "agribusiness"), channel="whatsapp")
    await store.save_lead(bruno.id, None, Lead("Bruno", "ai"), channel="whatsapp")
    await store.save_lead(bruno.id, None, Lead("Bruno", "ai"), channel="whatsapp")
    assert [r.interest for r in await store.leads()] == ["ai", "ai", "agribusiness", "real_estate"]
    assert [r.name for r in await store.leads(limit=1)] == ["Bruno"]
    # Without a CRM nothing is queued.
    assert await store.rows("SELECT id FROM crm_outbox") == []


async def test_a_lead_is_refused_for_a_bad_interest_and_for_an_erased_person(store):
    person, conversation = await person_in_conversation(store, ANA)
    for bad in ("imóveis", "", "REAL_ESTATE"):
        with pytest.raises(ValueError, match="interest"):
            await store.save_lead(person.id, conversation, Lead("Ana", bad), channel="call")
    with pytest.raises(ValueError, match="channel"):
        await store.save_lead(person.id, conversation, Lead("Ana", "ai"), channel="sms")
    with pytest.raises(ValueError, match="name"):
        await store.save_lead(person.id, conversation, Lead("  ", "ai"), channel="call")
    await store.erase_person(person.id)
    for where in (conversation, None):
        with pytest.raises(Erased):
            await store.save_lead(person.id, where, Lead("Ana", "ai"), channel="call")
    assert await store.leads() == []
    assert set(INTERESTS) >= {"advertising", "digital_marketing", "ai", "real_estate"}


async def test_the_leads_migration_keeps_existing_data(tmp_path):
    raw = await aiosqlite.connect(tmp_path / "g.db", isolation_level=None)
    db = Connection(raw)
    await migrate(db, [m for m in available() if m[0] <= 7])  # before leads
    await db.executescript(
        "INSERT INTO people (id, e164, name, first_seen, last_seen) VALUES "
        "(4, '+5516999990004', 'Carla', 't', 't');"
        "INSERT INTO conversations (id, person_id, channel, started_at, last_activity_at) "
        "VALUES (8, 4, 'whatsapp', 't', 't');"
        "INSERT INTO turns (id, conversation_id, role, text, at) VALUES (21, 8, 'user', 'oi', 't');"
    )
    await db.close()
    store = await Store.open(f"sqlite:///{tmp_path}/g.db")
    try:
        assert store.schema_version == max(v for v, _, _ in available()) >= 8
        carla = await store.person_by_number("+5516999990004")
        assert carla.name == "Carla" and [t.text for t in await store.recent_turns(4)] == ["oi"]
        lead = await store.save_lead(4, 8, Lead("Carla", "advertising"), channel="whatsapp")
        [row] = await store.leads()
        assert (row.id, row.person_id, row.conversation_id) == (lead, 4, 8)
    finally:
        await store.close()


# ---- the admin: CSV, export, erasure, dashboard --------------------------------------------


async def test_the_csv_lists_every_lead_for_the_admin_only_and_runs_no_formula(
    start_gateway, live_env
):
    gateway = await start_gateway({**live_env, "ADMIN_TOKEN": ADMIN})
    store = gateway.runtime.store
    person, conversation = await person_in_conversation(store, ANA)
    notes = 'disse "talvez", depois:\nsim, com certeza'
    await store.save_lead(
        person.id,
        conversation,
        Lead("=HYPERLINK(\"http://x\")", "digital_marketing", company="@empresa", city="São Paulo",
             budget="-5000", timeline="+2 meses", notes=notes),
        channel="call",
    )  # fmt: skip
    assert (await admin_get(gateway, "/admin/leads.csv", None))[0] == 401
    assert (await admin_get(gateway, "/admin/leads.csv", "wrong"))[0] == 403
    status, body, headers = await admin_get(gateway, "/admin/leads.csv")
    assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["Cache-Control"] == "no-store"
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
    assert rows[0] == ["id", "created_at", "updated_at", "phone", "channel", "name", "interest",
                       "company", "city", "budget", "timeline", "notes", "crm_status"]  # fmt: skip
    [lead] = rows[1:]
    assert lead[3:] == [
        "'" + ANA, "call", "'=HYPERLINK(\"http://x\")", "digital_marketing", "'@empresa",
        "São Paulo", "'-5000", "'+2 meses", notes, "not_queued",
    ]  # fmt: skip


async def test_the_dashboard_shows_the_lead_masked_and_as_text(start_gateway, live_env):
    gateway = await start_gateway({**live_env, "ADMIN_TOKEN": ADMIN})
    person, conversation = await person_in_conversation(gateway.runtime.store, ANA)
    await gateway.runtime.store.save_lead(
        person.id, conversation, Lead(EVIL_NAME, "ai", city="<b>Franca</b>"), channel="call"
    )
    status, body, _ = await admin_get(gateway, DATA_URL)
    leads = json.loads(body)["leads"]
    assert status == 200 and ANA not in body.decode()
    assert (leads["crm"], leads["pending"], leads["failed"]) == (False, 0, 0)
    [shown] = leads["latest"]
    assert (shown["name"], shown["city"]) == (EVIL_NAME, "<b>Franca</b>")
    assert shown["number"] == "+55…0001"
    assert (shown["interest"], shown["crm_status"]) == ("ai", "not_queued")
    status, page, _ = await admin_get(gateway, "/")
    html = page.decode()
    assert status == 200 and EVIL_NAME not in html and "<b>Franca" not in html
    assert "alert(3)" in html and len(re.findall(r"<script", html)) == 2
    assert '<section id="leads"' in html
