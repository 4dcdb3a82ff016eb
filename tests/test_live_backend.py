"""Calls on the GPT-Live backend (VOICE_BACKEND=live) end to end: a simulated caller, the
gateway, and the GPT-Live simulator (on the same OpenAI base URL as the Realtime one), over
real sockets. Every event the gateway sends is validated strictly by the simulator against
the SDK's Live types; an invalid one would come back as an `error` and fail these tests."""

from __future__ import annotations

import asyncio
import base64

import pytest

from gateway.transcode import encode_ogg_opus
from gateway.usage import cost_usd
from simulators.caller import SimulatedCaller
from simulators.live_config import LiveSimConfig
from simulators.speech import speech_mulaw, speech_pcm24k
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.store_helpers import open_db
from tests.test_calls import CALLER, LONG_REPLY
from tests.test_memory import WA_FACT, wait_until, whatsapp_text
from tests.test_voice_elevenlabs import note_pcm
from tests.test_whatsapp import REPLY, USER, harness_for, new_sid

SAID = "Quero anunciar a minha fazenda de café em Franca"


@pytest.fixture
def live_sim_config() -> LiveSimConfig:
    return LiveSimConfig(
        first_audio_latency_ms=80, speed=8.0, ms_per_char=30, reply_text="Olá, tudo bem?",
        input_transcript=SAID, transcription_latency_ms=30,
    )  # fmt: skip


@pytest.fixture
async def gateway(start_gateway, live_env):
    env = {**live_env, "CALL_CLAIM_TIMEOUT_S": "1"}  # signed for its own URL, as WhatsApp
    return await start_gateway({**env, "VOICE_BACKEND": "live", "LIVE_MODEL": "gpt-live-1"})


async def live_call(gateway, realtime_sim, number: str = CALLER):
    caller = SimulatedCaller(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=number)
    assert (await caller.dial()).status == 200
    await caller.connect()
    return caller, await realtime_sim.live.wait_for_session(
        count=len(realtime_sim.live.sessions) + 1
    )


def output_audio(session) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"]) for e in session.events("session.output_audio.delta")
    )


async def live_usage(gateway, person_id: int) -> list[dict]:
    rows = await gateway.runtime.store.usage_by_model(person_id)
    return [r for r in rows if r["model"].startswith("gpt-live")]


def client_types(session) -> list[str]:
    return [e.get("type") for e in session.client_events()]


async def test_a_call_on_gpt_live_is_greeted_and_answered_in_exact_twilio_frames(
    gateway, realtime_sim
):
    caller, session = await live_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, 5)  # the greeting
        await caller.wait_playback_idle(quiet_s=0.3)
        greeting = len(caller.audio_received)
        turn = await caller.speak_and_wait(speech_mulaw(1200, seed=3))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert turn.latency_s is not None and caller.violations == []
        sizes = {len(base64.b64decode(r.message["media"]["payload"]))
                 for r in caller.received if r.event == "media"}  # fmt: skip
    assert len(caller.audio_received) > greeting + 8 * 300  # a reply after the greeting
    assert sizes and all(size % 160 == 0 for size in sizes)
    assert session.errors == []
    [start] = session.client_events("session.start")
    assert client_types(session)[0] == "session.start"
    assert start["session"]["model"] == "gpt-live-1"
    assert start["session"]["audio"]["format"] == {"type": "audio/pcmu", "rate": 8000}
    assert "Endrigo" in start["session"]["instructions"]
    # The greeting is an appended instruction (Live's voice model takes no response.create).
    assert session.replies[0].cause == "instructions"
    # The caller's audio reached Live untouched, as mu-law in Live's own append event.
    appended = b"".join(base64.b64decode(e["audio"])
                        for e in session.client_events("session.input_audio.append"))  # fmt: skip
    assert bytes(session.input_audio) == appended and len(appended) > 8 * 1200
    # What the phone played is what Live sent, byte for byte, in frames.
    sent = b"".join(
        base64.b64decode(e["delta"]) for e in session.events("session.output_audio.delta")
    )
    assert bytes(caller.audio_received)[: len(sent) // 160 * 160] == sent[: len(sent) // 160 * 160]


async def test_barge_in_on_gpt_live_clears_the_phone_and_keeps_what_was_heard(
    gateway, realtime_sim, live_sim_config
):
    live_sim_config.reply = lambda session, item: (
        LONG_REPLY if item and item.role == "user" else "Olá!"
    )
    caller, session = await live_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, 5)
        await caller.wait_playback_idle(quiet_s=0.3, timeout=30)
        await caller.speak_and_wait(speech_mulaw(1000, seed=5))
        await asyncio.sleep(0.8)  # the caller hears some of the reply, then talks over it
        caller.speak(speech_mulaw(800, seed=6))
        await caller.wait_until(lambda: caller.clears, 5)
        [clear] = caller.clears
        heard = [e for e in session.sent if e.event["type"] == "session.input_transcript.delta"]
        assert clear.at >= heard[-1].at  # the clear follows Live's word that the caller spoke
        assert clear.at - heard[-1].at < 0.100
        assert caller.violations == []
    assert session.errors == []
    store = gateway.runtime.store
    person = await store.person_by_number(CALLER)

    async def cut_turn_stored() -> bool:
        turns = await store.recent_turns(person.id)
        return any(t.role == "assistant" and t.text.endswith("…") for t in turns)

    await wait_until(cut_turn_stored)
    turns = await store.recent_turns(person.id)
    [cut] = [t for t in turns if t.role == "assistant" and t.text.endswith("…")]
    assert LONG_REPLY.startswith(cut.text.rstrip("…")) and len(cut.text) < len(LONG_REPLY)
    # Live's model kept only what it had played when the caller spoke.
    kept = [i for i in session.history if i.role == "assistant" and LONG_REPLY[:20] in i.text]
    assert kept and len(kept[0].text) < len(LONG_REPLY)


