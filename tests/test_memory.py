"""One memory per person across calls and WhatsApp, summaries, usage and LGPD, end to end
over loopback with the Twilio and Realtime (+ Responses) simulators."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.store_helpers import connect, open_db

pytestmark = pytest.mark.both_stores

ANA = "+5516999990001"
BRUNO = "+5517988880002"
ADMIN = "adm-test-token"
CALL_FACT = "tenho uma fazenda de café em Barretos"
WA_FACT = "Tenho uma imobiliária em Ribeirão Preto e quero vender mais lançamentos"
WAIT_S = 10.0  # a bound against hangs, not a speed claim


def caller_saying(transcript: str) -> RealtimeSimConfig:
    """A quick simulated model that hears the caller say `transcript`."""
    return RealtimeSimConfig(
        first_audio_latency_ms=30,
        speed=20.0,
        ms_per_char=20,
        reply_text="Que bom falar com você!",
        input_transcript=transcript,
    )


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return caller_saying(f"Oi, aqui é o Bruno, {CALL_FACT}.")


@pytest.fixture
async def gateway(start_gateway, live_env):
    env = {
        **live_env,
        "ADMIN_TOKEN": ADMIN,
        "SUMMARY_INTERVAL_S": "0.1",
        "SUMMARY_RETRY_S": "0.2",
    }
    return await start_gateway(env)


def instructions_of(session) -> str:
    updates = [t.event for t in session.received if t.event["type"] == "session.update"]
    return updates[0]["session"]["instructions"]


def session_with_format(realtime_sim, fmt: str):
    for session in realtime_sim.sessions:
        updates = [t.event for t in session.received if t.event["type"] == "session.update"]
        if updates and updates[0]["session"]["audio"]["input"]["format"]["type"] == fmt:
            return session
    return None


async def whatsapp_text(gateway, twilio_sim, number: str, text: str, name: str) -> None:
    before = len(twilio_sim.messages)
    async with WhatsAppSender(
        gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=number, profile_name=name
    ) as sender:
        result = await sender.send_text(text)
    assert result.status == 200
    await twilio_sim.wait_for_messages(before + 2, timeout=WAIT_S, settled=True)


async def phone_call(gateway, number: str, *, speak: bool = True) -> None:
    async with SimulatedCaller(
        gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=number
    ) as caller:
        assert (await caller.dial()).status == 200
        await caller.connect()
        await caller.wait_playback_idle(quiet_s=0.3, timeout=WAIT_S)
        if speak:
            await caller.speak_and_wait(speech_mulaw(900, seed=1), reply_timeout=WAIT_S)
            await caller.wait_playback_idle(quiet_s=0.3, timeout=WAIT_S)
        await caller.hangup()


async def wait_until(predicate) -> None:
    async with asyncio.timeout(WAIT_S):
        while not await predicate():  # noqa: ASYNC110 - the store has no change event to await
            await asyncio.sleep(0.05)


async def admin(gateway, method: str, path: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{gateway.url}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_fact_from_whatsapp_reaches_the_next_call(gateway, realtime_sim, twilio_sim):
    await whatsapp_text(gateway, twilio_sim, ANA, WA_FACT, name="Ana Paula")
    await phone_call(gateway, ANA, speak=False)
    call = session_with_format(realtime_sim, "audio/pcmu")
    text = instructions_of(call)
    assert WA_FACT in text and "Ana Paula" in text
    greeting = next(t.event for t in call.received if t.event["type"] == "response.create")
    assert "Ana Paula" in greeting["response"]["instructions"]  # greeted by name


async def test_a_fact_said_on_a_call_reaches_whatsapp_and_the_summary(
    gateway, realtime_sim, twilio_sim
):
    await phone_call(gateway, BRUNO)
    store = gateway.runtime.store
    person = await store.person_by_number(BRUNO)

    async def summarized() -> bool:
        fresh = await store.person_by_id(person.id)
        return bool(fresh.summary and CALL_FACT in fresh.summary)

    await wait_until(summarized)  # the hang-up folded the call into the rolling summary
    await whatsapp_text(gateway, twilio_sim, BRUNO, "E aí, lembra de mim?", name="Bruno")
    chat = session_with_format(realtime_sim, "audio/pcm")
    text = instructions_of(chat)
    assert CALL_FACT in text
    assert gateway.runtime.persona.prompt["summary_heading"] in text
    [request] = [r for r in realtime_sim.responses.requests if r.status == 200]
    assert request.body["instructions"] == gateway.runtime.persona.summarizer


async def test_a_failed_summary_loses_nothing_and_is_retried(gateway, realtime_sim):
    realtime_sim.responses.fail_next(1, status=500)
    await phone_call(gateway, BRUNO)
    store = gateway.runtime.store
    person = await store.person_by_number(BRUNO)

    def summary_state() -> tuple[int, str | None]:
        with connect(gateway) as db:
            sql = "SELECT summary_attempts, summarized_at FROM conversations WHERE person_id = ?"
            return db.execute(sql, (person.id,)).fetchone()

    async def retried_and_written() -> bool:  # the summary is written after its answer
        return len(realtime_sim.responses.requests) >= 2 and summary_state()[1] is not None

    await wait_until(retried_and_written)
    assert [r.status for r in realtime_sim.responses.requests[:2]] == [500, 200]
    attempts, _ = summary_state()
    assert attempts == 1
    assert CALL_FACT in (await store.person_by_id(person.id)).summary
    turns = await store.recent_turns(person.id)
    assert any(CALL_FACT in t.text for t in turns)  # the turns were there all along


async def test_erase_removes_every_row_and_file_of_one_person_only(
    gateway, realtime_sim, twilio_sim
):
    for number, name in ((ANA, "Ana"), (BRUNO, "Bruno")):
        await whatsapp_text(gateway, twilio_sim, number, WA_FACT, name=name)
        await phone_call(gateway, number, speak=False)
    notes = {m.to: m.media_urls[0] for m in twilio_sim.messages if m.media_urls}
    status, bruno_before = await admin(gateway, "GET", f"/admin/people/{BRUNO}/export")
    assert status == 200 and bruno_before["media"] and bruno_before["turns"]

    ana_id = (await gateway.runtime.store.person_by_number(ANA)).id
    status, body = await admin(gateway, "DELETE", f"/admin/people/{ANA}")
    assert status == 200 and body["erased"]["people"] == 1 and body["erased"]["media"] >= 1

    assert (await admin(gateway, "GET", f"/admin/people/{ANA}/export"))[0] == 404
    db = open_db(gateway)
    assert db.execute("SELECT COUNT(*) FROM people WHERE e164 = ?", (ANA,)).fetchone()[0] == 0
    for table in ("conversations", "inbound_messages", "whatsapp_replies", "media", "usage"):
        sql = f"SELECT COUNT(*) FROM {table} WHERE person_id = ?"
        assert db.execute(sql, (ana_id,)).fetchone()[0] == 0, table
    orphans = db.execute(
        "SELECT COUNT(*) FROM turns WHERE conversation_id NOT IN (SELECT id FROM conversations)"
    ).fetchone()[0]
    assert orphans == 0
    texts = " ".join(r[0] for r in db.execute("SELECT payload FROM inbound_messages"))
    assert "whatsapp:+5516999990001" not in texts
    status, bruno_after = await admin(gateway, "GET", f"/admin/people/{BRUNO}/export")
    assert status == 200
    for table, rows in bruno_before.items():
        if table != "usage_report":
            assert len(bruno_after[table]) == len(rows), table
    async with aiohttp.ClientSession() as http:
        async with http.get(notes[f"whatsapp:{ANA}"]) as resp:
            assert resp.status == 404
        async with http.get(notes[f"whatsapp:{BRUNO}"]) as resp:
            assert resp.status == 200 and resp.content_type == "audio/ogg"


async def test_a_request_to_delete_data_is_recorded_for_the_admin(gateway, twilio_sim):
    await whatsapp_text(gateway, twilio_sim, ANA, "Por favor, apaguem os meus dados.", "Ana")
    status, body = await admin(gateway, "GET", "/admin/privacy-requests")
    assert status == 200
    [request] = body["requests"]
    assert request["e164"] == ANA and request["kind"] == "erase"
    assert request["channel"] == "whatsapp" and "apaguem" in request["text"]


async def test_usage_and_cost_per_person(gateway, twilio_sim):
    await whatsapp_text(gateway, twilio_sim, ANA, WA_FACT, name="Ana")
    await phone_call(gateway, ANA, speak=False)
    status, body = await admin(gateway, "GET", f"/admin/people/{ANA}/usage")
    assert status == 200
    [row] = body["by_model"]
    assert row["model"] == "gpt-realtime-2.1" and row["responses"] >= 2
    assert row["output_audio_tokens"] > 0 and row["audio_seconds"] > 0
    assert row["cost_usd"] > 0 and body["total_cost_usd"] == pytest.approx(row["cost_usd"])
    assert body["person"] == "+55…0001"


async def test_admin_actions_need_the_token(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{gateway.url}/admin/people/{ANA}") as resp:
            assert resp.status == 401
        headers = {"Authorization": "Bearer wrong"}
        async with http.get(f"{gateway.url}/admin/privacy-requests", headers=headers) as resp:
            assert resp.status == 403
