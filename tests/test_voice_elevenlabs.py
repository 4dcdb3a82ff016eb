"""Endrigo's ElevenLabs voice (VOICE_PROVIDER=elevenlabs) over loopback: a WhatsApp message is
answered in text by the model and spoken by the ElevenLabs simulator, whose voice the test
tells from the Realtime one by its pitch; an ElevenLabs failure, refused or cut mid-stream,
still gets the person a voice note, in the Realtime voice, and is logged. Nothing in the
gateway is patched."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.transcode import decode_to_pcm24k
from simulators.elevenlabs import (
    SIM_API_KEY,
    SIM_VOICE_ID,
    ElevenLabsSimConfig,
    ElevenLabsSimulator,
    sounds_like_elevenlabs,
)
from simulators.realtime import RealtimeSimConfig
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
