"""ElevenLabs' streaming voice for calls, against the ElevenLabs simulator over a loopback
websocket: text deltas in, Twilio-ready mu-law out with its alignment, and what the phone
had played mapped back to the words; refusals and a cut stream are `VoiceUnavailable`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.elevenlabs import VoiceUnavailable
from gateway.elevenlabs_stream import Chunk, ElevenLabsStream, Phrases, SpokenText
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
    phrases = Phrases()
    try:
        for delta in DELTAS:
            for phrase in phrases.add(delta):
                await stream.send_phrase(phrase)
        await stream.send_phrase(phrases.rest())
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
    # every character, in order, once; the text ends in the one space ElevenLabs asks for
    assert spoken.text == TEXT + " "
    ms_per_char = sim.config.ms_per_char(1.0)
    assert spoken.audio_ms == len(audio) / 8 == len(spoken.text) * ms_per_char
    [request] = sim.requests
    assert request.query["output_format"] == "ulaw_8000" and request.model_id == MODEL
    assert request.characters == len(TEXT) + 1 and request.auth_ok


async def test_each_phrase_is_spoken_as_soon_as_it_is_whole(sim):
    """A sentence is flushed at its end, not held for the chunk schedule's 50 characters."""
    await speak(sim)
    [request] = sim.requests
    sent = [(m["text"], m.get("flush")) for m in request.messages[1:]]
    assert sent == [
        ("Olá, aqui é o Endrigo. ", True),
        ("Como posso ajudar a sua empresa hoje? ", True),
        ("", None),
    ]


@pytest.mark.parametrize(
    ("deltas", "phrases", "rest"),
    [
        (["Olá", "! Tu", "do bem?"], ["Olá! "], "Tudo bem?"),
        (["Custa 3.5 mil. E"], ["Custa 3.5 mil. "], "E"),  # a decimal point is no sentence end
        (["Sim, claro", ", com certeza: amanhã"], ["Sim, claro, com certeza: "], "amanhã"),
        (["Bom dia. ", "Tudo? Sim! "], ["Bom dia. ", "Tudo? ", "Sim! "], ""),
        (["Ah, é", " mesmo"], [], "Ah, é mesmo"),  # a short clause waits for more
    ],
)
def test_phrases_end_at_sentences_and_at_long_enough_clauses(deltas, phrases, rest):
    cutter = Phrases()
    got = [phrase for delta in deltas for phrase in cutter.add(delta)]
    assert (got, cutter.rest()) == (phrases, rest)


async def test_what_the_phone_played_maps_back_to_the_words_said(sim):
    _, spoken = await speak(sim)
    per_char = sim.config.ms_per_char(1.0)
    assert spoken.heard(0) == ""
    assert spoken.heard(per_char * 5) == TEXT[:5]
    assert spoken.heard(per_char * 5 - 1) == TEXT[:4]  # a character half-played is not heard
    assert spoken.heard(spoken.audio_ms) == TEXT + " "


@pytest.mark.parametrize("fault", ["bad key", "refused", "cut mid-stream"])
async def test_a_failing_stream_is_voice_unavailable(sim, fault):
    if fault == "refused":
        sim.fail_next(1, status=503)
    elif fault == "cut mid-stream":
        sim.cut_next(after_chunks=1)
    with pytest.raises(VoiceUnavailable):
        await speak(sim, key="wrong" if fault == "bad key" else SIM_API_KEY)
