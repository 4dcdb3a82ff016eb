"""Per-person limits (issue 12), end to end over loopback: a burst of WhatsApp messages is
answered within the turn limit with nothing lost and the person told once; a person over
the daily budget gets a polite message instead of the model, and the operator sees it on
the dashboard, in /metrics and in Chromium."""

from __future__ import annotations

import asyncio
import re
import shutil
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest

from gateway.limits import TokenBucket
from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.store_helpers import open_db
from tests.test_dashboard import CHROMIUM, chromium
from tests.test_whatsapp import only_reading_sessions

ANA = "+5516999990001"
ADMIN = "limits-admin-token"
WAIT_S = 20.0  # a bound against hangs, not a speed claim


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=20, speed=20.0, ms_per_char=10,
                             reply_text="Combinado, vamos lá!")  # fmt: skip


ANY_INSTANCE = 'instance_id="[^"]+"'  # on every sample, labels sorted by name


def db_of(gateway) -> Any:
    return open_db(gateway)


async def send_burst(gateway, texts: list[str], spread_s: float = 0.0) -> None:
    """Signed webhooks from one person, all at once or spread evenly over `spread_s`."""
    async with WhatsAppSender(
        gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=ANA, profile_name="Ana"
    ) as sender:
        if not spread_s:
            results = await asyncio.gather(*(sender.send_text(t) for t in texts))
        else:
            results = []
            for text in texts:
                results.append(await sender.send_text(text))
                await asyncio.sleep(spread_s / len(texts))
    assert [r.status for r in results] == [200] * len(texts)


async def all_settled(gateway, n: int) -> None:
    db = db_of(gateway)
    async with asyncio.timeout(WAIT_S):
        while True:
            (done,) = db.execute(
                "SELECT COUNT(*) FROM inbound_messages WHERE status IN ('done', 'failed')"
            ).fetchone()
            if done == n:
                return
            await asyncio.sleep(0.05)


def texts_to(twilio_sim) -> list[str]:
    return [m.body for m in twilio_sim.messages if m.to == f"whatsapp:{ANA}" and m.body]


def test_the_bucket_gives_a_burst_then_one_turn_per_interval():
    bucket = TokenBucket(capacity=2, per_s=0.5, tokens=2, at=0.0)
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(2.0)  # one token every 2 s
    assert bucket.take(1.0) == pytest.approx(1.0)
    assert bucket.take(2.0) == 0.0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(1.0)  # capped at 2


async def test_a_burst_of_60_messages_is_answered_within_the_limit_nothing_lost(
    start_gateway, live_env, twilio_sim
):
    env = {**live_env, "WHATSAPP_BURST": "1", "WHATSAPP_PER_HOUR": "720"}
    gateway = await start_gateway(env)
    texts = [f"mensagem número {n:02d} sobre o anúncio" for n in range(1, 61)]
    await send_burst(gateway, texts, spread_s=2.6)  # as the abuse was seen: 60 in 2.6 s
    await all_settled(gateway, 60)
    db = db_of(gateway)
    replies = db.execute("SELECT COUNT(*) FROM whatsapp_replies WHERE kind = 'model'").fetchone()
    said = "\n".join(t for (t,) in db.execute("SELECT text FROM turns WHERE role = 'user'"))
    # Nothing lost: every message reached the model, in few turns (60 answered one by one
    # before: 120 sends and 60 paid turns).
    assert [t for t in texts if t not in said] == []
    assert 1 <= replies[0] <= 4, replies
    assert (
        db.execute("SELECT COUNT(*) FROM inbound_messages WHERE status != 'done'").fetchone()[0]
        == 0
    )
    merged = db.execute(
        "SELECT COUNT(*) FROM inbound_messages WHERE merged_into IS NOT NULL"
    ).fetchone()[0]
    assert merged == 60 - replies[0]
    # Told once, politely, that the rest will be answered together.
    notice = gateway.runtime.persona.messages["rate_limited"]
    await twilio_sim.wait_for_messages(2 * replies[0] + 1, timeout=WAIT_S)
    assert texts_to(twilio_sim).count(notice) == 1
    assert len(twilio_sim.messages) == 2 * replies[0] + 1  # each reply: text and voice note


