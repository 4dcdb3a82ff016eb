"""The clone's tools end to end over loopback (issue 13): the simulated model calls a function
on a call or on WhatsApp; the gateway carries it out (the store, the CRM webhook, Twilio's
REST API), hands back its output and the model answers. Every client event the gateway sends
is validated by the Realtime simulator against the `openai` SDK's types, unknown keys
rejected; the simulator also records what a client can get wrong around a function call."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import logging

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.persona import load_persona
from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig, SimToolCall
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, free_port
from tests.store_helpers import sql_rows
from tests.test_memory import ADMIN, WAIT_S, wait_until, whatsapp_text

ANA = "+5516999990001"
HUMAN = "+5516988887777"
SECRET = "crm-test-secret"
RESULTS = load_persona().tools["results"]
LEAD = {
    "name": "Ana Souza",
    "interest": "real_estate",
    "city": "Ribeirão Preto",
    "notes": "Quer vender os lançamentos da construtora",
}
ANSWER = "Anotei aqui, Ana! Alguém da equipe vai te procurar."
FIRST_REPLY = "Que bom falar com você!"


def answers_tools(session, item) -> str:
    """The simulated model: after a tool's output it says ANSWER, otherwise FIRST_REPLY."""
    return ANSWER if item is not None and item.kind == "function_call_output" else FIRST_REPLY


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(
        first_audio_latency_ms=30,
        speed=20.0,
        ms_per_char=20,
        reply=answers_tools,
        input_transcript="Quero anunciar meus imóveis, pode anotar meu contato?",
    )


@pytest.fixture(autouse=True)
def every_event_valid(realtime_sim):
    """Every client event of every session passed the SDK's types (unknown keys rejected):
    the simulator answers anything else with an `error` event, which it records."""
    yield
    refused = [e for s in realtime_sim.sessions for e in s.errors]
    assert refused == []


class CrmReceiver:
    """A CRM on loopback that checks the signature, and is down for its first `down` tries."""

    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.tries = 0
        self.accepted: list[dict] = []
        self.bad_signatures = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks/almada"
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        self.tries += 1
        body = await request.read()
        if self.tries <= self.down:
            return web.Response(status=503)
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Almada-Signature", ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.accepted.append(orjson.loads(body))
        return web.Response(status=204)

    async def __aenter__(self) -> CrmReceiver:
        app = web.Application()
        app.router.add_post("/hooks/almada", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def dial(gateway, number: str | None = ANA) -> SimulatedCaller:
    caller = SimulatedCaller(
        gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=number or "anonymous"
    )
    assert (await caller.dial()).status == 200
    await caller.connect()
    await caller.wait_playback_idle(quiet_s=0.3, timeout=WAIT_S)
    return caller


async def speak(caller: SimulatedCaller) -> None:
    await caller.speak_and_wait(speech_mulaw(900, seed=3), reply_timeout=WAIT_S)


def phone_session(realtime_sim):
    return [s for s in realtime_sim.sessions if s.input_format == "audio/pcmu"][-1]


def chat_session(realtime_sim):
    return [s for s in realtime_sim.sessions if s.input_format == "audio/pcm"][-1]


async def hear_the_answer(caller: SimulatedCaller, session, output) -> None:
    """The model's answer to the tool's output is whole, and the phone has played it out."""

    def answered() -> bool:
        done = [t for t in session.sent if t.event["type"] == "response.done"]
        return any(t.at > output.at for t in done)

    await session.wait_for(answered, timeout=WAIT_S)
    await caller.wait_playback_idle(quiet_s=0.3, timeout=WAIT_S)


async def answered_tool(caller: SimulatedCaller, realtime_sim):
    """The caller speaks; the model calls its tool, and the answer to the output is played."""
    await speak(caller)
    phone = phone_session(realtime_sim)
    [output] = await outputs_of(phone)
    await hear_the_answer(caller, phone, output)
    return phone, output


async def outputs_of(session, n: int = 1) -> list:
    await session.wait_for(lambda: len(session.tool_outputs) >= n, timeout=WAIT_S)
    return session.tool_outputs


def offered_names(session) -> set[str]:
    updates = [t.event for t in session.received if t.event["type"] == "session.update"]
    return {tool["name"] for tool in updates[0]["session"].get("tools", [])}


def leads_in(gateway) -> list[tuple]:
    return sql_rows(
        gateway,
        "SELECT p.e164, l.channel, l.name, l.interest, l.city, c.channel "
        "FROM leads l JOIN people p ON p.id = l.person_id "
        "LEFT JOIN conversations c ON c.id = l.conversation_id",
    )


async def leads_csv(gateway) -> list[dict]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.url}/admin/leads.csv", headers=headers) as response,
    ):
        assert response.status == 200
        return list(csv.DictReader(io.StringIO(await response.text())))


