"""The Realtime simulator over real loopback sockets, driven by the official SDK.

Every server event the simulator emits is validated against the SDK's types when each
simulator is closed (see `make_sim`), so no test can pass on a malformed event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from openai import AsyncOpenAI
from websockets.exceptions import ConnectionClosed

from simulators.realtime import (
    ALAW_ENCODE,
    DEFAULT_REPLY,
    MAX_APPEND_BYTES,
    MAX_DURATION_MESSAGE,
    RealtimeSimConfig,
    RealtimeSimulator,
    SimSession,
    SimToolCall,
    ToolLedger,
    reply_duration_ms,
    window_power,
)
from simulators.realtime_events import (
    ClientEventError,
    ServerEventError,
    check_client_event,
    check_server_event,
)
from simulators.speech import silence_mulaw, speech_mulaw, speech_pcm24k, synth_speech

MODEL = "gpt-realtime-2.1"
PCMU = {"type": "audio/pcmu"}
FRAME = 160  # 20 ms of mu-law
# A spoken reply's events, response.created to its item's conversation.item.done (no deltas).
SPOKEN_REPLY = [
    "response.created",
    "rate_limits.updated",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
]


# ---- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    """Start simulators with config overrides; on teardown validate every event they sent."""
    sims: list[RealtimeSimulator] = []

    async def make(**overrides: Any) -> RealtimeSimulator:
        cfg = RealtimeSimConfig(**{"first_audio_latency_ms": 20, "speed": 100.0, **overrides})
        sim = RealtimeSimulator(cfg)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.close()
    for sim in sims:
        for session in sim.sessions:
            for timed in session.sent:
                check_server_event(timed.event)


@pytest.fixture
async def sim(make_sim: Callable[..., Any]) -> RealtimeSimulator:
    return await make_sim()


class Client:
    """The SDK connection, reading every server event as a plain dict."""

    def __init__(self, conn: Any, session: SimSession) -> None:
        self.conn = conn
        self.session = session  # the simulator's side of this connection
        self.events: list[dict] = []

    async def send(self, event: dict) -> None:
        await self.conn.send(event)

    async def recv(self, within: float = 3.0) -> dict:
        event = orjson.loads(await asyncio.wait_for(self.conn.recv_bytes(), within))
        self.events.append(event)
        return event

    async def until(self, event_type: str, within: float = 3.0) -> dict:
        async with asyncio.timeout(within):
            while True:
                event = await self.recv(within)
                if event["type"] == event_type:
                    return event

    async def append(self, audio: bytes, frame: int = FRAME) -> None:
        for i in range(0, len(audio), frame):
            chunk = base64.b64encode(audio[i : i + frame]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})

    async def sync(self) -> None:
        """Round trip: every event sent before has been handled by the simulator."""
        await self.send({"type": "input_audio_buffer.clear"})
        await self.until("input_audio_buffer.cleared")

    async def configure(self, **session: Any) -> dict:
        await self.send({"type": "session.update", "session": {"type": "realtime", **session}})
        return (await self.until("session.updated"))["session"]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events if not e["type"].endswith(".delta")]


@contextlib.asynccontextmanager
async def connect(sim: RealtimeSimulator, model: str = MODEL) -> AsyncIterator[Client]:
    openai = AsyncOpenAI(api_key="sk-test", base_url=sim.base_url)
    count = len(sim.sessions) + 1
    async with openai.realtime.connect(model=model) as conn:
        session = await sim.wait_for_session(count=count)
        client = Client(conn, session)
        await client.until("session.created")
        yield client


def vad(**fields: Any) -> dict:
    return {"type": "server_vad", **fields}


async def pcmu_client(
    stack: contextlib.AsyncExitStack, sim: RealtimeSimulator, turn: Any
) -> Client:
    client = await stack.enter_async_context(connect(sim))
    await client.configure(
        audio={"input": {"format": PCMU, "turn_detection": turn}, "output": {"format": PCMU}}
    )
    return client


def user_turn(lead_ms: int = 600, speech_ms: int = 1500, tail_ms: int = 800) -> bytes:
    return silence_mulaw(lead_ms) + speech_mulaw(speech_ms, seed=1) + silence_mulaw(tail_ms)


def audio_of(events: list[dict], item_id: str | None = None) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"])
        for e in events
        if e["type"] == "response.output_audio.delta" and item_id in (None, e["item_id"])
    )


# ---- connecting and session configuration ----------------------------------------------


async def test_sdk_connects_and_session_update_merges_partially(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        created = client.events[0]["session"]
        assert created["model"] == MODEL and created["type"] == "realtime"
        assert created["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        assert created["audio"]["output"]["voice"] == "marin"
        assert created["audio"]["input"]["turn_detection"] == {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 500,
            "idle_timeout_ms": None,
            "create_response": True,
            "interrupt_response": True,
        }
        assert client.session.headers["Authorization"] == "Bearer sk-test"
        assert client.session.query["model"] == MODEL
        assert "OpenAI-Beta" not in client.session.headers

        updated = await client.configure(
            audio={"input": {"format": PCMU}, "output": {"format": PCMU}}
        )
        assert updated["audio"]["input"]["format"] == PCMU
        assert updated["audio"]["output"]["format"] == PCMU
        assert updated["audio"]["output"]["voice"] == "marin"  # untouched: not sent
        assert updated["instructions"] == created["instructions"]
        assert updated["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500

        updated = await client.configure(audio={"input": {"turn_detection": None}})
        assert updated["audio"]["input"]["turn_detection"] is None
        assert updated["audio"]["input"]["format"] == PCMU
        assert client.session.config == updated


async def test_beta_shaped_session_update_is_rejected_and_changes_nothing(
    sim: RealtimeSimulator,
) -> None:
    async with connect(sim) as client:
        before = client.session.config
        await client.send(
            {
                "type": "session.update",
                "event_id": "evt_beta_1",
                "session": {
                    "type": "realtime",
                    "input_audio_format": "g711_ulaw",
                    "output_audio_format": "g711_ulaw",
                    "voice": "alloy",
                    "modalities": ["audio", "text"],
                    "temperature": 0.8,
                },
            }
        )
        error = (await client.until("error"))["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "unknown_parameter"
        assert error["param"] == "session.input_audio_format"
        assert error["event_id"] == "evt_beta_1"
        assert client.session.config == before

        await client.send(
            {"type": "session.update", "event_id": "evt_2", "session": {"voice": "x"}}
        )
        error = (await client.until("error"))["error"]
        assert (error["param"], error["event_id"]) == ("session.type", "evt_2")
        assert error["message"] == "Missing required parameter: 'session.type'."

        # The session goes on, as the real one does.
        assert (await client.configure(instructions="Olá"))["instructions"] == "Olá"
        assert "session.updated" not in client.types()[:-1]


async def test_unknown_event_type_and_bad_json_are_errors_not_disconnects(
    sim: RealtimeSimulator,
) -> None:
    async with connect(sim) as client:
        await client.send({"type": "transcription_session.update", "event_id": "evt_x"})
        error = (await client.until("error"))["error"]
        assert (error["code"], error["param"], error["event_id"]) == (
            "invalid_value",
            "type",
            "evt_x",
        )
        assert error["message"].startswith("Invalid value: 'transcription_session.update'.")

        await client.conn.send_raw("{not json")
        error = (await client.until("error"))["error"]
        assert error["code"] == "invalid_json"

        await client.sync()
        assert len(client.session.errors) == 2


async def test_missing_auth_is_401_and_beta_header_is_refused(sim: RealtimeSimulator) -> None:
    url = f"{sim.ws_url}?model={MODEL}"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer "}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(url, headers=headers)
            assert info.value.status == 401

        beta = {"Authorization": "Bearer sk-test", "OpenAI-Beta": "realtime=v1"}
        async with http.ws_connect(url, headers=beta) as ws:
            event = orjson.loads((await ws.receive(timeout=3)).data)
            assert event["type"] == "error"
            assert event["error"]["code"] == "beta_api_shape_disabled"
            assert event["error"]["message"] == (
                "The Realtime Beta API is no longer supported. "
                "Please use /v1/realtime for the GA API."
            )
            msg = await ws.receive(timeout=3)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4000


# ---- server VAD and responses ----------------------------------------------------------


async def test_vad_turn_commits_and_answers_in_pcmu(sim: RealtimeSimulator) -> None:
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, vad())
        await client.append(user_turn(lead_ms=600, speech_ms=1500, tail_ms=800))
        started = await client.until("input_audio_buffer.speech_started")
        stopped = await client.until("input_audio_buffer.speech_stopped")
        committed = await client.until("input_audio_buffer.committed")
        done = await client.until("response.done")

    # Speech is at 600..2100 ms of the audio timeline: start minus 300 ms prefix padding,
    # end plus the 500 ms silence (within one 20 ms window, the tail of the last syllable).
    assert abs(started["audio_start_ms"] - 300) <= 20
    assert 2100 + 500 - 100 <= stopped["audio_end_ms"] <= 2100 + 500 + 20
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert committed["previous_item_id"] is None
    [user_item] = client.session.committed
    assert len(user_item.audio) == 8 * (stopped["audio_end_ms"] - started["audio_start_ms"])
    assert len(client.session.input_audio) == 8 * 2900

    expected_order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        *SPOKEN_REPLY,
        "response.done",
    ]
    assert client.types()[2:] == expected_order  # after session.created/updated

    audio = audio_of(client.events)
    assert len(audio) == 8 * reply_duration_ms(DEFAULT_REPLY, sim.config)
    assert audio == client.session.responses[0].audio
    sizes = [
        len(base64.b64decode(e["delta"]))
        for e in client.events
        if "delta" in e and "audio." in e["type"]
    ]
    assert sizes[0] == 1000 and sizes[0] % FRAME  # re-framing on the gateway is exercised
    powers = window_power(audio, "audio/pcmu", FRAME)
    assert np.mean(powers > (32768 * 10 ** (-35 / 20)) ** 2) > 0.6  # speech, not silence
    transcript = [e for e in client.events if e["type"] == "response.output_audio_transcript.done"]
    assert transcript[0]["transcript"] == DEFAULT_REPLY

    response = done["response"]
    assert response["status"] == "completed" and response["output_modalities"] == ["audio"]
    assert response["audio"]["output"]["format"] == PCMU
    usage = response["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    assert usage["output_token_details"]["audio_tokens"] > 0
    assert usage["input_token_details"]["audio_tokens"] > 0
    resp = client.session.responses[0]
    assert resp.first_audio_at - resp.created_at >= 0.02  # the configured latency


def _encoded(fmt: str, speech_ms: int, silence_ms: int) -> tuple[bytes, bytes]:
    """(speech, silence) in an input format."""
    if fmt == "audio/pcm":
        return speech_pcm24k(speech_ms, seed=4), bytes(48 * silence_ms)
    if fmt == "audio/pcma":
        samples = synth_speech(speech_ms, 8000, seed=4)
        return ALAW_ENCODE[samples.view(np.uint16)].tobytes(), b"\xd5" * (8 * silence_ms)
    return speech_mulaw(speech_ms, seed=4), silence_mulaw(silence_ms)


@pytest.mark.parametrize("fmt", ["audio/pcmu", "audio/pcma", "audio/pcm"])
async def test_vad_detects_speech_in_every_input_format(sim: RealtimeSimulator, fmt: str) -> None:
    speech, silence = _encoded(fmt, 1000, 400)
    async with connect(sim) as client:
        turn = vad(create_response=False, silence_duration_ms=300)
        await client.configure(audio={"input": {"format": {"type": fmt}, "turn_detection": turn}})
        await client.append(silence + speech + silence, frame=len(silence) // 20)
        started = await client.until("input_audio_buffer.speech_started")
        stopped = await client.until("input_audio_buffer.speech_stopped")
        await client.sync()
    assert abs(started["audio_start_ms"] - (400 - 300)) <= 20
    assert 1400 + 300 - 100 <= stopped["audio_end_ms"] <= 1400 + 300 + 20
    assert "response.created" not in client.session.sent_types()  # create_response: false


async def test_input_transcription_arrives_after_commit(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(input_transcript="quero marcar uma consulta")
    async with connect(sim) as client:
        transcription = {"model": "gpt-transcribe", "language": "pt"}
        await client.configure(
            audio={"input": {"turn_detection": None, "transcription": transcription}}
        )
        await client.append(speech_pcm24k(300), frame=48 * 20)
        await client.send({"type": "input_audio_buffer.commit"})
        committed = await client.until("input_audio_buffer.committed")
        done = await client.until("conversation.item.input_audio_transcription.completed")
    assert done["item_id"] == committed["item_id"]
    assert done["transcript"] == "quero marcar uma consulta"
    assert client.session.committed[0].data["content"][0]["transcript"] == done["transcript"]


async def test_silence_never_triggers_vad(sim: RealtimeSimulator) -> None:
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, vad())
        await client.append(silence_mulaw(2000))
        await client.sync()
        assert "input_audio_buffer.speech_started" not in client.session.sent_types()
        assert client.session.audio_ms == 2000


async def test_manual_commit_needs_100ms_and_creates_no_response(sim: RealtimeSimulator) -> None:
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, None)
        await client.append(speech_mulaw(80))
        await client.send({"type": "input_audio_buffer.commit", "event_id": "evt_c1"})
        error = (await client.until("error"))["error"]
        assert error["code"] == "input_audio_buffer_commit_empty"
        assert error["event_id"] == "evt_c1"
        assert error["message"].startswith(
            "Error committing input audio buffer: buffer too small. "
            "Expected at least 100ms of audio, but buffer only has 80.00ms"
        )

        await client.append(speech_mulaw(40))
        await client.send({"type": "input_audio_buffer.commit"})
        committed = await client.until("input_audio_buffer.committed")
        added = await client.until("conversation.item.added")
        assert added["item"]["content"] == [{"type": "input_audio", "transcript": None}]
        await client.sync()
        assert len(client.session.committed[0].audio) == 8 * 120
        assert committed["item_id"] == added["item"]["id"]
        assert "response.created" not in client.session.sent_types()


async def test_one_active_response_and_cancellation(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(first_audio_latency_ms=500)  # the response stays active a while
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, None)
        await client.send({"type": "response.cancel", "event_id": "evt_c0"})
        error = (await client.until("error"))["error"]
        assert error["code"] == "response_cancel_not_active"
        assert error["message"] == "Cancellation failed: no active response found"
        assert error["event_id"] == "evt_c0"

        await client.send({"type": "response.create"})
        created = await client.until("response.created")
        await client.send({"type": "response.create", "event_id": "evt_r2"})
        error = (await client.until("error"))["error"]
        assert error["code"] == "conversation_already_has_active_response"
        assert error["event_id"] == "evt_r2"
        assert created["response"]["id"] in error["message"]

        await client.send({"type": "response.cancel"})
        done = (await client.until("response.done"))["response"]
        assert done["id"] == created["response"]["id"]
        assert done["status"] == "cancelled"
        assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert "response.output_audio.delta" not in [e["type"] for e in client.events]


async def test_truncate_checks_generated_audio(sim: RealtimeSimulator) -> None:
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, None)
        await client.send({"type": "response.create"})
        item_id = (await client.until("response.output_item.added"))["item"]["id"]
        await client.until("response.done")
        generated_ms = len(audio_of(client.events)) // 8

        over = generated_ms + 60
        await client.send(_truncate(item_id, over, "evt_t1"))
        error = (await client.until("error"))["error"]
        assert (
            error["message"]
            == f"Audio content of {generated_ms}ms is already shorter than {over}ms"
        )
        assert error["event_id"] == "evt_t1"

        await client.send(_truncate(item_id, 1000))
        truncated = await client.until("conversation.item.truncated")
        assert truncated | {"event_id": ""} == {
            "type": "conversation.item.truncated",
            "event_id": "",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 1000,
        }
        item = client.session.conversation.get(item_id)
        assert item is not None and len(item.audio) == 8000
        transcript = item.data["content"][0]["transcript"]
        assert transcript and DEFAULT_REPLY.startswith(transcript) and transcript != DEFAULT_REPLY

        await client.send(_truncate("item_nope", 10))
        assert (await client.until("error"))["error"]["param"] == "item_id"


def _truncate(item_id: str, end_ms: int, event_id: str = "evt_t") -> dict:
    return {
        "type": "conversation.item.truncate",
        "event_id": event_id,
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": end_ms,
    }


async def test_barge_in_cancels_the_response_with_turn_detected(
    make_sim: Callable[..., Any],
) -> None:
    sim = await make_sim(speed=2.0)  # ~3 s to stream the reply: time to interrupt it
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, vad())
        await client.append(user_turn())
        first = await client.until("response.output_audio.delta")
        await client.append(speech_mulaw(600, seed=2))
        barge = await client.until("input_audio_buffer.speech_started")
        done = (await client.until("response.done"))["response"]
        await client.append(silence_mulaw(700))  # the second turn ends: a new response
        await client.until("response.created")

    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert barge["audio_start_ms"] >= 2900 - 300
    after = client.types()[client.types().index("input_audio_buffer.speech_started", 5) :]
    assert after[:7] == [
        "input_audio_buffer.speech_started",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    [item] = done["output"]
    assert item["id"] == first["item_id"] and item["status"] == "incomplete"
    partial = audio_of(client.events, first["item_id"])
    assert 0 < len(partial) < 8 * reply_duration_ms(DEFAULT_REPLY, sim.config)


async def test_idle_timeout_commits_silence_and_answers(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(reply_text="Sim.", min_reply_ms=400, speed=float("inf"))
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, vad(idle_timeout_ms=1000))
        await client.send({"type": "response.create"})
        await client.until("response.done")
        await client.append(silence_mulaw(1500))
        timeout = await client.until("input_audio_buffer.timeout_triggered")
        committed = await client.until("input_audio_buffer.committed")
        await client.until("response.created")

    # Armed where the 400 ms reply finished playing on the audio timeline (0 + 400).
    assert timeout["audio_start_ms"] == 400
    assert timeout["audio_end_ms"] == 1400
    assert committed["item_id"] == timeout["item_id"]


async def test_text_modality_streams_output_text(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        await client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
        done = await client.until("response.done")
        text_done = next(e for e in client.events if e["type"] == "response.output_text.done")
        assert text_done["text"] == DEFAULT_REPLY
        deltas = [e["delta"] for e in client.events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas) == DEFAULT_REPLY
        # a token a delta at the text rate, not paced like audio (2 characters per 125 ms)
        assert len(deltas) == -(-len(DEFAULT_REPLY) // 4) and max(map(len, deltas)) <= 4
        assert not audio_of(client.events)
        assert done["response"]["output"][0]["content"] == [
            {"type": "output_text", "text": DEFAULT_REPLY}
        ]


async def test_default_pcm24k_output_and_out_of_band_response(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        await client.send({"type": "response.create"})
        await client.send(
            {
                "type": "response.create",
                "response": {"conversation": "none", "metadata": {"purpose": "summary"}},
            }
        )
        dones = [await client.until("response.done"), await client.until("response.done")]
    by_conv = {d["response"]["conversation_id"] is None: d["response"] for d in dones}
    assert by_conv[True]["metadata"] == {"purpose": "summary"}  # ran in parallel, no error
    audio = audio_of(client.events, by_conv[False]["output"][0]["id"])
    assert len(audio) == 48 * reply_duration_ms(DEFAULT_REPLY, sim.config)
    assert len(client.session.conversation) == 1  # the out-of-band item stays outside


async def test_conversation_items_and_reply_function(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(reply=lambda session, item: f"Disseste: {item.text()}")
    async with connect(sim) as client:
        user = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Olá"}],
        }
        await client.send({"type": "conversation.item.create", "item": user})
        added = await client.until("conversation.item.added")
        assert added["previous_item_id"] is None and added["item"]["role"] == "user"
        user_id = added["item"]["id"]

        await client.send(
            {
                "type": "conversation.item.create",
                "event_id": "e1",
                "previous_item_id": "nope",
                "item": user,
            }
        )
        error = (await client.until("error"))["error"]
        assert (error["param"], error["event_id"]) == ("previous_item_id", "e1")

        system = {
            "type": "message",
            "role": "system",
            "content": [{"type": "input_text", "text": "S"}],
        }
        await client.send(
            {"type": "conversation.item.create", "previous_item_id": "root", "item": system}
        )
        assert (await client.until("conversation.item.done"))["previous_item_id"] is None
        assert client.session.conversation.order[1] == user_id

        await client.send({"type": "response.create"})
        transcript = await client.until("response.output_audio_transcript.done")
        assert transcript["transcript"] == "Disseste: Olá"
        await client.until("response.done")

        await client.send({"type": "conversation.item.retrieve", "item_id": transcript["item_id"]})
        retrieved = (await client.until("conversation.item.retrieved"))["item"]
        assert (
            base64.b64decode(retrieved["content"][0]["audio"]) == client.session.responses[0].audio
        )

        await client.send(_truncate(user_id, 0))
        error = (await client.until("error"))["error"]
        assert error["message"] == "Only model output audio messages can be truncated"

        await client.send({"type": "conversation.item.delete", "item_id": user_id})
        assert (await client.until("conversation.item.deleted"))["item_id"] == user_id
        await client.send({"type": "conversation.item.delete", "item_id": user_id})
        assert (await client.until("error"))["error"]["param"] == "item_id"


async def test_voice_is_frozen_after_audio_output(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        assert (await client.configure(audio={"output": {"voice": "cedar"}}))["audio"]["output"][
            "voice"
        ] == "cedar"
        await client.send({"type": "response.create"})
        await client.until("response.done")
        await client.send(
            {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
            }
        )
        error = (await client.until("error"))["error"]
        assert error["code"] == "cannot_update_voice"
        assert client.session.config["audio"]["output"]["voice"] == "cedar"


async def test_oversized_append_is_an_error(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        big = base64.b64encode(bytes(MAX_APPEND_BYTES + 2)).decode()
        await client.send({"type": "input_audio_buffer.append", "event_id": "big", "audio": big})
        error = (await client.until("error", within=10))["error"]
        assert (error["param"], error["event_id"]) == ("audio", "big")
        assert client.session.audio_ms == 0


# ---- function calls --------------------------------------------------------------------

CALL_ID = re.compile(r"^call_[A-Za-z0-9]{16}$")


def function_tool(name: str) -> dict:
    parameters = {"type": "object", "properties": {"reason": {"type": "string"}}}
    return {"type": "function", "name": name, "description": name, "parameters": parameters}


def user_text(text: str) -> dict:
    content = [{"type": "input_text", "text": text}]
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": content},
    }


def call_output(call_id: str, output: str, event_id: str = "evt_out") -> dict:
    item = {"type": "function_call_output", "call_id": call_id, "output": output}
    return {"type": "conversation.item.create", "event_id": event_id, "item": item}


def since(client: Client, start: int) -> list[dict]:
    return [e for e in client.events[start:] if not e["type"].endswith(".delta")]


async def test_function_call_streams_the_real_events_and_its_output_is_answered(
    make_sim: Callable[..., Any],
) -> None:
    def reply(session: SimSession, item: Any) -> str:
        if item is not None and item.kind == "function_call_output":
            return f"Resultado: {item.text()}"
        return "Olá"

    knob = SimToolCall("end_call", {"reason": "despedida do cliente"}, "TCHAU", "Até logo!")
    sim = await make_sim(reply=reply, tool_calls=[knob])
    async with connect(sim) as client:
        await client.configure(tools=[function_tool("end_call")])
        await client.send(user_text("Obrigado, tchau!"))
        await client.until("conversation.item.done")
        start = len(client.events)
        await client.send({"type": "response.create"})
        done = (await client.until("response.done"))["response"]
        events = since(client, start)
        for event in client.events[start:]:
            check_server_event(event)

        assert [e["type"] for e in events] == [
            *SPOKEN_REPLY,
            "response.output_item.added",
            "conversation.item.added",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        assert events[6]["transcript"] == "Até logo!"
        added = events[10]
        call_id, item_id = added["item"]["call_id"], added["item"]["id"]
        assert CALL_ID.match(call_id)
        assert added == {
            "type": "response.output_item.added",
            "event_id": added["event_id"],
            "response_id": done["id"],
            "output_index": 1,
            "item": {
                "id": item_id,
                "type": "function_call",
                "object": "realtime.item",
                "status": "in_progress",
                "name": "end_call",
                "call_id": call_id,
                "arguments": "",
            },
        }
        arguments = '{"reason":"despedida do cliente"}'
        deltas = [e for e in client.events if e["type"] == "response.function_call_arguments.delta"]
        assert len(deltas) >= 2 and "".join(d["delta"] for d in deltas) == arguments
        assert {(d["item_id"], d["call_id"], d["output_index"]) for d in deltas} == {
            (item_id, call_id, 1)
        }
        args_done = events[12]
        assert args_done == {
            "type": "response.function_call_arguments.done",
            "event_id": args_done["event_id"],
            "response_id": done["id"],
            "item_id": item_id,
            "output_index": 1,
            "call_id": call_id,
            "name": "end_call",
            "arguments": arguments,
        }
        assert events[13]["item"] == added["item"] | {"status": "completed", "arguments": arguments}
        assert events[14]["previous_item_id"] == events[8]["item"]["id"]  # after the message
        assert [o["type"] for o in done["output"]] == ["message", "function_call"]
        assert done["output"][1] == events[13]["item"] and done["status"] == "completed"
        assert done["usage"]["output_token_details"]["text_tokens"] > len("Até logo!") / 4
        [record] = client.session.tool_calls
        assert (record.call_id, record.name, record.arguments, record.status) == (
            call_id,
            "end_call",
            arguments,
            "completed",
        )

        await client.send(call_output(call_id, '{"ok":true}'))
        output_item = (await client.until("conversation.item.done"))["item"]
        assert output_item["type"] == "function_call_output" and output_item["call_id"] == call_id
        await client.send({"type": "response.create"})
        answer = await client.until("response.output_audio_transcript.done")
        assert answer["transcript"] == 'Resultado: {"ok":true}'  # the reply fn saw the output
        answered = (await client.until("response.done"))["response"]
        assert [o["type"] for o in answered["output"]] == ["message"]  # no second call

        [received] = client.session.tool_outputs
        assert received[:3] == (call_id, "end_call", '{"ok":true}')
        assert received.at >= record.done_at and record.output == '{"ok":true}'
    assert client.session.tool_violations == [] and client.session.tool_calls_refused == []


async def test_output_for_an_unknown_call_is_the_servers_error(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        await client.send(call_output("call_nope", "x", "evt_bad"))
        error = await client.until("error")
        assert error["error"] == {
            "type": "invalid_request_error",
            "code": "invalid_tool_call_id",
            "message": "Tool call ID 'call_nope' not found in conversation.",
            "param": None,
            "event_id": "evt_bad",
        }
        await client.sync()
        assert len(client.session.conversation) == 0 and client.session.tool_outputs == []
        [violation] = client.session.tool_violations
        assert (violation.kind, violation.call_id) == (ToolLedger.UNKNOWN_CALL_ID, "call_nope")

        # A function_call the client created itself (history replayed) takes an output.
        call = {"type": "function_call", "name": "f", "call_id": "call_old", "arguments": "{}"}
        await client.send({"type": "conversation.item.create", "item": call})
        await client.send(call_output("call_old", "done"))
        await client.sync()
        assert [o[:3] for o in client.session.tool_outputs] == [("call_old", "f", "done")]


async def test_parallel_calls_and_what_the_client_got_wrong(make_sim: Callable[..., Any]) -> None:
    knobs = [SimToolCall("lookup", {"q": "fazenda"}), SimToolCall("save_lead", '{"nome":')]
    sim = await make_sim(tool_calls=knobs)
    async with connect(sim) as client:
        await client.configure(tools=[function_tool("lookup"), function_tool("save_lead")])
        await client.send({"type": "response.create"})
        done = (await client.until("response.done"))["response"]
        first, second = done["output"]  # no message: calls only, in parallel
        assert (first["name"], second["name"]) == ("lookup", "save_lead")
        assert second["arguments"] == '{"nome":'  # a str knob goes out verbatim, even broken
        assert "response.output_audio.delta" not in client.types()
        indexes = [
            e["output_index"]
            for e in client.events
            if e["type"] == "response.function_call_arguments.done"
        ]
        assert indexes == [0, 1]

        await client.send(call_output(first["call_id"], "3 fazendas"))
        await client.send({"type": "response.create"})  # save_lead still has no output
        await client.until("response.done")
        await client.send(call_output(second["call_id"], "ok"))
        await client.send(call_output(second["call_id"], "ok again"))
        await client.sync()

    session = client.session
    await session.wait_for(lambda: session.closed)
    kinds = [(v.kind, v.call_id) for v in session.tool_violations]
    assert kinds == [
        (ToolLedger.RESPONSE_BEFORE_OUTPUT, second["call_id"]),
        (ToolLedger.DUPLICATE_OUTPUT, second["call_id"]),
        (ToolLedger.OUTPUT_WITHOUT_RESPONSE, second["call_id"]),  # at close
    ]
    assert [c.output for c in session.tool_calls] == ["3 fazendas", "ok"]
    assert len(session.responses) == 2  # the knobs fire once: the answer made no call


async def test_caller_turn_before_the_output_and_a_call_left_at_close(
    make_sim: Callable[..., Any],
) -> None:
    knob = SimToolCall("transfer_to_human", {}, trigger="falar com o endrigo")
    sim = await make_sim(tool_calls=[knob], input_transcript="Quero FALAR com o Endrigo já")
    async with contextlib.AsyncExitStack() as stack:
        client = await pcmu_client(stack, sim, vad())
        await client.configure(tools=[function_tool("transfer_to_human")])
        await client.append(user_turn())
        done = (await client.until("response.done"))["response"]
        [call] = done["output"]
        assert (call["name"], call["arguments"]) == ("transfer_to_human", "{}")
        await client.append(user_turn(lead_ms=200))  # speaks again: the call has no output
        await client.until("input_audio_buffer.speech_started")
        await client.until("response.done")
        session = client.session
    await session.wait_for(lambda: session.closed)
    assert [(v.kind, v.call_id) for v in session.tool_violations] == [
        (ToolLedger.TURN_BEFORE_OUTPUT, call["call_id"]),
        (ToolLedger.NO_OUTPUT_AT_CLOSE, call["call_id"]),
    ]
    assert session.tool_violations[0].detail.startswith("the caller started speaking")


async def test_a_function_the_session_does_not_offer_is_never_called(
    make_sim: Callable[..., Any],
) -> None:
    knobs = [
        SimToolCall("end_call", {}),  # not offered
        SimToolCall("lookup", {"q": "a"}, trigger=lambda s, item: item is not None, once=False),
    ]
    sim = await make_sim(tool_calls=knobs)
    async with connect(sim) as client:
        await client.configure(tools=[function_tool("lookup")], parallel_tool_calls=False)
        await client.send(user_text("oi"))
        await client.send({"type": "response.create"})
        done = (await client.until("response.done"))["response"]
        assert [o.get("name") for o in done["output"]] == ["lookup"]

        await client.send(call_output(done["output"][0]["call_id"], "nada"))
        await client.send({"type": "response.create", "response": {"tool_choice": "none"}})
        done = (await client.until("response.done"))["response"]
        assert [o["type"] for o in done["output"]] == ["message"]  # a plain reply
        forced = {"type": "function", "name": "other"}
        await client.send({"type": "response.create", "response": {"tool_choice": forced}})
        await client.until("response.done")

    refused = [(r.name, r.reason) for r in client.session.tool_calls_refused]
    assert refused == [
        ("end_call", "not offered"),
        ("lookup", "tool_choice is 'none'"),
        ("lookup", "tool_choice forces 'other'"),
    ]
    assert [c.name for c in client.session.tool_calls] == ["lookup"]


# ---- closing ---------------------------------------------------------------------------


async def test_max_session_duration_closes_1001(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(max_session_s=0.3)
    async with connect(sim) as client:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await client.recv(within=3)
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, MAX_DURATION_MESSAGE)
    session = sim.sessions[0]
    await session.wait_for(lambda: session.closed, timeout=3)
    assert session.close_code == 1001 and session.closed_at - session.opened_at >= 0.3


async def test_drop_and_abort_look_like_upstream_failures(sim: RealtimeSimulator) -> None:
    async with connect(sim) as client:
        await client.session.drop()
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    async with connect(sim) as client:
        client.session.abort()
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
        assert info.value.rcvd is None  # no close frame: 1006
    assert all(s.closed for s in sim.sessions)


async def test_many_concurrent_sessions(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(speed=float("inf"), first_audio_latency_ms=0, record_audio=False)
    turn = user_turn(lead_ms=200, speech_ms=800, tail_ms=600)

    async def call() -> str:
        async with contextlib.AsyncExitStack() as stack:
            client = await pcmu_client(stack, sim, vad())
            await client.append(turn, frame=FRAME * 5)
            return (await client.until("response.done", within=10))["response"]["status"]

    assert await asyncio.gather(*(call() for _ in range(30))) == ["completed"] * 30
    assert all(not s.input_audio for s in sim.sessions)


# ---- strict client-event validation (no sockets) ---------------------------------------

GA_SESSION_UPDATE = {
    "type": "session.update",
    "event_id": "evt_1",
    "session": {
        "type": "realtime",
        "model": "gpt-realtime-2.1",
        "instructions": "...",
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": {"type": "audio/pcmu"},
                "noise_reduction": {"type": "far_field"},
                "transcription": {"model": "gpt-transcribe", "language": "en"},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 500,
                    "create_response": True,
                    "interrupt_response": True,
                    "idle_timeout_ms": 8000,
                },
            },
            "output": {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.0},
        },
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "truncation": {
            "type": "retention_ratio",
            "retention_ratio": 0.8,
            "token_limits": {"post_instructions": 1000},
        },
        "reasoning": {"effort": "low"},
        "parallel_tool_calls": True,
        "prompt": {"id": "pmpt_123"},
        "tracing": "auto",
        "include": ["item.input_audio_transcription.logprobs"],
    },
}


def test_check_client_event_accepts_the_full_ga_session_update() -> None:
    event = check_client_event(GA_SESSION_UPDATE)
    assert type(event).__name__ == "SessionUpdateEvent"


def _session(**fields: Any) -> dict:
    return {"type": "session.update", "event_id": "e", "session": {"type": "realtime", **fields}}


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        (
            _session(input_audio_format="g711_ulaw"),
            "unknown_parameter",
            "session.input_audio_format",
        ),
        (_session(voice="alloy"), "unknown_parameter", "session.voice"),
        (_session(modalities=["audio"]), "unknown_parameter", "session.modalities"),
        (_session(temperature=0.8), "unknown_parameter", "session.temperature"),
        (_session(turn_detection=None), "unknown_parameter", "session.turn_detection"),
        (
            _session(audio={"input": {"format": {"type": "audio/pcmu", "rate": 8000}}}),
            "unknown_parameter",
            "session.audio.input.format.rate",
        ),
        (
            _session(audio={"input": {"format": "g711_ulaw"}}),
            "invalid_type",
            "session.audio.input.format",
        ),
        (
            _session(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}}),
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            _session(
                audio={"input": {"turn_detection": {"type": "semantic_vad", "idle_timeout_ms": 1}}}
            ),
            "unknown_parameter",
            "session.audio.input.turn_detection.idle_timeout_ms",
        ),
        (
            _session(tools=[{"type": "function", "name": "f", "meta": {}}]),
            "unknown_parameter",
            "session.tools[0].meta",
        ),
        (
            {"type": "session.update", "session": {"model": "x"}},
            "missing_required_parameter",
            "session.type",
        ),
        ({"type": "response.audio.delta"}, "invalid_value", "type"),
        (
            {"type": "response.create", "response": {"modalities": ["text"]}},
            "unknown_parameter",
            "response.modalities",
        ),
        (
            {
                "type": "conversation.item.truncate",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": "5",
            },
            "invalid_type",
            "audio_end_ms",
        ),
        (
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "bot", "content": []},
            },
            "invalid_value",
            "item.role",
        ),
    ],
)
def test_check_client_event_rejects_beta_and_malformed_events(
    event: dict, code: str, param: str
) -> None:
    with pytest.raises(ClientEventError) as info:
        check_client_event(event)
    assert (info.value.code, info.value.param) == (code, param)
    assert param in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.event_id == event.get("event_id")


def test_check_client_event_accepts_item_references_in_response_input() -> None:
    ref = {"type": "item_reference", "id": "item_1"}
    check_client_event(
        {"type": "response.create", "response": {"conversation": "none", "input": [ref]}}
    )


def test_check_server_event_allows_real_session_fields_only() -> None:
    session = {"type": "realtime", "object": "realtime.session", "id": "sess_1", "expires_at": 1}
    check_server_event({"type": "session.created", "event_id": "e", "session": session})
    with pytest.raises(ServerEventError) as info:
        check_server_event(
            {"type": "response.done", "event_id": "e", "response": {"temperature": 1}}
        )
    assert info.value.param == "response.temperature"
