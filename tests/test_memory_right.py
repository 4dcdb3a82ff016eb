"""One memory per person that is always right (issue 11), end to end over loopback:
a warm WhatsApp session learns what was said on a call, an erased person's ids, sessions and
calls never reach anyone else, and erasures running beside calls, replies, summaries and
each other leave no orphan or misattributed row and no 500."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gateway.calls import REGISTRY
from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.store_helpers import open_db, table_names
from tests.test_memory import (
    ADMIN,
    WAIT_S,
    admin,
    caller_saying,
    wait_until,
    whatsapp_text,
)

pytestmark = pytest.mark.both_stores

ANA = "+5516999990001"
BRUNO = "+5517988880002"
CARLA = "+5511977770003"
CALL_FACT = "tenho uma fazenda em Jaboticabal"
SECRET = "minha senha do banco é girassol-9137"


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return caller_saying(f"Oi, {CALL_FACT}.")


@pytest.fixture
async def gateway(start_gateway, live_env):
    env = {**live_env, "ADMIN_TOKEN": ADMIN, "SUMMARY_INTERVAL_S": "0.1"}
    return await start_gateway(env)


def said_to(session, upto_last_response: bool = True) -> str:
    """Every text the gateway gave a session: instructions and conversation items, up to its
    last response.create (what the model knew when it answered)."""
    events = [t.event for t in session.received]
    if upto_last_response:
        last = max(i for i, e in enumerate(events) if e.get("type") == "response.create")
        events = events[: last + 1]
    texts = []
    for event in events:
        kind = event.get("type")
        if kind == "session.update":
            texts.append(event["session"].get("instructions") or "")
        elif kind == "response.create":
            texts.append((event.get("response") or {}).get("instructions") or "")
        elif kind == "conversation.item.create":
            for part in event["item"].get("content") or []:
                texts.append(part.get("text") or part.get("transcript") or "")
    return "\n".join(texts)


def chat_sessions(realtime_sim) -> list:
    return [s for s in realtime_sim.sessions if s.input_format == "audio/pcm"]


def db_of(gateway) -> Any:
    return open_db(gateway)


def orphans(db: Any) -> dict[str, int]:
    """Rows whose owner is gone: none may exist after any erasure."""
    checks = {
        "conversations": "SELECT COUNT(*) FROM conversations WHERE person_id NOT IN "
        "(SELECT id FROM people)",
        "turns": "SELECT COUNT(*) FROM turns WHERE conversation_id NOT IN "
        "(SELECT id FROM conversations)",
        "usage": "SELECT COUNT(*) FROM usage WHERE person_id NOT IN (SELECT id FROM people) "
        "OR conversation_id NOT IN (SELECT id FROM conversations)",
        "inbound_messages": "SELECT COUNT(*) FROM inbound_messages WHERE person_id NOT IN "
        "(SELECT id FROM people)",
        "whatsapp_replies": "SELECT COUNT(*) FROM whatsapp_replies WHERE person_id NOT IN "
        "(SELECT id FROM people)",
        "media": "SELECT COUNT(*) FROM media WHERE person_id NOT IN (SELECT id FROM people)",
    }
    return {table: db.execute(sql).fetchone()[0] for table, sql in checks.items()}


def everything_stored(db: Any) -> str:
    """Every text column of every table, for a search of what must not be there."""
    parts = []
    for table in table_names(db):
        for row in db.execute(f"SELECT * FROM {table}"):
            parts.extend(str(v) for v in row if isinstance(v, str))
    return "\n".join(parts)


def no_integrity_errors(caplog) -> None:
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if "IntegrityError" in m or "FOREIGN KEY" in m], logged


async def call(gateway, number: str) -> SimulatedCaller:
    caller = SimulatedCaller(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=number)
    assert (await caller.dial()).status == 200
    await caller.connect()
    await caller.wait_playback_idle(quiet_s=0.3, timeout=WAIT_S)
    return caller


async def say(caller: SimulatedCaller, seed: int) -> None:
    await caller.speak_and_wait(speech_mulaw(900, seed=seed), reply_timeout=WAIT_S)
    await caller.wait_playback_idle(quiet_s=0.3, timeout=WAIT_S)


async def stored_call_turns(gateway, number: str) -> int:
    db = db_of(gateway)
    return db.execute(
        "SELECT COUNT(*) FROM turns t JOIN conversations c ON c.id = t.conversation_id "
        "JOIN people p ON p.id = c.person_id WHERE p.e164 = ? AND c.channel = 'call' "
        "AND t.role = 'user'",
        (number,),
    ).fetchone()[0]


async def _no_live_calls(gateway) -> bool:
    return not gateway.app[REGISTRY].live


# ---- ids never reused, holders detached at erasure --------------------------------------


async def test_an_erased_person_never_reaches_a_newcomer(gateway, realtime_sim, twilio_sim, caplog):
    caplog.set_level(logging.INFO)
    await whatsapp_text(gateway, twilio_sim, ANA, f"Guarda isso: {SECRET}", name="Ana")
    old_id = (await gateway.runtime.store.person_by_number(ANA)).id
    assert (await admin(gateway, "DELETE", f"/admin/people/{ANA}"))[0] == 200

    await whatsapp_text(gateway, twilio_sim, BRUNO, "Oi, sou novo aqui", name="Bruno")
    await whatsapp_text(gateway, twilio_sim, CARLA, "Olá, quero anunciar", name="Carla")
    store = gateway.runtime.store
    assert (await store.person_by_number(BRUNO)).id != old_id  # an erased id is never reused
    for session in realtime_sim.sessions:
        heard = said_to(session, upto_last_response=False)
        if "sou novo aqui" in heard or "quero anunciar" in heard:
            assert SECRET not in heard  # not answered from the erased person's session
    for number in (BRUNO, CARLA):
        status, export = await admin(gateway, "GET", f"/admin/people/{number}/export")
        assert status == 200 and SECRET not in str(export) and "Ana" not in str(export)
    assert SECRET not in everything_stored(db_of(gateway))
    no_integrity_errors(caplog)


async def test_a_call_erased_mid_call_goes_on_and_writes_nothing_more(
    gateway, realtime_sim, twilio_sim, caplog
):
    caplog.set_level(logging.INFO)
    caller = await call(gateway, ANA)
    async with caller:
        await say(caller, seed=1)
        assert (await admin(gateway, "DELETE", f"/admin/people/{ANA}"))[0] == 200
        await whatsapp_text(gateway, twilio_sim, BRUNO, "Oi, sou novo aqui", name="Bruno")
        before = len(caller.turns)
        await say(caller, seed=2)  # the call goes on: the caller is still answered
        assert caller.turns[before].first_reply_at is not None
        await caller.hangup()
    await wait_until(lambda: _no_live_calls(gateway))
    db = db_of(gateway)
    assert orphans(db) == dict.fromkeys(orphans(db), 0)
    assert CALL_FACT not in everything_stored(db)  # nothing of the erased caller is kept
    assert db.execute("SELECT COUNT(*) FROM conversations WHERE channel = 'call'").fetchone() == (
        0,
    )
    status, export = await admin(gateway, "GET", f"/admin/people/{BRUNO}/export")
    assert status == 200 and CALL_FACT not in str(export)
    assert {c["channel"] for c in export["conversations"]} == {"whatsapp"}
    no_integrity_errors(caplog)


# ---- erasure beside everything else ----------------------------------------------------


async def test_erasures_at_once_all_succeed_and_leave_nothing_behind(
    gateway, realtime_sim, twilio_sim, caplog
):
    caplog.set_level(logging.INFO)
    for number, name in ((ANA, "Ana"), (BRUNO, "Bruno"), (CARLA, "Carla")):
        await whatsapp_text(gateway, twilio_sim, number, f"Sou {name}, {SECRET}", name=name)
    answers = await asyncio.gather(
        admin(gateway, "DELETE", f"/admin/people/{ANA}"),
        admin(gateway, "DELETE", f"/admin/people/{BRUNO}"),
        admin(gateway, "DELETE", f"/admin/people/{ANA}"),  # the same person twice: one wins
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 200, 404], answers
    db = db_of(gateway)
    assert orphans(db) == dict.fromkeys(orphans(db), 0)
    people = [row[0] for row in db.execute("SELECT e164 FROM people")]
    assert people == [CARLA]
    assert "Sou Ana" not in everything_stored(db) and "Sou Bruno" not in everything_stored(db)
    no_integrity_errors(caplog)


async def test_an_erasure_during_a_whatsapp_reply_stores_and_sends_nothing_of_it(
    gateway, realtime_sim, twilio_sim, caplog
):
    caplog.set_level(logging.INFO)
    release = asyncio.Event()
    asked = asyncio.Event()

    async def slow_reply(session, item) -> str:
        asked.set()
        await release.wait()
        return "Resposta que chega tarde"

    realtime_sim.config.reply = slow_reply
    from simulators.whatsapp_sender import WhatsAppSender

    async with WhatsAppSender(
        gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=ANA, profile_name="Ana"
    ) as sender:
        assert (await sender.send_text(f"Anota: {SECRET}")).status == 200
    async with asyncio.timeout(WAIT_S):
        await asked.wait()
    assert (await admin(gateway, "DELETE", f"/admin/people/{ANA}"))[0] == 200
    release.set()
    realtime_sim.config.reply = None
    await whatsapp_text(gateway, twilio_sim, BRUNO, "Oi, sou novo aqui", name="Bruno")
    await asyncio.sleep(0.3)  # anything of Ana's still in flight would land by now
    assert not [m for m in twilio_sim.messages if m.to == f"whatsapp:{ANA}"]
    db = db_of(gateway)
    assert orphans(db) == dict.fromkeys(orphans(db), 0)
    assert SECRET not in everything_stored(db)
    assert "Resposta que chega tarde" not in everything_stored(db)
    no_integrity_errors(caplog)


async def test_an_erasure_during_a_summary_keeps_the_summary_from_anyone(
    gateway, realtime_sim, twilio_sim, caplog
):
    caplog.set_level(logging.INFO)
    release = asyncio.Event()
    asked = asyncio.Event()
    echo = realtime_sim.responses.reply

    async def slow_summary(instructions: str, text: str) -> str:
        asked.set()
        await release.wait()
        return echo(instructions, text)

    realtime_sim.responses.reply = slow_summary
    caller = await call(gateway, ANA)
    async with caller:
        await say(caller, seed=1)
        await caller.hangup()
    async with asyncio.timeout(WAIT_S):
        await asked.wait()  # the hang-up started the summary of Ana's call
    assert (await admin(gateway, "DELETE", f"/admin/people/{ANA}"))[0] == 200
    await whatsapp_text(gateway, twilio_sim, BRUNO, "Oi, sou novo aqui", name="Bruno")
    release.set()
    await asyncio.sleep(0.5)  # the summary's answer arrives after the erasure
    db = db_of(gateway)
    summaries = [row[0] for row in db.execute("SELECT summary FROM people")]
    assert not [s for s in summaries if s and CALL_FACT in s], summaries
    assert CALL_FACT not in everything_stored(db)
    assert orphans(db) == dict.fromkeys(orphans(db), 0)
    no_integrity_errors(caplog)


# ---- fresh context across channels ------------------------------------------------------


async def test_a_fact_said_on_a_call_reaches_the_still_warm_whatsapp_session(
    gateway, realtime_sim, twilio_sim
):
    await whatsapp_text(gateway, twilio_sim, ANA, "Oi, tudo bem?", name="Ana")
    caller = await call(gateway, ANA)
    async with caller:
        await say(caller, seed=1)
        await caller.hangup()
    await wait_until(lambda: stored_call_turns(gateway, ANA))
    await whatsapp_text(gateway, twilio_sim, ANA, "E então, o que você me sugere?", name="Ana")
    answering = chat_sessions(realtime_sim)[-1]
    assert "o que você me sugere" in said_to(answering)
    assert CALL_FACT in said_to(answering)  # the call's fact was known when it answered


async def test_a_whatsapp_exchange_still_warm_reaches_the_call_that_starts(
    gateway, realtime_sim, twilio_sim
):
    await whatsapp_text(gateway, twilio_sim, ANA, "Quero anunciar minha loja de tratores", "Ana")
    caller = await call(gateway, ANA)
    async with caller:
        await caller.hangup()
    phone = [s for s in realtime_sim.sessions if s.input_format == "audio/pcmu"][-1]
    assert "loja de tratores" in said_to(phone)


async def test_a_whatsapp_message_during_a_call_reaches_the_live_call(
    gateway, realtime_sim, twilio_sim
):
    caller = await call(gateway, ANA)
    async with caller:
        await whatsapp_text(gateway, twilio_sim, ANA, "Mandei a planta da fazenda por aqui", "Ana")
        phone = [s for s in realtime_sim.sessions if s.input_format == "audio/pcmu"][-1]
        await phone.wait_for(lambda: "planta da fazenda" in said_to(phone, False), timeout=WAIT_S)
        items = [t.event for t in phone.received if t.event["type"] == "conversation.item.create"]
        assert [i["item"]["role"] for i in items] == ["system"]  # told once, as a note
        await say(caller, seed=1)  # and the call goes on
        await caller.hangup()
