"""The same user-facing journeys on both model backends (VOICE_BACKEND=realtime|live), end to
end over real sockets: a call answered in exact Twilio frames, barge-in, WhatsApp text and
voice notes, and memory across channels. The OpenAI simulator serves both APIs on one base
URL, as OpenAI does; each validates every event the gateway sends against the SDK's own
types (Realtime's or Live's), and an invalid one comes back as an error these tests see.
What differs by protocol (how the greeting is asked for, what replaces truncate) is checked
per backend through `Upstream`."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.transcode import decode_to_pcm24k, encode_ogg_opus
from gateway.usage import cost_usd
from simulators.caller import SimulatedCaller
from simulators.live_config import LiveSimConfig, LiveToolCall
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator, SimToolCall
from simulators.speech import speech_mulaw, speech_pcm24k
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.store_helpers import open_db
from tests.test_calls import LONG_REPLY
from tests.test_memory import WA_FACT, wait_until, whatsapp_text
from tests.test_tools import played_before
from tests.test_whatsapp import (
    REPLY,
    USER,
    assert_is_the_reply_audio,
    harness_for,
    new_sid,
    voice_note_of,
)

CALLER = "+5516999990011"
SAID = "Quero anunciar a minha fazenda de café em Franca"
GREETING = "Olá, tudo bem?"


@dataclass
class Upstream:
    """One backend's sessions as the simulator saw them, in the terms a test asks about."""

    backend: str
    sim: RealtimeSimulator

    @property
    def live(self) -> bool:
        return self.backend == "live"

    @property
    def sessions(self) -> list[Any]:
        return self.sim.live.sessions if self.live else self.sim.sessions

    async def session(self, count: int) -> Any:
        api = self.sim.live if self.live else self.sim
        return await api.wait_for_session(count=count)

    def errors(self) -> list[Any]:
        return [s.errors for s in self.sessions if s.errors]

    @staticmethod
    def sent(session: Any) -> list[dict[str, Any]]:
        """What the gateway sent on `session`, in order."""
        return [t.event for t in session.received if isinstance(t.event, dict)]

    def config(self, session: Any) -> dict[str, Any]:
        """The session as the gateway configured it at the start."""
        kind = "session.start" if self.live else "session.update"
        return next(e["session"] for e in self.sent(session) if e["type"] == kind)

    def audio_format(self, session: Any) -> str:
        audio = self.config(session)["audio"]
        return (audio["format"] if self.live else audio["input"]["format"])["type"]

    def reply_audio(self, session: Any) -> bytes:
        """Every byte of reply audio the model sent on `session`."""
        if self.live:
            deltas = [
                t.event for t in session.sent if t.event["type"] == "session.output_audio.delta"
            ]
            return b"".join(base64.b64decode(e["delta"]) for e in deltas)
        return b"".join(bytes(r.item.audio) for r in session.responses if r.item is not None)

    def told(self, session: Any) -> str:
        """Everything the gateway told the model on `session`, as one text."""
        return json.dumps(self.sent(session), ensure_ascii=False)

    def barge_in_signals(self, session: Any) -> list[float]:
        """When the model's side said the caller spoke: Realtime's speech_started, Live's
        input transcript (Live has no interruption event)."""
        kind = (
            "session.input_transcript.delta" if self.live else "input_audio_buffer.speech_started"
        )
        return [t.at for t in session.sent if t.event["type"] == kind]


