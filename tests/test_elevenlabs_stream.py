"""ElevenLabs' streaming voice for calls, against the ElevenLabs simulator over a loopback
websocket: text deltas in, Twilio-ready mu-law out with its alignment, and what the phone
had played mapped back to the words; refusals and a cut stream are `VoiceUnavailable`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.elevenlabs import VoiceUnavailable
from gateway.elevenlabs_stream import Chunk, ElevenLabsStream, SpokenText
from simulators.elevenlabs import (
    SIM_API_KEY,
    SIM_VOICE_ID,
    ElevenLabsSimConfig,
    ElevenLabsSimulator,
    sounds_like_elevenlabs,
)

MODEL = "eleven_flash_v2_5"
DELTAS = ["Olá, ", "aqui é o ", "Endrigo. ", "Como posso ", "ajudar ", "a sua empresa hoje?"]
TEXT = "".join(DELTAS)


@pytest.fixture
async def sim() -> AsyncIterator[ElevenLabsSimulator]:
    simulator = ElevenLabsSimulator(
        ElevenLabsSimConfig(first_audio_latency_ms=10, speed=float("inf"))
    )
    await simulator.start()
    yield simulator
    await simulator.close()


async def speak(sim: ElevenLabsSimulator, key: str = SIM_API_KEY) -> tuple[list[Chunk], SpokenText]:
    stream = await ElevenLabsStream.open(sim.base_url, key, SIM_VOICE_ID, MODEL)
    try:
        for delta in DELTAS:
            await stream.send_text(delta)
        await stream.finish()
        chunks, spoken = [], SpokenText()
        async for chunk in stream.chunks():
            chunks.append(chunk)
            spoken.add(chunk)
        return chunks, spoken
    finally:
        await stream.close()


async def test_text_deltas_come_back_as_mulaw_in_the_voice_with_every_character_aligned(sim):
    chunks, spoken = await speak(sim)
    audio = b"".join(c.audio for c in chunks)
    assert sounds_like_elevenlabs(audio, 8000, codec="ulaw")
    assert spoken.text == TEXT  # every character, in order, once
    ms_per_char = sim.config.ms_per_char(1.0)
    assert spoken.audio_ms == len(audio) / 8 == len(TEXT) * ms_per_char
    [request] = sim.requests
    assert request.query["output_format"] == "ulaw_8000" and request.model_id == MODEL
    assert request.characters == len(TEXT) and request.auth_ok


async def test_what_the_phone_played_maps_back_to_the_words_said(sim):
    _, spoken = await speak(sim)
    per_char = sim.config.ms_per_char(1.0)
    assert spoken.heard(0) == ""
    assert spoken.heard(per_char * 5) == TEXT[:5]
    assert spoken.heard(per_char * 5 - 1) == TEXT[:4]  # a character half-played is not heard
    assert spoken.heard(spoken.audio_ms) == TEXT


@pytest.mark.parametrize("fault", ["bad key", "refused", "cut mid-stream"])
async def test_a_failing_stream_is_voice_unavailable(sim, fault):
    if fault == "refused":
        sim.fail_next(1, status=503)
    elif fault == "cut mid-stream":
        sim.cut_next(after_chunks=1)
    with pytest.raises(VoiceUnavailable):
        await speak(sim, key="wrong" if fault == "bad key" else SIM_API_KEY)
