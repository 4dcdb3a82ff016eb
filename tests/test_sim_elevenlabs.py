"""The ElevenLabs simulator over real loopback sockets, driven by the official `elevenlabs` SDK
(REST through AsyncElevenLabs, stream-input through ElevenLabs.convert_realtime over TLS, as
the SDK only speaks wss) and by a raw `websockets` client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
import websockets
from elevenlabs import VoiceSettings
from elevenlabs.client import AsyncElevenLabs, ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError
from websockets.exceptions import ConnectionClosed, InvalidStatus

from simulators.elevenlabs import (
    ELEVENLABS_PITCH_HZ,
    SANDBOX_VOICE_ID,
    SIM_API_KEY,
    SIM_VOICE_ID,
    ElevenLabsSimConfig,
    ElevenLabsSimulator,
    estimate_pitch_hz,
    sounds_like_elevenlabs,
)
from simulators.realtime_audio import reply_audio
from simulators.speech import synth_speech
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Olá! Daqui fala o Endrigo, em que posso ajudar?"
BYTES_PER_SAMPLE = {"pcm": 2, "ulaw": 1}


def fast_config(**overrides) -> ElevenLabsSimConfig:
    """No pacing and no latency unless a test asks: the suite stays quick."""
    return ElevenLabsSimConfig(**({"first_audio_latency_ms": 0.0, "speed": math.inf} | overrides))


@pytest.fixture
def sim_config() -> ElevenLabsSimConfig:
    return fast_config()


@pytest.fixture
async def sim(sim_config: ElevenLabsSimConfig) -> AsyncIterator[ElevenLabsSimulator]:
    async with ElevenLabsSimulator(sim_config) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: ElevenLabsSimulator) -> AsyncIterator[AsyncElevenLabs]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield AsyncElevenLabs(api_key=SIM_API_KEY, base_url=sim.base_url, httpx_client=http)


def expected_bytes(sim: ElevenLabsSimulator, text: str, rate: int, width: int) -> int:
    return round(len(text) * sim.config.ms_per_char() * rate / 1000) * width


async def stream_audio(client: AsyncElevenLabs, text: str = TEXT, **kwargs) -> bytes:
    args = {"output_format": "pcm_16000", "model_id": "eleven_flash_v2_5"} | kwargs
    chunks = [c async for c in client.text_to_speech.stream(SIM_VOICE_ID, text=text, **args)]
    return b"".join(chunks)


# ---- the voice ---------------------------------------------------------------------------


def test_the_voice_is_told_apart_from_the_realtime_simulators():
    for fmt, rate, codec in (("audio/pcm", 24000, "pcm"), ("audio/pcmu", 8000, "ulaw")):
        for ms in (400, 1500, 4000):
            theirs = reply_audio(fmt, ms)
            assert not sounds_like_elevenlabs(theirs, rate, codec), (fmt, ms)
            assert estimate_pitch_hz(theirs, rate, codec) < 180
    for seed in range(8):
        assert not sounds_like_elevenlabs(synth_speech(1200, 16000, seed), 16000)
    assert not sounds_like_elevenlabs(b"\x00\x00" * 16000, 16000)  # silence has no pitch


@pytest.mark.parametrize(
    ("output_format", "rate", "codec"),
    [("pcm_16000", 16000, "pcm"), ("pcm_24000", 24000, "pcm"), ("pcm_48000", 48000, "pcm"),
     ("ulaw_8000", 8000, "ulaw")],
)  # fmt: skip
async def test_the_rest_stream_returns_the_requested_format_and_length(
    sim, client, output_format, rate, codec
):
    audio = await stream_audio(client, output_format=output_format)
    assert len(audio) == expected_bytes(sim, TEXT, rate, BYTES_PER_SAMPLE[codec])
    assert sounds_like_elevenlabs(audio, rate, codec)
    assert abs(estimate_pitch_hz(audio, rate, codec) - ELEVENLABS_PITCH_HZ) < 10
    (request,) = await sim.wait_for_requests(1)
    assert (request.kind, request.voice_id, request.status) == ("stream", SIM_VOICE_ID, 200)
    assert request.path == f"/v1/text-to-speech/{SIM_VOICE_ID}/stream"
    assert request.query == {"output_format": output_format}
    assert request.body["text"] == TEXT and request.body["model_id"] == "eleven_flash_v2_5"
    assert request.headers["xi-api-key"] == SIM_API_KEY and request.auth_ok is True
    assert request.characters == len(TEXT) == sim.characters_billed
    assert bytes(request.audio) == audio and request.chunks > 1


async def test_convert_and_stream_speak_the_same_text_alike_and_bill_both(sim, client):
    whole = b"".join(
        [
            c
            async for c in client.text_to_speech.convert(
                SANDBOX_VOICE_ID, text=TEXT, output_format="pcm_24000"
            )
        ]
    )
    assert whole == await stream_audio(client, output_format="pcm_24000")
    kinds = [r.kind for r in await sim.wait_for_requests(2)]
    assert kinds == ["convert", "stream"] and sim.characters_billed == 2 * len(TEXT)


async def test_voice_settings_speed_changes_the_length_and_is_checked(sim, client):
    normal = await stream_audio(client)
    fast = await stream_audio(client, voice_settings=VoiceSettings(speed=1.2, stability=0.5))
    assert len(fast) == round(len(TEXT) * sim.config.ms_per_char(1.2) * 16) * 2
    assert len(fast) < len(normal)
    with pytest.raises(UnprocessableEntityError) as raised:
        await stream_audio(client, voice_settings=VoiceSettings(speed=2.0))
    assert raised.value.body["detail"][0]["loc"] == ["body", "voice_settings", "speed"]


async def test_with_timestamps_alignment_covers_every_character_and_matches_the_audio(sim, client):
    chunks = [
        c
        async for c in client.text_to_speech.stream_with_timestamps(
            SIM_VOICE_ID, text=TEXT, output_format="pcm_24000"
        )
    ]
    assert len(chunks) > 1
    characters, starts, ends, audio = [], [], [], b""
    for chunk in chunks:
        piece = base64.b64decode(chunk.audio_base_64)
        span = (
            chunk.alignment.character_end_times_seconds[-1]
            - (chunk.alignment.character_start_times_seconds[0])
        )
        assert abs(len(piece) / 2 / 24000 - span) <= 1 / 24000  # each chunk's audio, its chars
        audio += piece
        characters += chunk.alignment.characters
        starts += chunk.alignment.character_start_times_seconds
        ends += chunk.alignment.character_end_times_seconds
        assert chunk.normalized_alignment.characters == chunk.alignment.characters
    assert "".join(characters) == TEXT
    assert starts[0] == 0 and all(s == e for s, e in zip(starts[1:], ends[:-1], strict=True))
    assert all(e > s for s, e in zip(starts, ends, strict=True))
    assert abs(ends[-1] - len(audio) / 2 / 24000) <= 1 / 24000
    assert sounds_like_elevenlabs(audio, 24000)
    (request,) = await sim.wait_for_requests(1)
    assert request.kind == "stream_with_timestamps" and request.chunks == len(chunks)


async def test_convert_with_timestamps_is_one_object_for_the_whole_text(sim, client):
    result = await client.text_to_speech.convert_with_timestamps(
        SIM_VOICE_ID, text="Tudo bem?", output_format="ulaw_8000"
    )
    audio = base64.b64decode(result.audio_base_64)
    assert "".join(result.alignment.characters) == "Tudo bem?"
    assert abs(result.alignment.character_end_times_seconds[-1] - len(audio) / 8000) <= 1 / 8000
    assert sounds_like_elevenlabs(audio, 8000, "ulaw")


# ---- refusals -------------------------------------------------------------------------


async def test_a_bad_key_is_401_invalid_api_key(sim):
    async with httpx.AsyncClient() as http:
        bad = AsyncElevenLabs(api_key="sk_wrong", base_url=sim.base_url, httpx_client=http)
        with pytest.raises(ApiError) as raised:
            await stream_audio(bad)
    assert raised.value.status_code == 401
    assert raised.value.body == {
        "detail": {"status": "invalid_api_key", "message": "Invalid API key"}
    }
    (request,) = await sim.wait_for_requests(1)
    assert request.auth_ok is False and request.characters == 0 and not request.audio
    assert sim.characters_billed == 0


async def test_no_key_is_401_needs_authorization(sim):
    url = f"{sim.base_url}/v1/text-to-speech/{SIM_VOICE_ID}/stream"
    async with aiohttp.ClientSession() as http, http.post(url, json={"text": "Oi"}) as response:
        assert response.status == 401
        body = await response.json()
    assert body["detail"]["status"] == "needs_authorization"


async def test_an_unknown_voice_is_404_voice_not_found(sim, client):
    with pytest.raises(ApiError) as raised:
        await client.text_to_speech.convert_with_timestamps("no-such-voice", text="Oi")
    assert raised.value.status_code == 404
    assert raised.value.body["detail"] == {
        "status": "voice_not_found",
        "message": "A voice with voice_id no-such-voice was not found.",
    }


async def test_formats_and_bodies_are_checked(sim, client):
    with pytest.raises(UnprocessableEntityError) as raised:
        await stream_audio(client, output_format="wav_16000")
    (error,) = raised.value.body["detail"]
    assert error["loc"] == ["query", "output_format"] and error["type"] == "enum"
    with pytest.raises(ApiError) as raised:  # a real format the simulator does not encode
        await stream_audio(client, output_format="mp3_44100_128")
    assert raised.value.status_code == 400
    assert raised.value.body["detail"]["status"] == "output_format_not_simulated"
    with pytest.raises(ApiError) as raised:
        await stream_audio(client, model_id="eleven_nonexistent")
    assert raised.value.status_code == 400
    url = f"{sim.base_url}/v1/text-to-speech/{SIM_VOICE_ID}/stream?output_format=pcm_16000"
    async with aiohttp.ClientSession(headers={"xi-api-key": SIM_API_KEY}) as http:
        async with http.post(url, json={"model_id": "eleven_flash_v2_5"}) as response:
            assert response.status == 422
            assert (await response.json())["detail"][0]["loc"] == ["body", "text"]
        async with http.post(url, data=b"not json") as response:
            assert response.status == 422
    assert sim.characters_billed == 0


# ---- timing and faults --------------------------------------------------------------------


@pytest.mark.parametrize("sim_config", [fast_config(first_audio_latency_ms=300.0)])
async def test_the_first_audio_waits_for_the_latency(sim, client):
    started = time.monotonic()
    stream = client.text_to_speech.stream(SIM_VOICE_ID, text=TEXT, output_format="pcm_16000")
    first = await anext(aiter(stream))
    assert time.monotonic() - started >= 0.3 and first
    async for _ in stream:
        pass
    (request,) = await sim.wait_for_requests(1)
    assert request.first_audio_ms >= 300


@pytest.mark.parametrize("sim_config", [fast_config(speed=4.0)])
async def test_audio_is_paced_at_the_speed_knob(sim, client):
    text = "x" * 28  # 28 x 71 ms = ~2 s of audio: at 4x real time, at least ~0.5 s to send
    started = time.monotonic()
    audio = await stream_audio(client, text=text)
    elapsed = time.monotonic() - started
    audio_s = len(audio) / 2 / 16000
    assert audio_s > 1.9
    # the last chunk leaves once the ones before it (6 of 7) have played at 4x; unpaced,
    # the whole text takes a few milliseconds
    assert elapsed >= audio_s * 6 / 7 / 4 * 0.9


@pytest.mark.parametrize("sim_config", [fast_config(speed=4.0)])
async def test_a_client_leaving_mid_stream_ends_the_answer_quietly(sim, client):
    async for chunk in client.text_to_speech.stream(
        SIM_VOICE_ID, text=TEXT * 3, output_format="pcm_16000"
    ):
        assert chunk
        break  # the SDK's stream context closes the connection
    (request,) = await sim.wait_for_requests(1)
    assert request.status == 200 and not request.cut
    assert 0 < len(request.audio) < expected_bytes(sim, TEXT * 3, 16000, 2)


async def test_injected_failures_answer_the_status_then_service_resumes(sim, client):
    sim.fail_next(2, 429)
    for _ in range(2):
        with pytest.raises(ApiError) as raised:
            await stream_audio(client)
        assert raised.value.status_code == 429
        assert raised.value.body["detail"]["status"] == "too_many_concurrent_requests"
    assert len(await stream_audio(client)) == expected_bytes(sim, TEXT, 16000, 2)
    requests = await sim.wait_for_requests(3)
    assert [r.status for r in requests] == [429, 429, 200]
    assert sim.characters_billed == len(TEXT)  # refused requests are not billed


@pytest.mark.parametrize("sim_config", [fast_config(fail_requests=1, fail_status=503)])
async def test_the_config_can_fail_the_first_requests(sim, client):
    with pytest.raises(ApiError) as raised:
        await stream_audio(client)
    assert raised.value.status_code == 503
    assert await stream_audio(client)


async def test_a_rest_stream_cut_mid_way_breaks_the_body(sim, client):
    sim.cut_next(after_chunks=2)
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        async for chunk in client.text_to_speech.stream(
            SIM_VOICE_ID, text=TEXT, output_format="pcm_16000"
        ):
            received.append(chunk)
    full = expected_bytes(sim, TEXT, 16000, 2)
    (request,) = await sim.wait_for_requests(1)
    assert request.cut and request.chunks == 2
    assert len(b"".join(received)) <= len(request.audio) < full
    assert len(await stream_audio(client)) == full  # only the next request was cut


# ---- stream-input through the SDK ---------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the SDK's convert_realtime dials wss only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a loopback certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_sim(tls_files, monkeypatch) -> AsyncIterator[ElevenLabsSimulator]:
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what the SDK's default context trusts
    simulator = ElevenLabsSimulator(fast_config())
    await simulator.start(ssl_context=context)
    try:
        yield simulator
    finally:
        await simulator.close()


def sentences() -> Iterator[str]:
    yield "Olá, "
    yield "aqui fala o Endrigo. "
    yield "Tudo bem?"


def speak_realtime(base_url: str, key: str, **kwargs) -> bytes:
    client = ElevenLabs(api_key=key, base_url=base_url)
    args = {"model_id": "eleven_flash_v2_5", "output_format": "pcm_16000"} | kwargs
    return b"".join(client.text_to_speech.convert_realtime(SIM_VOICE_ID, text=sentences(), **args))


# The SDK reads ConnectionClosed.code/.reason, which websockets deprecates.
SDK_CLOSE_WARNINGS = "ignore:ConnectionClosed.*deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(SDK_CLOSE_WARNINGS)
async def test_stream_input_through_the_sdk(tls_sim):
    assert tls_sim.base_url.startswith("https://")
    audio = await asyncio.to_thread(speak_realtime, tls_sim.base_url, SIM_API_KEY)
    (request,) = await tls_sim.wait_for_requests(1)
    spoken = "Olá, aqui fala o Endrigo. Tudo bem? "  # the SDK's text_chunker ends on a space
    assert request.text == spoken and request.characters == len(spoken)
    assert len(audio) == expected_bytes(tls_sim, spoken, 16000, 2) == len(request.audio)
    assert sounds_like_elevenlabs(audio, 16000)
    assert request.query == {"model_id": "eleven_flash_v2_5", "output_format": "pcm_16000"}
    assert request.headers["xi-api-key"] == SIM_API_KEY and request.auth_ok
    first, last = request.messages[0], request.messages[-1]
    assert first["text"] == " " and first["generation_config"] == {"chunk_length_schedule": [50]}
    assert last == {"text": ""}
    assert request.sent[-1] == {"isFinal": True} and request.close_code == 1000
    audio_messages = request.sent[:-1]
    assert all(
        set(m) == {"audio", "isFinal", "normalizedAlignment", "alignment"} for m in audio_messages
    )
    assert "".join(c for m in audio_messages for c in m["alignment"]["chars"]) == spoken


@pytest.mark.filterwarnings(SDK_CLOSE_WARNINGS)
async def test_stream_input_with_a_bad_key_is_refused_through_the_sdk(tls_sim):
    with pytest.raises(ApiError) as raised:
        await asyncio.to_thread(speak_realtime, tls_sim.base_url, "sk_wrong")
    assert raised.value.status_code == 1008
    (request,) = await tls_sim.wait_for_requests(1)
    assert request.auth_ok is False and request.close_code == 1008
    assert request.sent == [
        {"message": "Invalid API key", "error": "invalid_api_key", "code": 1008}
    ]
    assert request.characters == 0


# ---- stream-input with a raw websocket ----------------------------------------------------


@contextlib.asynccontextmanager
async def open_input(sim: ElevenLabsSimulator, voice_id: str = SIM_VOICE_ID, headers=None, **query):
    query = {"model_id": "eleven_flash_v2_5", "output_format": "pcm_16000"} | query
    async with websockets.connect(
        sim.ws_url(voice_id, **query), additional_headers=headers or {}, open_timeout=5
    ) as ws:
        yield ws


async def receive_until_final(ws) -> list[dict]:
    messages = []
    async with asyncio.timeout(5):
        while True:
            messages.append(json.loads(await ws.recv()))
            if messages[-1].get("isFinal"):
                return messages


async def test_raw_stream_input_with_the_key_in_the_first_message(sim):
    async with open_input(sim) as ws:
        await ws.send(json.dumps({"text": " ", "xi-api-key": SIM_API_KEY}))
        await ws.send(json.dumps({"text": "Olá, tudo bem? ", "flush": True}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))  # audio before the end
        assert first["isFinal"] is None and first["audio"]
        await ws.send(json.dumps({"text": ""}))
        rest = await receive_until_final(ws)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1000
    messages = [first, *rest]
    assert messages[-1] == {"isFinal": True}
    audio, chars = b"", []
    for message in messages[:-1]:
        piece = base64.b64decode(message["audio"])
        alignment = message["alignment"]
        assert alignment == message["normalizedAlignment"]
        assert alignment["charStartTimesMs"][0] == 0  # times are relative to the chunk
        assert len(alignment["chars"]) == len(alignment["charDurationsMs"])
        assert len(piece) == round(sum(alignment["charDurationsMs"]) * 16) * 2
        audio += piece
        chars += alignment["chars"]
    assert "".join(chars) == "Olá, tudo bem? "
    assert sounds_like_elevenlabs(audio, 16000)
    (request,) = await sim.wait_for_requests(1)
    assert request.auth_ok and "xi-api-key" not in request.headers


async def test_raw_stream_input_waits_for_the_chunk_schedule(sim):
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}) as ws:
        await ws.send(json.dumps({"text": " "}))  # default schedule: 120 characters first
        await ws.send(json.dumps({"text": "Só umas trinta letras aqui. "}))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)
        await ws.send(json.dumps({"text": "y" * 100 + " "}))  # past 120: generated
        generated = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert generated["alignment"]["chars"][0] == "S"
        await ws.send(json.dumps({"text": ""}))
        messages = [generated, *await receive_until_final(ws)]
    chars = "".join(c for m in messages[:-1] for c in m["alignment"]["chars"])
    assert chars == "Só umas trinta letras aqui. " + "y" * 100 + " "


async def test_raw_stream_input_auto_mode_speaks_each_message(sim):
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}, auto_mode=True) as ws:
        await ws.send(json.dumps({"text": " "}))
        await ws.send(json.dumps({"text": "Oi. "}))
        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert message["alignment"]["chars"] == ["O", "i", ".", " "]
        await ws.send(json.dumps({"text": ""}))
        assert (await receive_until_final(ws))[-1] == {"isFinal": True}
    (request,) = await sim.wait_for_requests(1)
    assert request.query["auto_mode"] == "true" and request.characters == 4


@pytest.mark.parametrize(
    ("voice_id", "first", "error"),
    [("no-such-voice", {"text": " ", "xi-api-key": SIM_API_KEY}, "voice_not_found"),
     (SIM_VOICE_ID, {"text": " ", "xi-api-key": "sk_wrong"}, "invalid_api_key"),
     (SIM_VOICE_ID, {"text": " "}, "needs_authorization")],
)  # fmt: skip
async def test_raw_stream_input_refusals_end_with_a_message_and_1008(sim, voice_id, first, error):
    async with open_input(sim, voice_id) as ws:
        await ws.send(json.dumps(first))
        last = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert last["error"] == error and last["code"] == 1008 and last["message"]
    assert ws.close_code == 1008


async def test_raw_stream_input_ends_after_the_inactivity_timeout(sim):
    started = time.monotonic()
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}, inactivity_timeout=1) as ws:
        await ws.send(json.dumps({"text": " "}))
        last = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert time.monotonic() - started >= 1.0
    assert last["error"] == "input_timeout_exceeded" and ws.close_code == 1008


async def test_raw_stream_input_cut_mid_stream_drops_the_connection(sim):
    sim.cut_next(after_chunks=2)
    received = []
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}) as ws:
        await ws.send(json.dumps({"text": " "}))
        await ws.send(json.dumps({"text": TEXT + " ", "flush": True}))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    received.append(json.loads(await ws.recv()))
    assert ws.close_code == 1006 and closed.value.rcvd is None  # no close frame: the TCP died
    assert len(received) <= 2 and not any(m.get("isFinal") for m in received)
    (request,) = await sim.wait_for_requests(1)
    assert request.cut and request.chunks == 2 and request.close_code == 1006


@pytest.mark.parametrize(
    ("query", "first", "where"),
    [({"output_format": "wav_16000"}, {"text": " "}, "query.output_format"),
     ({"inactivity_timeout": "999"}, {"text": " "}, "query.inactivity_timeout"),
     ({}, {"text": " ", "generation_config": {"chunk_length_schedule": [5]}},
      "generation_config.chunk_length_schedule"),
     ({}, {"text": " ", "voice_settings": {"stability": 3}}, "voice_settings.stability"),
     ({}, {"text": " ", "generation_config": [50]}, "generation_config")],
)  # fmt: skip
async def test_raw_stream_input_checks_its_query_and_first_message(sim, query, first, where):
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}, **query) as ws:
        await ws.send(json.dumps(first))
        last = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert last["error"] == "validation" and last["message"].startswith(where + ":")
    assert ws.close_code == 1008


async def test_raw_stream_input_refuses_a_message_without_text(sim):
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}) as ws:
        await ws.send(json.dumps({"text": " "}))
        await ws.send(json.dumps({"flush": True}))
        last = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert last["error"] == "invalid_message" and ws.close_code == 1008


async def test_closing_the_simulator_closes_live_streams_with_1001(sim_config):
    simulator = await ElevenLabsSimulator(sim_config).start()
    try:
        async with open_input(simulator, headers={"xi-api-key": SIM_API_KEY}) as ws:
            await ws.send(json.dumps({"text": " "}))
            await simulator.wait_for_requests(1, finished=False)
            await simulator.close()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
    finally:
        await simulator.close()
    (request,) = simulator.requests
    assert request.finished and request.characters == 0


async def test_an_injected_failure_refuses_the_websocket_upgrade(sim):
    sim.fail_next(1, 503)
    with pytest.raises(InvalidStatus) as raised:
        async with open_input(sim):
            pass
    assert raised.value.response.status_code == 503
    assert json.loads(raised.value.response.body)["detail"]["status"] == "service_unavailable"
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}) as ws:  # the next is served
        await ws.send(json.dumps({"text": " "}))
        await ws.send(json.dumps({"text": "Oi. ", "flush": True}))
        await ws.send(json.dumps({"text": ""}))
        assert (await receive_until_final(ws))[-1] == {"isFinal": True}
    assert [r.status for r in await sim.wait_for_requests(2)] == [503, 101]


@pytest.mark.parametrize("sim_config", [fast_config(first_audio_latency_ms=250.0)])
async def test_stream_input_latency_runs_from_the_generation(sim):
    async with open_input(sim, headers={"xi-api-key": SIM_API_KEY}) as ws:
        await ws.send(json.dumps({"text": " "}))
        await asyncio.sleep(0.3)  # the latency counts from when text is generated, not the open
        sent = time.monotonic()
        await ws.send(json.dumps({"text": "Oi. ", "flush": True}))
        await asyncio.wait_for(ws.recv(), 5)
        assert time.monotonic() - sent >= 0.25
        await ws.send(json.dumps({"text": ""}))
        await receive_until_final(ws)


# ---- the command line ---------------------------------------------------------------------


async def test_python_dash_m_serves_on_the_given_port():
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.elevenlabs", "--port", str(port),
        "--latency-ms", "0", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            banner = (await proc.stdout.readline()).decode()
        assert f"http://127.0.0.1:{port}" in banner
        url = f"http://127.0.0.1:{port}/v1/text-to-speech/{SANDBOX_VOICE_ID}/stream"
        session = aiohttp.ClientSession(headers={"xi-api-key": "any-key"})
        query = {"output_format": "pcm_16000"}
        async with session as http, http.post(url, params=query, json={"text": "Oi"}) as r:
            assert r.status == 200 and sounds_like_elevenlabs(await r.read(), 16000)
    finally:
        proc.terminate()
        await proc.wait()