# ---- save_lead ---------------------------------------------------------------------------


async def test_a_lead_said_on_a_call_is_stored_exported_and_reaches_a_crm_that_was_down(
    start_gateway, live_env, realtime_sim
):
    realtime_sim.config.tool_calls = [SimToolCall("save_lead", LEAD, trigger="anotar")]
    async with CrmReceiver(down=3) as crm:
        env = {
            **live_env,
            "ADMIN_TOKEN": ADMIN,
            "CRM_WEBHOOK_URL": crm.url,
            "CRM_WEBHOOK_SECRET": SECRET,
            "CRM_RETRY_S": "0.05",
        }
        gateway = await start_gateway(env)
        caller = await dial(gateway)
        async with caller:
            phone, output = await answered_tool(caller, realtime_sim)
            await remembered(gateway, ANSWER)  # played to its end, so kept whole
            await caller.hangup()
        assert output.name == "save_lead" and output.output == RESULTS["lead_saved"]
        assert phone.tool_violations == []
        assert leads_in(gateway) == [
            (ANA, "call", "Ana Souza", "real_estate", "Ribeirão Preto", "call")
        ]
        [row] = await leads_csv(gateway)
        assert (row["name"], row["interest"], row["channel"]) == (
            "Ana Souza",
            "real_estate",
            "call",
        )
        async with asyncio.timeout(WAIT_S):
            while not crm.accepted:  # noqa: ASYNC110 - the receiver is the thing observed
                await asyncio.sleep(0.02)
        assert crm.tries >= 4 and crm.bad_signatures == 0  # three 503s, then taken
        [body] = crm.accepted
        assert body["name"] == "Ana Souza" and body["interest"] == "real_estate"


async def remembered(gateway, text: str) -> None:
    """`text` becomes an assistant turn of the call (turns are written as they finish)."""

    async def stored() -> bool:
        return text in [t for _, t in caller_heard(gateway)]

    try:
        await wait_until(stored)
    except TimeoutError:
        raise AssertionError(f"{text!r} not in {caller_heard(gateway)}") from None


def caller_heard(gateway) -> list[tuple[str, str]]:
    return sql_rows(
        gateway,
        "SELECT t.role, t.text FROM turns t JOIN conversations c ON c.id = t.conversation_id "
        "WHERE c.channel = 'call' AND t.role = 'assistant' ORDER BY t.id",
    )


async def test_a_lead_on_whatsapp_is_stored_and_the_reply_carries_the_answer(
    start_gateway, live_env, realtime_sim, twilio_sim
):
    realtime_sim.config.tool_calls = [
        SimToolCall("save_lead", LEAD, trigger="anotar", say_first="Claro!")
    ]
    gateway = await start_gateway({**live_env, "ADMIN_TOKEN": ADMIN})
    await whatsapp_text(gateway, twilio_sim, ANA, "Pode anotar meu interesse em imóveis?", "Ana")
    chat = chat_session(realtime_sim)
    [output] = await outputs_of(chat)
    assert output.output == RESULTS["lead_saved"] and chat.tool_violations == []
    text = [m.body for m in twilio_sim.messages if m.to == f"whatsapp:{ANA}" and m.body]
    assert text == [f"Claro! {ANSWER}"]  # both responses' words, one reply
    voice = [m for m in twilio_sim.messages if m.to == f"whatsapp:{ANA}" and m.media_urls]
    assert len(voice) == 1
    assert leads_in(gateway) == [
        (ANA, "whatsapp", "Ana Souza", "real_estate", "Ribeirão Preto", "whatsapp")
    ]