async def admin_json(gateway, path: str) -> dict:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with http.get(gateway.url + path, headers=headers) as response:
            assert response.status == 200
            return await response.json()


async def metrics(gateway) -> str:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/metrics") as response:
        return await response.text()


async def over_budget_gateway(start_gateway, live_env, twilio_sim, realtime_sim):
    env = {**live_env, "ADMIN_TOKEN": ADMIN, "DAILY_BUDGET_USD": "0.000001"}
    gateway = await start_gateway(env)
    await send_burst(gateway, ["Oi, quero anunciar minha fazenda"])
    await twilio_sim.wait_for_messages(2, timeout=WAIT_S)  # the first turn is within budget
    conversations = realtime_sim.sessions[:]
    await send_burst(gateway, ["E quanto custa?"])
    await twilio_sim.wait_for_messages(4, timeout=WAIT_S)  # the polite text and its voice
    await all_settled(gateway, 2)
    # No model turn ran for the second: a new session, if any, only read the fixed message.
    later = [s for s in realtime_sim.sessions if s not in conversations]
    assert only_reading_sessions(later, gateway.runtime.persona)
    return gateway


async def test_over_the_daily_budget_a_polite_message_and_an_operator_alert(
    start_gateway, live_env, twilio_sim, realtime_sim
):
    gateway = await over_budget_gateway(start_gateway, live_env, twilio_sim, realtime_sim)
    polite = gateway.runtime.persona.messages["over_budget"]
    assert texts_to(twilio_sim)[-1] == polite
    assert len(twilio_sim.messages) == 4  # the polite text and its voice note, like any reply
    limits = (await admin_json(gateway, "/dashboard/data.json"))["limits"]
    assert limits["daily_budget_usd"] == 0.000001 and limits["whatsapp_burst"] == 5
    [alert] = limits["alerts"]
    assert alert["channel"] == "whatsapp" and alert["number"] != ANA and alert["spent_usd"] > 0
    text = await metrics(gateway)
    assert re.search(rf'^gateway_over_budget_total\{{channel="whatsapp",{ANY_INSTANCE}\}} [1-9]',
                     text, re.M)  # fmt: skip
    assert re.search(rf"^gateway_people_over_budget\{{{ANY_INSTANCE}\}} [1-9]", text, re.M)


async def test_over_the_daily_budget_a_call_hears_a_polite_say_and_opens_nothing(
    start_gateway, live_env, twilio_sim, realtime_sim
):
    gateway = await over_budget_gateway(start_gateway, live_env, twilio_sim, realtime_sim)
    sessions_before = len(realtime_sim.sessions)
    async with SimulatedCaller(
        gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=ANA
    ) as caller:
        dial = await caller.dial()
    assert dial.status == 200 and dial.stream_url is None
    said = ElementTree.fromstring(dial.body).find("./Say")
    assert said is not None and said.text == gateway.runtime.persona.messages["over_budget_say"]
    assert len(realtime_sim.sessions) == sessions_before
    calls = db_of(gateway).execute("SELECT COUNT(*) FROM conversations WHERE channel = 'call'")
    assert calls.fetchone()[0] == 0
    text = await metrics(gateway)
    assert re.search(rf'^gateway_over_budget_total\{{channel="call",{ANY_INSTANCE}\}} [1-9]',
                     text, re.M)  # fmt: skip


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"{CHROMIUM} missing")
async def test_the_limits_and_the_alert_are_on_the_dashboard_in_chromium(
    start_gateway, live_env, twilio_sim, realtime_sim, tmp_path
):
    gateway = await over_budget_gateway(start_gateway, live_env, twilio_sim, realtime_sim)
    dom = await chromium(
        "--virtual-time-budget=3000",
        "--dump-dom",
        f"{gateway.url}/?token={ADMIN}",
        user_data=tmp_path / "chromium",
    )
    visible = re.sub(r"\s+", " ", re.sub(r"<script\b.*?</script>", "", dom, flags=re.S))
    assert "WhatsApp: 5 respostas de uma vez, 40 por hora por pessoa" in visible
    assert "chamadas ao vivo no máximo: 100" in visible
    assert '<p class="alert">Orçamento diário atingido:</p>' in visible
    assert '<td>+55…0001</td><td>WhatsApp</td><td class="num">US$ ' in visible
    assert ANA not in visible
