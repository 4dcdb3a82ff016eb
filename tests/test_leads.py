"""Leads (the save_lead tool's store half) and the CRM webhook outbox, over loopback: a real
receiver on 127.0.0.1 checks every signature; the gateway runs as in the other tests."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import aiosqlite
import pytest
from aiohttp import web

from gateway.dashboard import DATA_URL
from gateway.store import INTERESTS, Erased, Lead, Store
from gateway.store.connection import Connection
from gateway.store.migrations import available, migrate
from tests.conftest import free_port
from tests.store_helpers import sql_rows
from tests.test_call_faults import eventually

pytestmark = pytest.mark.both_stores

ADMIN = "admin-token-for-leads"
SECRET = "crm-secret-for-tests"
ANA = "+5516999990001"
BRUNO = "+5517988880002"
WAIT_S = 10.0  # a bound against hangs, not a speed claim
EVIL_NAME = '<img src=x onerror="alert(3)">'


@dataclass
class Received:
    delivery: int
    timestamp: int
    body: dict


class Receiver:
    """A CRM webhook on 127.0.0.1 that checks each signature with hmac.compare_digest.

    `answer` is what it says to a correctly signed body (200 records a delivery); while
    `released` is clear, requests wait for it (then are refused). Every try is in `tries`.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/leads"
        self.answer = 200
        self.released = asyncio.Event()
        self.released.set()
        self.tries: list[int] = []  # delivery ids, in arrival order
        self.bad_signatures = 0
        self.received: list[Received] = []
        self._runner: web.AppRunner | None = None
        self._news = asyncio.Event()

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks/leads", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        presented = request.headers.get("X-Almada-Signature", "")
        delivery = int(request.headers["X-Almada-Delivery"])
        self.tries.append(delivery)
        self._news.set()
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            self.bad_signatures += 1
            return web.Response(status=401)
        assert request.content_type == "application/json"
        if not self.released.is_set():  # answered, once released, as a failing CRM would
            await self.released.wait()
            return web.Response(status=503)
        if self.answer == 200:
            stamp = int(request.headers["X-Almada-Timestamp"])
            self.received.append(Received(delivery, stamp, json.loads(raw)))
            self._news.set()
        return web.Response(status=self.answer)

    async def wait(self, predicate) -> None:
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                self._news.clear()
                await self._news.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    crm = await Receiver().start()
    yield crm
    await crm.stop()


def crm_env(live_env: dict[str, str], receiver: Receiver, retry_s: float = 0.05) -> dict:
    return {
        **live_env,
        "ADMIN_TOKEN": ADMIN,
        "CRM_WEBHOOK_URL": receiver.url,
        "CRM_WEBHOOK_SECRET": SECRET,
        "CRM_RETRY_S": str(retry_s),
    }


async def person_in_conversation(store: Store, number: str, channel: str = "call"):
    person = await store.person_for(number)
    return person, await store.start_conversation(person.id, channel)


def outbox(gateway) -> list[tuple]:
    return sql_rows(
        gateway,
        "SELECT id, lead_id, attempts, delivered_at IS NOT NULL, last_error FROM crm_outbox "
        "ORDER BY id",
    )


def assert_logs_safe(caplog: pytest.LogCaptureFixture, *private: str) -> None:
    """The gateway's own log lines (at DEBUG) name ids, never a number, secret or body."""
    logged = caplog.text
    assert "crm: lead" in logged  # the worker did log
    for text in (SECRET, *private, *(p[1:] for p in private if p.startswith("+"))):
        assert text not in logged, f"{text!r} is in the log"