@pytest.fixture(params=["realtime", "live"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=80, speed=8.0, ms_per_char=30,
                             reply_text=GREETING, input_transcript=SAID)  # fmt: skip


@pytest.fixture
def live_sim_config() -> LiveSimConfig:
    return LiveSimConfig(first_audio_latency_ms=80, speed=8.0, ms_per_char=30,
                         reply_text=GREETING, input_transcript=SAID,
                         transcription_latency_ms=30)  # fmt: skip


def answer(sim_config: RealtimeSimConfig, live_sim_config: LiveSimConfig, fn: Any) -> None:
    """The same reply function on both simulators: fn(is_a_reply_to_the_person) -> text."""
    sim_config.reply = lambda session, item: fn(item is not None)
    live_sim_config.reply = lambda session, item: fn(item is not None and item.role == "user")


@pytest.fixture
async def gateway(start_gateway, live_env, backend):
    env = {**live_env, "CALL_CLAIM_TIMEOUT_S": "1", "VOICE_BACKEND": backend}
    return await start_gateway({**env, "LIVE_MODEL": "gpt-live-1"})


@pytest.fixture
def upstream(backend: str, realtime_sim: RealtimeSimulator) -> Upstream:
    return Upstream(backend, realtime_sim)


async def call(gateway, upstream: Upstream, number: str = CALLER) -> tuple[SimulatedCaller, Any]:
    caller = SimulatedCaller(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=number)
    assert (await caller.dial()).status == 200
    await caller.connect()
    return caller, await upstream.session(len(upstream.sessions) + 1)


async def greeted(caller: SimulatedCaller) -> None:
    await caller.wait_until(lambda: caller.audio_received, 5)
    await caller.wait_playback_idle(quiet_s=0.3, timeout=30)


async def test_a_call_is_greeted_and_answered_in_exact_twilio_frames(gateway, upstream):
    caller, session = await call(gateway, upstream)
    async with caller:
        await greeted(caller)
        greeting = len(caller.audio_received)
        turn = await caller.speak_and_wait(speech_mulaw(1200, seed=3))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert turn.latency_s is not None and caller.violations == []
        sizes = {len(base64.b64decode(r.message["media"]["payload"]))
                 for r in caller.received if r.event == "media"}  # fmt: skip
    assert len(caller.audio_received) > greeting + 8 * 300  # a reply after the greeting
    assert sizes and all(size % 160 == 0 for size in sizes)
    assert upstream.errors() == []
    assert upstream.audio_format(session) == "audio/pcmu"  # Twilio's mu-law, both ways
    assert "Endrigo" in upstream.config(session)["instructions"]
    # What the phone played is what the model sent, byte for byte, in whole frames.
    sent = upstream.reply_audio(session)
    whole = len(sent) // 160 * 160
    assert whole > 0 and bytes(caller.audio_received)[:whole] == sent[:whole]
    if upstream.live:  # Live's voice model takes no response.create: an instruction greets
        assert session.replies[0].cause == "instructions"
        assert upstream.config(session)["audio"]["format"] == {"type": "audio/pcmu", "rate": 8000}


async def test_barge_in_clears_the_phone_and_keeps_what_was_heard(
    gateway, upstream, sim_config, live_sim_config
):
    answer(sim_config, live_sim_config, lambda to_person: LONG_REPLY if to_person else "Olá!")
    caller, session = await call(gateway, upstream)
    async with caller:
        await greeted(caller)
        await caller.speak_and_wait(speech_mulaw(1000, seed=5))
        await asyncio.sleep(0.8)  # the caller hears some of the reply, then talks over it
        caller.speak(speech_mulaw(800, seed=6))
        await caller.wait_until(lambda: caller.clears, 5)
        [clear] = caller.clears
        signal = [at for at in upstream.barge_in_signals(session) if at <= clear.at][-1]
        assert clear.at - signal < 0.100  # Twilio cleared at once
        assert caller.violations == []
    assert upstream.errors() == []
    store = gateway.runtime.store
    person = await store.person_by_number(CALLER)

    async def cut_turn_stored() -> bool:
        turns = await store.recent_turns(person.id)
        return any(t.role == "assistant" and t.text.endswith("…") for t in turns)

    await wait_until(cut_turn_stored)
    [cut] = [t for t in await store.recent_turns(person.id)
             if t.role == "assistant" and t.text.endswith("…")]  # fmt: skip
    assert LONG_REPLY.startswith(cut.text.rstrip("…")) and len(cut.text) < len(LONG_REPLY)
    # The model keeps only what was played: Realtime by our truncate, Live by its own clock.
    if upstream.live:
        kept = [i for i in session.history if i.role == "assistant" and LONG_REPLY[:20] in i.text]
        assert kept and len(kept[0].text) < len(LONG_REPLY)
    else:
        [truncate] = [
            e for e in upstream.sent(session) if e["type"] == "conversation.item.truncate"
        ]
        assert 0 < truncate["audio_end_ms"] < len(LONG_REPLY) * sim_config.ms_per_char


async def test_a_calls_turns_latency_and_usage_are_stored_with_the_person(
    gateway, upstream, backend
):
    caller, session = await call(gateway, upstream)
    async with caller:
        await greeted(caller)
        await caller.speak_and_wait(speech_mulaw(1000, seed=2))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.hangup()
    store = gateway.runtime.store
    person = await store.person_by_number(CALLER)

    async def both_stored() -> bool:
        turns = await store.recent_turns(person.id)
        return sum(t.role == "assistant" for t in turns) >= 2 and any(
            t.role == "user" for t in turns
        )

    await wait_until(both_stored)
    turns = await store.recent_turns(person.id)
    assert [t.text for t in turns if t.role == "user"] == [SAID]
    assert all(t.channel == "call" for t in turns)
    # The reply's row: the greeting answers no speech and has no latency. (Rows of one call
    # may commit out of order on PostgreSQL's pool: not picked by position.)
    [reply] = (
        open_db(gateway)
        .execute(
            "SELECT response_latency_ms, upstream_first_audio_ms FROM turns "
            "WHERE role = 'assistant' AND response_latency_ms IS NOT NULL"
        )
        .fetchall()
    )
    # End of speech -> first frame, the model's share (its turn-taking included) inside.
    assert reply[0] >= reply[1] > 0 and reply[0] < 800 + 500
    # Usage, priced from config/prices.toml: Realtime's tokens, Live's seconds of session.
    rows = {r["model"]: r for r in await store.usage_by_model(person.id)}
    model = "gpt-live-1" if backend == "live" else "gpt-realtime-2.1"

    async def billed() -> bool:
        rows.update({r["model"]: r for r in await store.usage_by_model(person.id)})
        return model in rows

    await wait_until(billed)
    prices = gateway.runtime.prices[model]
    if backend == "live":  # the final figure, from session.closed: the gateway asked for it
        [closed] = [t.event for t in session.sent if t.event["type"] == "session.closed"]
        assert closed["reason"] == "close_requested"
        seconds = closed["usage"]["seconds"]
        assert rows[model]["session_seconds"] == seconds > 0
        assert cost_usd(prices, rows[model]) == pytest.approx(seconds / 60 * prices.per_minute)
    else:
        assert rows[model]["output_audio_tokens"] > 0 and cost_usd(prices, rows[model]) > 0


async def test_a_whatsapp_text_gets_its_text_and_voice_note(
    gateway, upstream, twilio_sim, realtime_sim, sim_config, live_sim_config
):
    sim_config.reply_text = live_sim_config.reply_text = REPLY
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        result = await wa.sender.send_text("Oi, quero anunciar minha fazenda")
        text, voice = await wa.replies(2)
        assert await wa.settled(result.message_sid) == "done"
    assert text.body == REPLY and voice.body == ""
    [session] = upstream.sessions
    assert upstream.errors() == [] and upstream.audio_format(session) == "audio/pcm"
    assert "Oi, quero anunciar minha fazenda" in upstream.told(session)
    assert_is_the_reply_audio(voice_note_of(voice), upstream.reply_audio(session))
    if upstream.live:  # written words reach Live as an instruction it answers out loud
        asked = [e for e in upstream.sent(session) if e["type"] == "session.instructions.append"]
        assert len(asked) == 1 and realtime_sim.sessions == []


async def test_a_whatsapp_voice_note_is_heard_and_answered(
    gateway, upstream, twilio_sim, realtime_sim, sim_config, live_sim_config
):
    sim_config.reply_text = live_sim_config.reply_text = REPLY
    spoken = speech_pcm24k(1500, seed=5)
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        sid = new_sid("MM")
        url = twilio_sim.add_media(encode_ogg_opus(spoken), "audio/ogg", message_sid=sid)
        assert (await wa.sender.send_media(url, "audio/ogg", message_sid=sid)).status == 200
        text, voice = await wa.replies(2)
        await wa.settled(sid)
    assert text.body == REPLY and voice.media_urls
    [session] = upstream.sessions
    assert upstream.errors() == []
    heard = bytes(session.input_audio)
    note = decode_to_pcm24k(encode_ogg_opus(spoken)).pcm
    assert heard[: len(note)] == note  # the whole note reached the model, untouched
    person = await gateway.runtime.store.person_by_number(USER)
    turns = await gateway.runtime.store.recent_turns(person.id)
    assert [(t.role, t.text) for t in turns] == [("user", SAID), ("assistant", REPLY)]


async def test_memory_crosses_channels_both_ways(gateway, upstream, twilio_sim):
    number = "+5516999990077"
    await whatsapp_text(gateway, twilio_sim, number, WA_FACT, name="Ana Paula")
    caller, session = await call(gateway, upstream, number)
    async with caller:
        await greeted(caller)
        await caller.speak_and_wait(speech_mulaw(1000, seed=4))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.hangup()
    instructions = upstream.config(session)["instructions"]
    assert WA_FACT in instructions and "Ana Paula" in instructions  # WhatsApp -> call
    store = gateway.runtime.store
    person = await store.person_by_number(number)

    async def call_kept() -> bool:
        return any(t.text == SAID for t in await store.recent_turns(person.id))

    await wait_until(call_kept)
    await whatsapp_text(gateway, twilio_sim, number, "Lembra do que falei na ligação?", name="Ana")
    chats = [s for s in upstream.sessions if upstream.audio_format(s) == "audio/pcm"]
    assert any(SAID in upstream.told(chat) for chat in chats)  # call -> WhatsApp
    assert upstream.errors() == []


async def test_a_dropped_upstream_mid_call_is_replaced_with_what_was_said(gateway, upstream):
    caller, first = await call(gateway, upstream)
    async with caller:
        await greeted(caller)
        await first.drop()  # OpenAI's side goes away mid-call
        second = await upstream.session(2)
        await second.wait_for(lambda: upstream.sent(second), 3)
        assert GREETING in upstream.config(second)["instructions"]  # the call so far, replayed
        before = len(caller.audio_received)
        await caller.speak_and_wait(speech_mulaw(1000, seed=8))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert len(caller.audio_received) > before and caller.violations == []
    assert second.errors == []


async def test_a_tool_ends_the_call_only_after_the_goodbye_has_played(
    gateway, upstream, sim_config, live_sim_config, twilio_sim
):
    """The model calls end_call (on Live through its Responses backend, by delegation): the
    gateway runs it, hands back the output, and hangs up through Twilio once the goodbye
    answering it has played."""
    goodbye = "Foi um prazer, até logo!"
    sim_config.tool_calls = [SimToolCall("end_call", {}, trigger="anunciar")]
    sim_config.reply = lambda session, item: (
        goodbye if item is not None and item.kind == "function_call_output" else GREETING
    )
    live_sim_config.tool_calls = [LiveToolCall("end_call", {}, trigger="anunciar", answer=goodbye)]
    caller, session = await call(gateway, upstream)
    async with caller:
        await greeted(caller)
        caller.speak(speech_mulaw(1000, seed=3))
        [update] = await twilio_sim.wait_for_call_updates(1, timeout=10)
        async with asyncio.timeout(10):
            await caller.closed.wait()  # Twilio ended the stream
    [output] = session.tool_outputs
    assert output.name == "end_call" and session.tool_violations == []
    assert (update.status, update.effect) == ("completed", "completed")
    assert [m for m in caller.marks if m.received_at > output.at], "the goodbye reached the phone"
    assert played_before(caller, update.at)
    assert upstream.errors() == []
    if upstream.live:  # offered to Live's backend, not to its voice model
        delegation = upstream.config(session)["delegation"]
        assert delegation["type"] == "responses"
        assert "end_call" in {t["name"] for t in delegation["responses"]["tools"]}


async def test_a_tool_on_whatsapp_runs_and_the_reply_carries_the_answer(
    gateway, upstream, sim_config, live_sim_config, twilio_sim
):
    """save_lead asked for in a WhatsApp text (on Live through its Responses backend): the
    lead is stored with the person and the answer after the output is the reply."""
    lead = {"name": "Ana Souza", "interest": "real_estate", "city": "Ribeirão Preto"}
    answer = "Anotei aqui, Ana! Alguém da equipe vai te procurar."
    sim_config.tool_calls = [SimToolCall("save_lead", lead, trigger="anotar")]
    sim_config.reply = lambda session, item: (
        answer if item is not None and item.kind == "function_call_output" else GREETING
    )
    live_sim_config.tool_calls = [LiveToolCall("save_lead", lead, trigger="anotar", answer=answer)]
    number = "+5516999990123"
    await whatsapp_text(gateway, twilio_sim, number, "Pode anotar meu interesse em imóveis?", "Ana")
    [session] = upstream.sessions
    [output] = session.tool_outputs
    assert output.name == "save_lead" and session.tool_violations == []
    assert upstream.errors() == []
    texts = [m.body for m in twilio_sim.messages if m.to == f"whatsapp:{number}" and m.body]
    assert texts == [answer]
    leads = open_db(gateway).execute("SELECT name, interest, city, channel FROM leads").fetchall()
    assert [tuple(r) for r in leads] == [("Ana Souza", "real_estate", "Ribeirão Preto", "whatsapp")]


async def test_a_voice_note_after_text_tells_the_model_the_channel_changed(
    gateway, upstream, twilio_sim, realtime_sim, sim_config, live_sim_config
):
    sim_config.reply_text = live_sim_config.reply_text = REPLY
    voice_label = gateway.runtime.persona.channel_labels["whatsapp_voice"]
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        await wa.sender.send_text("Oi")
        await wa.replies(2)
        sid = new_sid("MM")
        url = twilio_sim.add_media(
            encode_ogg_opus(speech_pcm24k(800)), "audio/ogg", message_sid=sid
        )
        await wa.sender.send_media(url, "audio/ogg", message_sid=sid)
        await wa.replies(4)
    [session] = upstream.sessions  # one warm session for both messages
    assert voice_label not in upstream.config(session)["instructions"]  # it began as text
    assert voice_label in upstream.told(session)  # then the voice note's channel was said
    assert upstream.errors() == []