async def test_a_live_call_stores_its_turns_and_latency_with_the_person(gateway, realtime_sim):
    caller, session = await live_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, 5)
        await caller.wait_playback_idle(quiet_s=0.3)
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
    db = open_db(gateway)
    rows = db.execute(
        "SELECT response_latency_ms, upstream_first_audio_ms FROM turns "
        "WHERE role = 'assistant' ORDER BY id"
    ).fetchall()
    reply = rows[1]
    # End of speech (the last word's end_ms) -> first frame; Live's own turn-taking inside.
    assert reply[0] >= reply[1] > 0
    assert reply[1] < 800  # S (500 ms of silence) + F (80 ms), not from the first word
    # Live bills seconds of session: the person's usage carries what Live last reported.
    reported = session.events("session.usage.updated")[-1]["usage"]["seconds"]
    await wait_until(lambda: live_usage(gateway, person.id))
    [row] = await live_usage(gateway, person.id)
    assert row["session_seconds"] == reported > 0
    prices = gateway.runtime.prices["gpt-live-1"]
    assert cost_usd(prices, row) == pytest.approx(reported / 60 * prices.per_minute)


async def test_memory_crosses_channels_with_calls_on_gpt_live(gateway, realtime_sim, twilio_sim):
    number = "+5516999990077"
    await whatsapp_text(gateway, twilio_sim, number, WA_FACT, name="Ana Paula")
    caller, session = await live_call(gateway, realtime_sim, number)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, 5)
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.speak_and_wait(speech_mulaw(1000, seed=4))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.hangup()
    [start] = session.client_events("session.start")
    assert (
        WA_FACT in start["session"]["instructions"]
        and "Ana Paula" in start["session"]["instructions"]
    )
    store = gateway.runtime.store
    person = await store.person_by_number(number)

    async def call_kept() -> bool:
        return any(t.text == SAID for t in await store.recent_turns(person.id))

    await wait_until(call_kept)  # and the person's WhatsApp session, also on Live, hears of it
    await whatsapp_text(gateway, twilio_sim, number, "Lembra do que falei na ligação?", name="Ana")
    [chat] = [s for s in realtime_sim.live.sessions if s is not session]
    news = [e["content"] for e in chat.client_events("session.thinking.append")]
    assert any(SAID in n for n in news)  # silent context: told, not to be answered on its own
    assert chat.errors == []


# ---- WhatsApp on GPT-Live ----------------------------------------------------------------


async def test_a_whatsapp_text_on_gpt_live_gets_its_text_and_voice_note(
    gateway, twilio_sim, realtime_sim, live_sim_config
):
    live_sim_config.reply_text = REPLY
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        result = await wa.sender.send_text("Oi, quero anunciar minha fazenda")
        text, voice = await wa.replies(2)
        assert await wa.settled(result.message_sid) == "done"
        note = await note_pcm(voice.media_urls[0])
    assert text.body == REPLY and voice.body == ""
    [session] = realtime_sim.live.sessions
    assert session.errors == [] and realtime_sim.sessions == []  # Live only, no Realtime
    [start] = session.client_events("session.start")
    assert start["session"]["audio"]["format"] == {"type": "audio/pcm", "rate": 24000}
    # The written message reached the model as an instruction it answered out loud.
    asked = [e["content"] for e in session.client_events("session.instructions.append")]
    assert len(asked) == 1 and "Oi, quero anunciar minha fazenda" in asked[0]
    # The voice note is Live's reply audio, whole (Opus-coded, so compared by length).
    sent = b"".join(
        base64.b64decode(e["delta"]) for e in session.events("session.output_audio.delta")
    )
    assert abs(len(note) - len(sent)) <= 2 * 24 * 40  # within 40 ms of codec framing
    assert sum(i.role == "assistant" and i.text == REPLY for i in session.history) == 1


async def test_a_whatsapp_voice_note_on_gpt_live_is_heard_and_answered(
    gateway, twilio_sim, realtime_sim, live_sim_config
):
    live_sim_config.reply_text = REPLY
    spoken = speech_pcm24k(1500, seed=5)
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        sid = new_sid("MM")
        url = twilio_sim.add_media(encode_ogg_opus(spoken), "audio/ogg", message_sid=sid)
        assert (await wa.sender.send_media(url, "audio/ogg", message_sid=sid)).status == 200
        text, voice = await wa.replies(2)
        await wa.settled(sid)
    assert text.body == REPLY and voice.media_urls
    [session] = realtime_sim.live.sessions
    assert session.errors == []
    assert len(session.input_audio) >= 2 * 24 * 1500  # the whole note, then silence
    store = gateway.runtime.store
    person = await store.person_by_number(USER)
    turns = await store.recent_turns(person.id)
    assert [(t.role, t.text) for t in turns] == [("user", SAID), ("assistant", REPLY)]