async def admin_get(gateway, path: str, token: str | None = ADMIN) -> tuple[int, bytes, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(gateway.url + path, headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


# ---- the store ------------------------------------------------------------------------------


@pytest.fixture
async def store(database_url) -> AsyncIterator[Store]:
    s = await Store.open(database_url)
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


# ---- the CRM webhook -------------------------------------------------------------------------


async def test_a_lead_reaches_the_crm_signed_and_an_update_goes_again_in_order(
    start_gateway, live_env, receiver, caplog
):
    caplog.set_level(logging.DEBUG, logger="gateway")
    gateway = await start_gateway(crm_env(live_env, receiver))
    store, crm = gateway.runtime.store, gateway.runtime.crm
    person, conversation = await person_in_conversation(store, ANA)
    before = time.time()
    lead = Lead("Ana", "real_estate", company="Imobiliária Sol", notes="quer lançar em março")
    lead_id = await store.save_lead(person.id, conversation, lead, channel="call")
    crm.wake()
    await receiver.wait(lambda: len(receiver.received) == 1)
    first = receiver.received[0]
    assert first.body == {
        "lead_id": lead_id,
        "created_at": first.body["created_at"],
        "updated_at": first.body["created_at"],
        "phone": ANA,
        "conversation_id": conversation,
        "channel": "call",
        "name": "Ana",
        "interest": "real_estate",
        "company": "Imobiliária Sol",
        "city": None,
        "budget": None,
        "timeline": None,
        "notes": "quer lançar em março",
    }
    assert before - 1 <= first.timestamp <= time.time() + 1
    again = await store.save_lead(
        person.id, conversation, Lead("Ana", "real_estate", city="Franca"), channel="call"
    )
    crm.wake()
    await receiver.wait(lambda: len(receiver.received) == 2)
    second = receiver.received[1]
    assert again == lead_id and second.delivery > first.delivery
    assert second.body["city"] == "Franca" and second.body["company"] == "Imobiliária Sol"
    assert second.body["updated_at"] > first.body["updated_at"]
    assert receiver.bad_signatures == 0 and receiver.tries == [first.delivery, second.delivery]
    await eventually(lambda: all(row[3] for row in outbox(gateway)))  # the 200 recorded
    [row] = await store.leads()
    assert row.crm_status == "delivered"
    _, body, _ = await admin_get(gateway, "/metrics", None)
    metrics = body.decode()
    assert re.search(
        r'gateway_leads_saved_total\{channel="call",instance_id="[^"]+"\} [1-9]', metrics
    )
    assert re.search(
        r'gateway_crm_deliveries_total\{instance_id="[^"]+",outcome="delivered"\} [1-9]', metrics
    )
    assert re.search(r'gateway_crm_outbox_pending\{instance_id="[^"]+"\} 0.0', metrics)
    assert_logs_safe(caplog, ANA, "Imobiliária Sol", "quer lançar", receiver.url)


async def test_a_crm_down_then_back_gets_the_lead_exactly_once(start_gateway, live_env, caplog):
    caplog.set_level(logging.DEBUG, logger="gateway")
    receiver = Receiver()  # not listening yet: connection refused
    gateway = await start_gateway(crm_env(live_env, receiver, retry_s=0.02))
    store = gateway.runtime.store
    person, conversation = await person_in_conversation(store, BRUNO, "whatsapp")
    await store.save_lead(person.id, conversation, Lead("Bruno", "agribusiness"),
                          channel="whatsapp")  # fmt: skip
    gateway.runtime.crm.wake()
    await eventually(lambda: outbox(gateway)[0][2] >= 2, WAIT_S)  # two refused connections
    [(_, _, _, delivered, error)] = outbox(gateway)
    assert not delivered and error == "ClientConnectorError"
    [row] = await store.leads()
    assert row.crm_status == "retrying"
    receiver.answer = 503  # up, but failing for a while
    await receiver.start()
    try:
        await receiver.wait(lambda: len(receiver.tries) >= 2)
        receiver.answer = 200
        await receiver.wait(lambda: receiver.received)
        await eventually(lambda: outbox(gateway)[0][3])
        await asyncio.sleep(0.5)  # several retry periods: nothing more arrives
        [(delivery, _, attempts, delivered, error)] = outbox(gateway)
        assert delivered and error is None and attempts >= len(receiver.tries) + 2
        assert [r.delivery for r in receiver.received] == [delivery]  # exactly once
        assert set(receiver.tries) == {delivery}  # every retry with the same idempotency key
        assert "not taken (HTTP 503); retry in" in caplog.text
        assert_logs_safe(caplog, BRUNO, receiver.url)
    finally:
        await receiver.stop()


async def test_a_stop_mid_delivery_is_prompt_and_the_restart_delivers_it(
    start_gateway, live_env, receiver
):
    receiver.released.clear()  # the CRM takes the request and does not answer
    env = crm_env(live_env, receiver, retry_s=30.0)
    first = await start_gateway(env)
    person, conversation = await person_in_conversation(first.runtime.store, ANA)
    lead_id = await first.runtime.store.save_lead(
        person.id, conversation, Lead("Ana", "ai"), channel="call"
    )
    first.runtime.crm.wake()
    await receiver.wait(lambda: receiver.tries)
    started = time.monotonic()
    await first.stop()  # as on SIGTERM: the delivery in flight is cut off
    assert time.monotonic() - started < 3.0
    [(delivery, _, attempts, delivered, _)] = outbox(first)
    assert (attempts, delivered) == (0, False)  # not recorded as tried: sent again at start
    receiver.released.set()
    second = await start_gateway(env)  # same database
    await receiver.wait(lambda: receiver.received)
    assert [(r.delivery, r.body["lead_id"]) for r in receiver.received] == [(delivery, lead_id)]
    await eventually(lambda: outbox(second)[0][3])


async def test_a_410_gives_up_at_once_and_the_dashboard_counts_it(
    start_gateway, live_env, receiver
):
    receiver.answer = 410
    gateway = await start_gateway(crm_env(live_env, receiver))
    person, conversation = await person_in_conversation(gateway.runtime.store, ANA)
    await gateway.runtime.store.save_lead(person.id, conversation, Lead("Ana", "other"),
                                          channel="call")  # fmt: skip
    gateway.runtime.crm.wake()
    await eventually(lambda: outbox(gateway)[0][4] == "HTTP 410")
    await asyncio.sleep(0.3)  # several retry periods
    assert len(receiver.tries) == 1
    _, body, _ = await admin_get(gateway, DATA_URL)
    leads = json.loads(body)["leads"]
    assert (leads["crm"], leads["pending"], leads["failed"]) == (True, 0, 1)
    assert leads["latest"][0]["crm_status"] == "failed"


# ---- the admin: CSV, export, erasure, dashboard --------------------------------------------


async def test_the_csv_lists_every_lead_for_the_admin_only_and_runs_no_formula(
    start_gateway, live_env
):
    gateway = await start_gateway({**live_env, "ADMIN_TOKEN": ADMIN})
    assert gateway.runtime.crm is None  # no CRM_WEBHOOK_URL: no worker, nothing queued
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


async def test_erasure_removes_leads_and_outbox_and_the_export_has_them(
    start_gateway, live_env, receiver
):
    receiver.answer = 503  # the rows stay queued
    gateway = await start_gateway(crm_env(live_env, receiver, retry_s=30.0))
    store = gateway.runtime.store
    for number, name in ((ANA, "Ana"), (BRUNO, "Bruno")):
        person, conversation = await person_in_conversation(store, number)
        await store.save_lead(person.id, conversation, Lead(name, "ai", city="Franca"),
                              channel="call")  # fmt: skip
    status, body, _ = await admin_get(gateway, f"/admin/people/{ANA}/export")
    export = json.loads(body)
    assert status == 200 and [lead["name"] for lead in export["leads"]] == ["Ana"]
    [queued] = export["crm_outbox"]
    assert queued["body"]["phone"] == ANA and queued["body"]["city"] == "Franca"
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.delete(f"{gateway.url}/admin/people/{ANA}", headers=bearer) as response,
    ):
        erased = (await response.json())["erased"]
    assert (erased["leads"], erased["crm_outbox"]) == (1, 1)
    assert [lead.name for lead in await store.leads()] == ["Bruno"]
    [(_, lead_id, *_)] = outbox(gateway)
    assert lead_id == (await store.leads())[0].id
    bodies = " ".join(r[0] for r in sql_rows(gateway, "SELECT body FROM crm_outbox"))
    assert ANA not in bodies and BRUNO in bodies


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