async def test_a_second_save_in_one_conversation_updates_the_lead(
    start_gateway, live_env, realtime_sim, twilio_sim
):
    realtime_sim.config.tool_calls = [
        SimToolCall("save_lead", LEAD, trigger="anotar"),
        SimToolCall("save_lead", {**LEAD, "city": "Jaboticabal"}, trigger="mudei"),
    ]
    gateway = await start_gateway({**live_env, "ADMIN_TOKEN": ADMIN})
    await whatsapp_text(gateway, twilio_sim, ANA, "Pode anotar meu interesse?", "Ana")
    await whatsapp_text(gateway, twilio_sim, ANA, "Mudei de cidade: Jaboticabal", "Ana")
    await outputs_of(chat_session(realtime_sim), 2)
    assert [row[4] for row in leads_in(gateway)] == ["Jaboticabal"]


# ---- transfer_to_human, end_call ---------------------------------------------------------


def played_before(caller: SimulatedCaller, at: float) -> bool:
    """Every mark the gateway sent had been echoed (its audio played) by `at`."""
    marks = [m for m in caller.marks if not m.cleared]
    return bool(marks) and all(m.echoed_at is not None and m.echoed_at <= at for m in marks)


async def test_end_call_hangs_up_through_twilio_only_after_the_goodbye_has_played(
    gateway, realtime_sim, twilio_sim
):
    realtime_sim.config.tool_calls = [SimToolCall("end_call", {}, trigger="anotar")]
    caller = await dial(gateway)
    async with caller:
        await speak(caller)
        [update] = await twilio_sim.wait_for_call_updates(1, timeout=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            await caller.closed.wait()  # Twilio ended the stream
    phone = phone_session(realtime_sim)
    [output] = phone.tool_outputs
    assert output.output == RESULTS["end_call"] and phone.tool_violations == []
    assert (update.status, update.effect) == ("completed", "completed")
    goodbye = [m for m in caller.marks if m.received_at > output.at]
    assert goodbye, "the goodbye answering the tool reached the phone"
    assert played_before(caller, update.at)
    await remembered(gateway, ANSWER)  # the goodbye is in the person's memory


async def test_transfer_dials_the_human_after_the_hand_off_sentence_has_played(
    start_gateway, live_env, realtime_sim, twilio_sim
):
    realtime_sim.config.tool_calls = [
        SimToolCall("transfer_to_human", {"reason": "quer negociar o contrato"}, trigger="anotar")
    ]
    gateway = await start_gateway({**live_env, "HUMAN_TRANSFER_NUMBER": HUMAN})
    caller = await dial(gateway)
    async with caller:
        await speak(caller)
        [update] = await twilio_sim.wait_for_call_updates(1, timeout=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            await caller.closed.wait()
    assert (update.effect, update.dial_number) == ("redirected", HUMAN)
    assert played_before(caller, update.at)
    assert phone_session(realtime_sim).tool_outputs[0].output == RESULTS["transfer_call"]


async def test_without_a_human_number_no_hand_off_is_offered(gateway, realtime_sim, twilio_sim):
    realtime_sim.config.tool_calls = [
        SimToolCall("transfer_to_human", {"reason": "x"}, trigger="anotar")
    ]
    caller = await dial(gateway)
    async with caller:
        await speak(caller)
        await caller.hangup()
    phone = phone_session(realtime_sim)
    assert offered_names(phone) == {"save_lead", "end_call", "send_whatsapp"}
    assert [r.name for r in phone.tool_calls_refused] == ["transfer_to_human"]
    assert twilio_sim.call_updates == []


async def test_a_whatsapp_hand_off_sends_the_team_a_summary(
    start_gateway, live_env, realtime_sim, twilio_sim
):
    realtime_sim.config.tool_calls = [
        SimToolCall("transfer_to_human", {"reason": "quer negociar o contrato"}, trigger="humano")
    ]
    gateway = await start_gateway({**live_env, "HUMAN_WHATSAPP_NUMBER": HUMAN})
    await whatsapp_text(gateway, twilio_sim, ANA, "Quero falar com um humano", "Ana")
    chat = chat_session(realtime_sim)
    assert offered_names(chat) == {"save_lead", "transfer_to_human"}
    [output] = await outputs_of(chat)
    assert output.output == RESULTS["transfer_whatsapp"]
    [summary] = [m for m in twilio_sim.messages if m.to == f"whatsapp:{HUMAN}"]
    assert "quer negociar o contrato" in summary.body and ANA in summary.body
    assert "Quero falar com um humano" in summary.body


# ---- send_whatsapp -----------------------------------------------------------------------


async def test_send_whatsapp_on_a_call_reaches_the_caller_and_their_next_whatsapp_session(
    gateway, realtime_sim, twilio_sim
):
    address = "Endereço da agência: Av. Presidente Vargas, 2001, Ribeirão Preto."
    realtime_sim.config.tool_calls = [
        SimToolCall("send_whatsapp", {"text": address}, trigger="anotar")
    ]
    caller = await dial(gateway)
    async with caller:
        await speak(caller)
        [output] = await outputs_of(phone_session(realtime_sim))
        await twilio_sim.wait_for_messages(2, timeout=WAIT_S)  # the text, then its voice note
        await caller.hangup()
    assert output.output == RESULTS["whatsapp_sent"]
    text, voice = twilio_sim.messages[:2]
    assert (text.to, text.body) == (f"whatsapp:{ANA}", address)
    assert voice.to == f"whatsapp:{ANA}" and len(voice.media_urls) == 1
    async with aiohttp.ClientSession() as http, http.get(voice.media_urls[0]) as response:
        assert response.status == 200 and (await response.read())[:4] == b"OggS"
    realtime_sim.config.tool_calls = []
    await whatsapp_text(gateway, twilio_sim, ANA, "Oi, recebi!", "Ana")
    assert address in said_to(chat_session(realtime_sim))


def said_to(session) -> str:
    texts = []
    for record in session.received:
        event = record.event
        if event["type"] == "session.update":
            texts.append(event["session"].get("instructions") or "")
        elif event["type"] == "conversation.item.create":
            texts += [p.get("text") or "" for p in event["item"].get("content") or []]
    return "\n".join(texts)


# ---- failures are spoken, never a stack trace ---------------------------------------------


async def test_bad_arguments_are_told_to_the_model_and_the_call_goes_on(
    gateway, realtime_sim, twilio_sim, caplog
):
    caplog.set_level(logging.INFO)
    realtime_sim.config.tool_calls = [
        SimToolCall("save_lead", {"name": "Ana"}, trigger="anotar")  # no interest
    ]
    caller = await dial(gateway)
    async with caller:
        _, output = await answered_tool(caller, realtime_sim)
        assert not caller.closed.is_set()
        await caller.hangup()
    assert output.output == RESULTS["bad_arguments"].format(problem="falta interest")
    assert leads_in(gateway) == []
    assert any("tool save_lead: bad arguments" in r.getMessage() for r in caplog.records)


async def test_a_failing_tool_is_logged_with_the_call_and_spoken_naturally(
    gateway, realtime_sim, twilio_sim, caplog
):
    caplog.set_level(logging.INFO)
    realtime_sim.config.tool_calls = [SimToolCall("save_lead", LEAD, trigger="anotar")]
    caller = await dial(gateway, number=None)  # a withheld caller id: no person to tie it to
    async with caller:
        _, output = await answered_tool(caller, realtime_sim)
        await caller.hangup()
    assert output.output == RESULTS["lead_failed"]
    failed = [r.getMessage() for r in caplog.records if "tool save_lead failed" in r.getMessage()]
    assert failed and failed[0].startswith("call CA")
