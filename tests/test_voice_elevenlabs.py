"""Endrigo's ElevenLabs voice (VOICE_PROVIDER=elevenlabs) over loopback: a WhatsApp message is
answered in text by the model and spoken by the ElevenLabs simulator, whose voice the test
tells from the Realtime one by its pitch; an ElevenLabs failure, refused or cut mid-stream,
still gets the person a voice note, in the Realtime voice, and is logged. Nothing in the
gateway is patched."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.transcode import decode_to_pcm24k
from gateway.usage import cost_usd
from simulators.elevenlabs import (
    SIM_API_KEY,
    SIM_VOICE_ID,
    ElevenLabsSimConfig,
    ElevenLabsSimulator,
    sounds_like_elevenlabs,
)
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from tests.test_call_faults import eventually
from tests.test_calls import CALLER, LONG_REPLY, PUBLIC, connected_call, received
from tests.test_memory import wait_until
from tests.test_whatsapp import REPLY, USER, WAIT_S, harness_for

MODEL = "eleven_flash_v2_5"


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=30, speed=20.0, reply_text=REPLY)


@pytest.fixture
async def elevenlabs_sim() -> AsyncIterator[ElevenLabsSimulator]:
    sim = ElevenLabsSimulator(ElevenLabsSimConfig(first_audio_latency_ms=20, speed=20.0))
    await sim.start()
    yield sim
    await sim.close()


@pytest.fixture
async def gateway(start_gateway, live_env, elevenlabs_sim):
    return await start_gateway(
        {
            **live_env,
            "VOICE_PROVIDER": "elevenlabs",
            "ELEVENLABS_API_KEY": SIM_API_KEY,
            "ELEVENLABS_VOICE_ID": SIM_VOICE_ID,
            "ELEVENLABS_MODEL": MODEL,
            "ELEVENLABS_BASE_URL": elevenlabs_sim.base_url,
        }
    )


async def note_pcm(url: str) -> bytes:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200 and response.content_type == "audio/ogg"
        return decode_to_pcm24k(await response.read()).pcm


async def test_a_whatsapp_message_is_answered_in_endrigos_elevenlabs_voice(
    gateway, twilio_sim, realtime_sim, elevenlabs_sim
):
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        result = await wa.sender.send_text("Oi, quero anunciar minha fazenda")
        text, voice = await wa.replies(2)
        assert await wa.settled(result.message_sid) == "done"
        assert text.body == REPLY
        pcm = await note_pcm(voice.media_urls[0])
    assert sounds_like_elevenlabs(pcm, 24000)
    # The model was asked for text only; ElevenLabs spoke exactly that text, at 24 kHz PCM.
    [session] = realtime_sim.sessions
    creates = [t.event for t in session.received if t.event["type"] == "response.create"]
    assert [c["response"]["output_modalities"] for c in creates] == [["text"]]
    [request] = elevenlabs_sim.requests
    assert request.query["output_format"] == "pcm_24000" and request.voice_id == SIM_VOICE_ID
    assert elevenlabs_sim.characters_billed == len(REPLY)
    # The characters are the person's usage, priced.
    person = await gateway.runtime.store.person_by_number(USER)
    rows = {r["model"]: r for r in await gateway.runtime.store.usage_by_model(person.id)}
    assert rows[MODEL]["characters"] == len(REPLY)


@pytest.mark.parametrize("fault", ["refused", "cut mid-stream"])
async def test_an_elevenlabs_failure_falls_back_to_the_realtime_voice_for_that_reply(
    fault, gateway, twilio_sim, realtime_sim, elevenlabs_sim, caplog
):
    if fault == "refused":
        elevenlabs_sim.fail_next(1, status=500)
    else:
        elevenlabs_sim.cut_next(after_chunks=2)
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        with caplog.at_level(logging.WARNING, logger="gateway.whatsapp_turns"):
            result = await wa.sender.send_text("Oi")
            text, voice = await wa.replies(2)
            assert await wa.settled(result.message_sid) == "done"
        assert text.body == REPLY
        pcm = await note_pcm(voice.media_urls[0])
    assert len(pcm) > 24000  # a whole reply, not the piece ElevenLabs sent before it broke
    assert not sounds_like_elevenlabs(pcm, 24000)
    assert any("ElevenLabs" in r.getMessage() for r in caplog.records)
    broken = elevenlabs_sim.requests[0]
    assert broken.status == 500 if fault == "refused" else broken.cut and broken.chunks == 2
    # The next reply is Endrigo's voice again.
    async with harness_for(gateway, twilio_sim, realtime_sim) as wa:
        await wa.sender.send_text("E quanto custa?")
        await twilio_sim.wait_for_messages(4, timeout=WAIT_S, settled=True)
        assert sounds_like_elevenlabs(await note_pcm(twilio_sim.messages[3].media_urls[0]), 24000)


# ---- calls --------------------------------------------------------------------------------


@pytest.fixture
async def call_gateway(start_gateway, live_env, elevenlabs_sim):
    return await start_gateway(
        {
            **live_env,
            "PUBLIC_BASE_URL": PUBLIC,
            "CALL_CLAIM_TIMEOUT_S": "1",
            "VOICE_PROVIDER": "elevenlabs",
            "ELEVENLABS_API_KEY": SIM_API_KEY,
            "ELEVENLABS_VOICE_ID": SIM_VOICE_ID,
            "ELEVENLABS_MODEL": MODEL,
            "ELEVENLABS_BASE_URL": elevenlabs_sim.base_url,
        }
    )


async def test_a_call_is_answered_in_endrigos_elevenlabs_voice_as_twilio_frames(
    call_gateway, realtime_sim, elevenlabs_sim
):
    caller, session = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)  # the greeting
        greeting = len(caller.audio_received)
        await caller.speak_and_wait(speech_mulaw(1200, seed=3))
        await caller.wait_playback_idle(quiet_s=0.3)
        reply = bytes(caller.audio_received[greeting:])
        assert caller.violations == []
        sizes = {len(base64.b64decode(r.message["media"]["payload"]))
                 for r in caller.received if r.event == "media"}  # fmt: skip
    assert greeting > 0 and sounds_like_elevenlabs(bytes(caller.audio_received[:greeting]), 8000,
                                                   codec="ulaw")  # fmt: skip
    assert len(reply) > 8 * 400 and sounds_like_elevenlabs(reply, 8000, codec="ulaw")
    assert sizes and all(size % 160 == 0 for size in sizes)
    [update] = received(session, "session.update")
    assert update["session"]["output_modalities"] == ["text"]
    assert session.errors == []
    # Twilio's own format from ElevenLabs: nothing was transcoded on the way.
    assert {r.query["output_format"] for r in elevenlabs_sim.requests} == {"ulaw_8000"}
    heard = bytes(caller.audio_received)
    for request in elevenlabs_sim.requests:  # each reply's audio, byte for byte, in frames
        whole = len(request.audio) // 160 * 160
        assert whole > 0 and bytes(request.audio[:whole]) in heard


async def test_barge_in_on_elevenlabs_clears_and_tells_the_model_the_words_played(
    call_gateway, realtime_sim, sim_config, elevenlabs_sim
):
    sim_config.reply = lambda session, user_item: LONG_REPLY if user_item else "Olá!"
    caller, session = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3, timeout=30)
        heard_before = caller.playback.queued_bytes - caller.playback.discarded_bytes
        await caller.speak_and_wait(speech_mulaw(1000, seed=5))
        await asyncio.sleep(0.8)  # the caller hears some of the reply, then talks over it
        caller.speak(speech_mulaw(800, seed=6))
        await caller.wait_until(lambda: caller.clears, 5)
        [clear] = caller.clears
        heard_ms = (caller.playback.played(clear.at) - heard_before) / 8
        await session.wait_for(lambda: received(session, "conversation.item.create"), 3)
        assert caller.violations == []
    [delete] = received(session, "conversation.item.delete")
    [create] = [e for e in received(session, "conversation.item.create")
                if e["item"]["role"] == "assistant"]  # fmt: skip
    heard = create["item"]["content"][0]["text"]
    assert LONG_REPLY.startswith(heard) and 0 < len(heard) < len(LONG_REPLY)
    # The words told are those whose sound had played, within the truncate bound of 60 ms.
    per_char = elevenlabs_sim.config.ms_per_char(1.0)
    assert abs(len(heard) * per_char - heard_ms) <= 60 + per_char
    assert delete["item_id"] != create["item"].get("id")
    assert received(session, "conversation.item.truncate") == []
    assert all(e["error"].get("code") != "invalid_value" for e in session.errors)


async def test_an_elevenlabs_failure_mid_call_reply_is_finished_in_the_realtime_voice(
    call_gateway, realtime_sim, elevenlabs_sim, caplog
):
    caller, session = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)  # the greeting, in ElevenLabs' voice
        greeting = len(caller.audio_received)
        elevenlabs_sim.cut_next(after_chunks=1)
        with caplog.at_level(logging.WARNING, logger="gateway.call_voice"):
            await caller.speak_and_wait(speech_mulaw(1200, seed=3))
            await caller.wait_playback_idle(quiet_s=0.5)
        reply = bytes(caller.audio_received[greeting:])
        assert caller.violations == []
    assert any("ElevenLabs failed" in r.getMessage() for r in caplog.records)
    oob = [e for e in received(session, "response.create")
           if e.get("response", {}).get("conversation") == "none"]  # fmt: skip
    assert len(oob) == 1 and oob[0]["response"]["output_modalities"] == ["audio"]
    cut = elevenlabs_sim.requests[-1]
    assert cut.cut
    # The caller heard ElevenLabs' first chunk, then the Realtime voice for the rest.
    assert len(reply) > len(cut.audio) + 8 * 200


async def test_an_upstream_drop_mid_reply_finishes_its_elevenlabs_stream_and_the_call_goes_on(
    call_gateway, realtime_sim, sim_config, elevenlabs_sim
):
    sim_config.reply = lambda session, user_item: LONG_REPLY if user_item else "Olá!"
    caller, first = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        caller.speak(speech_mulaw(1000, seed=5))
        requests = elevenlabs_sim.requests
        await eventually(lambda: len(requests) > 1 and requests[1].chunks, WAIT_S)
        await first.drop()  # while the reply's stream is speaking
        cut = requests[1]
        await eventually(lambda: cut.finished, WAIT_S)  # with what the model had said
        assert not cut.cut and 0 < len(cut.text) < len(LONG_REPLY)
        second = await realtime_sim.wait_for_session(count=2)
        await second.wait_for(lambda: received(second, "session.update"), 3)
        await caller.wait_playback_idle(quiet_s=0.3)
        before = len(caller.audio_received)
        await caller.speak_and_wait(speech_mulaw(1000, seed=8))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert sounds_like_elevenlabs(bytes(caller.audio_received[before:]), 8000, codec="ulaw")
        assert caller.violations == [] and second.errors == []


async def test_a_replys_elevenlabs_stream_is_opened_while_the_model_thinks(
    call_gateway, realtime_sim, sim_config, elevenlabs_sim
):
    """The handshake is paid between response.created and the first word, not after it."""
    sim_config.first_audio_latency_ms = 300
    caller, session = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, WAIT_S)  # the greeting, whole
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.speak_and_wait(speech_mulaw(1000, seed=3))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert caller.violations == []
    replies = [r for r in session.responses if r.first_audio_at is not None]
    streams = [r for r in elevenlabs_sim.requests if r.kind == "stream_input"]
    assert len(replies) == len(streams) == 2  # the greeting and the answer, one stream each
    for reply, stream in zip(replies, streams, strict=True):
        assert reply.created_at < stream.started_at < reply.first_audio_at
        assert stream.text.strip() == reply.sent_text.strip()


async def test_barge_in_before_elevenlabs_first_audio_drops_that_reply(
    call_gateway, realtime_sim, sim_config, elevenlabs_sim
):
    """The model's text is whole long before ElevenLabs speaks it: a caller who talks in that
    window must not then hear the old reply over their own words, and the model is told
    they heard none of it."""
    replies = iter(["Olá!", LONG_REPLY, "Pode falar, estou ouvindo."])
    sim_config.reply = lambda session, user_item: next(replies, "Certo.")
    caller, session = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, WAIT_S)
        await caller.wait_playback_idle(quiet_s=0.3)
        elevenlabs_sim.config.first_audio_latency_ms = 1500  # a slow first chunk
        caller.speak(speech_mulaw(600, seed=5))
        stream = await eventually_request(elevenlabs_sim, 2)
        await session.wait_for(
            lambda: any(
                r.status == "completed" and r.text == LONG_REPLY for r in session.responses
            ),
            5,
        )
        before = len(caller.audio_received)
        caller.speak(speech_mulaw(600, seed=6))  # talks before any of that reply was heard
        await session.wait_for(lambda: received(session, "conversation.item.delete"), 5)
        elevenlabs_sim.config.first_audio_latency_ms = 20
        await asyncio.sleep(1.8)  # past the old reply's first chunk
        heard_after = bytes(caller.audio_received[before:])
        assert caller.violations == []
    reply = next(r for r in session.responses if r.text == LONG_REPLY)
    [delete] = received(session, "conversation.item.delete")
    assert delete["item_id"] == reply.item.id  # the model is told the caller heard none of it
    # Its audio, made by then, never reached the phone: what played after the caller spoke
    # is the next reply's alone.
    answer = elevenlabs_sim.requests[-1]
    assert answer is not stream and answer.text.strip() == "Pode falar, estou ouvindo."
    assert len(stream.audio) > 8 * 1000
    assert 0 < len(heard_after) <= len(answer.audio) + 160


async def eventually_request(sim: ElevenLabsSimulator, count: int):
    await eventually(lambda: len(sim.requests) >= count, WAIT_S)
    return sim.requests[count - 1]


async def test_a_calls_elevenlabs_characters_are_the_callers_usage_priced(
    call_gateway, realtime_sim, elevenlabs_sim
):
    caller, _ = await connected_call(call_gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.audio_received, WAIT_S)
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.speak_and_wait(speech_mulaw(1000, seed=3))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.hangup()
    store = call_gateway.runtime.store
    person = await store.person_by_number(CALLER)
    billed = sum(r.characters for r in elevenlabs_sim.requests)

    async def voice_rows() -> list[dict]:
        return [r for r in await store.usage_by_model(person.id) if r["model"] == MODEL]

    await wait_until(voice_rows)
    [row] = await voice_rows()
    assert billed > 0 and row["characters"] == billed  # what ElevenLabs billed, every reply
    prices = call_gateway.runtime.prices[MODEL]
    assert cost_usd(prices, row) == pytest.approx(billed * prices.per_1k_characters / 1000)
