"""The GPT-Live simulator over real loopback sockets, driven by the official SDK.

Every server event the simulator emits is validated against the SDK's Live types (and the
Responses events nested in `response.event` against the Responses types) when each
simulator is closed (see `make_sim`), so no test can pass on a malformed event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from openai import AsyncOpenAI
from websockets.exceptions import ConnectionClosed

from simulators.live import LiveSession, LiveSimConfig, LiveSimulator, voice_audio
from simulators.live_config import DEFAULT_REPLY
from simulators.live_events import (
    ClientEventError,
    check_client_event,
    check_responses_event,
    check_server_event,
)
from simulators.realtime_audio import reply_audio, window_power
from simulators.speech import silence_mulaw, speech_mulaw, speech_pcm24k, synth_speech

MODEL = "gpt-live-1"
PCMU = {"type": "audio/pcmu", "rate": 8000}
PCM24K = {"type": "audio/pcm", "rate": 24000}
FRAME = 160  # 20 ms of mu-law
# What the sim may send on a primary socket in these tests; no interruption event exists.
SPOKEN = {
    "session.started",
    "session.input_transcript.delta",
    "session.output_audio.delta",
    "session.output_transcript.delta",
    "session.usage.updated",
}


# ---- fixtures and helpers --------------------------------------------------------------


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    """Start simulators with config overrides; on teardown validate every event they sent."""
    sims: list[LiveSimulator] = []

    async def make(**overrides: Any) -> LiveSimulator:
        fast = {"first_audio_latency_ms": 20, "speed": 100.0, "transcription_latency_ms": 20}
        sim = LiveSimulator(LiveSimConfig(**{**fast, **overrides}))
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
                if timed.event["type"] == "response.event":
                    check_responses_event(timed.event["event"])


@pytest.fixture
async def sim(make_sim: Callable[..., Any]) -> LiveSimulator:
    return await make_sim()


class Client:
    """The SDK connection, reading every server event as a plain dict."""

    def __init__(self, conn: Any, session: LiveSession) -> None:
        self.conn = conn
        self.session = session  # the simulator's side of this connection
        self.events: list[dict] = []

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
            await self.conn.session.input_audio.append(audio=chunk)

    def of(self, event_type: str) -> list[dict]:
        return [e for e in self.events if e["type"] == event_type]

    def text(self, event_type: str) -> str:
        return "".join(e["delta"] for e in self.of(event_type))

    def audio(self) -> bytes:
        return b"".join(base64.b64decode(e["delta"]) for e in self.of("session.output_audio.delta"))


@contextlib.asynccontextmanager
async def connect(sim: LiveSimulator, **session: Any) -> AsyncIterator[Client]:
    """An SDK connection whose session has started (`session` overrides the config)."""
    openai = AsyncOpenAI(api_key="sk-test", base_url=sim.base_url)
    count = len(sim.sessions) + 1
    async with openai.live.connect() as conn:
        client = Client(conn, await sim.wait_for_session(count=count))
        await conn.session.start(session={"model": MODEL, **session}, event_id="evt_start")
        await client.until("session.started")
        yield client


def user_turn(lead_ms: int = 600, speech_ms: int = 1500, tail_ms: int = 800) -> bytes:
    return silence_mulaw(lead_ms) + speech_mulaw(speech_ms, seed=1) + silence_mulaw(tail_ms)


def duration_ms(text: str, cfg: LiveSimConfig) -> int:
    return max(cfg.min_reply_ms, min(cfg.max_reply_ms, int(len(text) * cfg.ms_per_char)))


def is_speech(audio: bytes, fmt_type: str, window: int) -> bool:
    powers = window_power(audio, fmt_type, window)
    return bool(np.mean(powers > (32768 * 10 ** (-35 / 20)) ** 2) > 0.6)


# ---- a phone call ----------------------------------------------------------------------


async def test_phone_turn_in_pcmu_is_answered_in_the_sims_voice(sim: LiveSimulator) -> None:
    seeded = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Oi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Olá!"}]},
    ]
    config = {"instructions": "Fale português.", "input": seeded}
    async with connect(sim, audio={"format": PCMU, "output": {"voice": "cedar"}}, **config) as c:
        started = c.events[0]
        await c.append(user_turn(lead_ms=600, speech_ms=1500, tail_ms=800))
        usage = await c.until("session.usage.updated")
    session = c.session

    resource = started["session"]
    assert started["client_event_id"] == "evt_start"
    assert resource["id"] == session.id and resource["status"] == "active"
    assert resource["model"] == MODEL and resource["instructions"] == "Fale português."
    assert resource["audio"] == {"format": PCMU, "output": {"voice": "cedar"}}
    assert session.headers["Authorization"] == "Bearer sk-test" and session.query == {}

    # The caller's words: the first soon after the speech starts, the rest after it ends,
    # timed on the session timeline (speech at 600..2100 ms of the input audio).
    heard = c.of("session.input_transcript.delta")
    assert [e["delta"] for e in heard] == ["(fala", " do cliente)"]
    assert abs(heard[0]["start_ms"] - 600) <= 40 and abs(heard[-1]["end_ms"] - 2100) <= 40

    # The reply: the Realtime simulator's voice, byte for byte, in 1000-byte mu-law deltas.
    full_ms = duration_ms(DEFAULT_REPLY, sim.config)
    assert c.audio() == voice_audio(PCMU, full_ms) == reply_audio("audio/pcmu", full_ms)
    assert is_speech(c.audio(), "audio/pcmu", FRAME)
    assert len(base64.b64decode(c.of("session.output_audio.delta")[0]["delta"])) == 1000
    assert c.text("session.output_transcript.delta") == DEFAULT_REPLY
    spoken = c.of("session.output_transcript.delta")
    [reply] = session.replies
    assert spoken[0]["start_ms"] == reply.start_ms >= heard[-1]["end_ms"]
    assert spoken[-1]["end_ms"] == int(reply.start_ms + full_ms)
    assert all("event_id" not in e for e in c.of("session.output_audio.delta"))
    assert {e["type"] for e in c.events} == SPOKEN

    assert usage["usage"]["seconds"] >= 1.0
    assert 0 < usage["context_window"]["usage_ratio"] < 1
    history = [(i.role, i.source, i.text, i.status) for i in session.history]
    assert history == [
        ("user", "input", "Oi", "completed"),
        ("assistant", "input", "Olá!", "completed"),
        ("user", "speech", "(fala do cliente)", "completed"),
        ("assistant", "reply", DEFAULT_REPLY, "completed"),
    ]
    assert len(session.input_audio) == 8 * 2900
    assert len(session.client_events("session.input_audio.append")) == 2900 // 20


async def test_barge_in_stops_the_output_and_keeps_what_was_played(
    make_sim: Callable[..., Any],
) -> None:
    sim = await make_sim(speed=2.0)  # ~2.8 s to stream the reply: time to interrupt it
    async with connect(sim, audio={"format": PCMU}) as c:
        turn = user_turn()
        await c.append(turn, frame=len(turn))  # one append: the reply starts at 2900 ms
        for _ in range(3):  # 375 ms of the reply sent
            await c.until("session.output_audio.delta")
        await c.append(silence_mulaw(200) + speech_mulaw(600, seed=2), frame=8 * 800)
        barge = await c.until("session.input_transcript.delta")
        tail = silence_mulaw(700)
        await c.append(tail, frame=len(tail))  # the caller's second turn ends: a new reply
        await c.until("session.output_transcript.delta")
        first, second = await c.session.wait_for(
            lambda: c.session.replies[1:] and c.session.replies
        )
    session = c.session

    # No event says "interrupted": the first reply's deltas stop, the barge-in's words follow.
    assert {e["type"] for e in c.events} <= SPOKEN
    assert first.status == "interrupted" and first.start_ms == 2900
    assert 200 <= first.played_ms <= 260  # the caller spoke 200 ms (+ a window) into it
    assert barge["start_ms"] == int(first.start_ms + first.played_ms)
    full_ms = duration_ms(DEFAULT_REPLY, sim.config)
    before_barge = c.events[: c.events.index(barge)]
    sent = b"".join(
        base64.b64decode(e["delta"])
        for e in before_barge
        if e["type"] == "session.output_audio.delta"
    )
    assert sent == bytes(first.audio) and 375 * 8 <= len(sent) < 8 * full_ms
    said = "".join(
        e["delta"] for e in before_barge if e["type"] == "session.output_transcript.delta"
    )
    assert said == first.sent_text and DEFAULT_REPLY.startswith(said) and said != DEFAULT_REPLY

    # The model's context keeps what was played, not what was sent.
    kept = DEFAULT_REPLY[: int(len(DEFAULT_REPLY) * first.played_ms / full_ms)]
    assert first.item is not None and (first.item.text, first.item.status) == (kept, "incomplete")
    assert [i.source for i in session.history] == ["speech", "reply", "speech", "reply"]
    assert second.start_ms == 2900 + 800 + 700  # where the input was when it began


# ---- voice notes: manual turns ---------------------------------------------------------


async def test_voice_note_through_responses_delegation_is_answered_aloud(
    make_sim: Callable[..., Any],
) -> None:
    sim = await make_sim(reply=lambda session, item: f"Recebi: {item.text}" if item else "?")
    delegation = {"type": "responses", "responses": {"model": "gpt-5.5"}}
    async with connect(sim, audio={"format": PCM24K}, delegation=delegation) as c:
        note = {"type": "input_text", "text": "Quanto custa o plano?"}
        await c.conn.response.item.create(
            item={"type": "message", "role": "user", "content": [note]}, event_id="evt_item"
        )
        await c.conn.response.create(event_id="evt_go")
        await c.until("session.usage.updated")
        update = {"type": "responses", "responses": {"tool_choice": "none"}}
        await c.conn.session.update(session={"delegation": update})
        updated = (await c.until("session.updated"))["session"]["delegation"]
        await c.conn.session.update(session={"delegation": {"type": "client"}}, event_id="evt_u")
        refused = (await c.until("error"))["error"]

    answer = "Recebi: Quanto custa o plano?"
    nested = [e["event"] for e in c.of("response.event")]
    assert [e["type"] for e in nested] == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(e["client_event_id"] == "evt_go" for e in c.of("response.event"))
    assert (
        "".join(e["delta"] for e in nested if e["type"] == "response.output_text.delta") == answer
    )
    assert nested[-1]["response"]["model"] == "gpt-5.5"
    assert [e["sequence_number"] for e in nested] == list(range(len(nested)))

    # Then the voice model says it, at 24 kHz, in the simulator's voice.
    assert c.text("session.output_transcript.delta") == answer
    assert c.audio() == reply_audio("audio/pcm", duration_ms(answer, sim.config))
    assert is_speech(c.audio(), "audio/pcm", 960)
    assert c.session.backend_items == [{"type": "message", "role": "user", "content": [note]}]
    # A sparse update keeps the rest; the delegation type cannot change.
    assert updated == {
        "type": "responses",
        "responses": {"model": "gpt-5.5", "tool_choice": "none"},
    }
    assert (refused["param"], refused["client_event_id"]) == ("session.delegation.type", "evt_u")
    [reply] = c.session.replies
    assert reply.cause == "backend" and reply.trigger is not None
    assert reply.trigger.text == "Quanto custa o plano?"


async def test_voice_note_as_audio_in_pcm16k_without_delegation(sim: LiveSimulator) -> None:
    pcm16k = {"type": "audio/pcm", "rate": 16000}
    note = synth_speech(1200, 16000, seed=3).astype("<i2").tobytes() + bytes(32 * 800)
    async with connect(sim, audio={"format": pcm16k}) as c:
        await c.append(note, frame=len(note))  # faster than real time: all at once
        await c.until("session.usage.updated")
        await c.conn.response.create(event_id="evt_no_backend")
        error = (await c.until("error"))["error"]

    full_ms = duration_ms(DEFAULT_REPLY, sim.config)
    assert len(c.audio()) == 32 * full_ms and is_speech(c.audio(), "audio/pcm", 640)
    assert c.audio() == voice_audio(pcm16k, full_ms)
    [turn] = [i for i in c.session.history if i.source == "speech"]
    assert abs(turn.start_ms) <= 40 and abs(turn.end_ms - 1200) <= 40
    assert (error["code"], error["param"], error["client_event_id"]) == (
        "delegation_required",
        "type",
        "evt_no_backend",
    )


# ---- context, mute, fixtures -----------------------------------------------------------


async def test_appended_context_mute_and_an_audio_fixture(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(reply=lambda session, item: item.text if item else "")
    async with connect(sim, audio={"format": PCMU}) as c:
        await c.append(silence_mulaw(400), frame=8 * 400)
        await c.conn.session.thinking.append(content="Seja breve.", delegation_id=None)
        ack = await c.until("session.thinking.appended")  # silent: no reply
        await c.conn.session.commentary.append(
            content="Bom dia! Aqui é o Endrigo.", delegation_id=None
        )
        await c.until("session.commentary.appended")
        await c.until("session.usage.updated")  # the commentary was said

        await c.conn.session.input_audio.mute(event_id="evt_mute")
        muted = await c.until("session.input_audio.muted")
        await c.append(speech_mulaw(800, seed=5) + silence_mulaw(700), frame=8 * 1500)
        await c.conn.session.input_audio.unmute()
        await c.until("session.input_audio.unmuted")

        fixture = speech_pcm24k(500, seed=6)
        await c.conn.session.output_audio.fixture.play(audio=base64.b64encode(fixture).decode())
        await c.until("session.output_audio.fixture.playing")
        await c.until("session.output_audio.fixture.played")

    assert (ack["start_ms"], ack["end_ms"]) == (400, 400)
    assert muted["client_event_id"] == "evt_mute"
    said = c.events[: c.events.index(muted)]
    assert "".join(e["delta"] for e in said if "output_transcript" in e["type"]) == (
        "Bom dia! Aqui é o Endrigo."
    )
    # Muted speech reached the model as silence: no turn, no reply.
    assert [i.source for i in c.session.history] == ["thinking", "commentary", "reply"]
    fixture_deltas = c.events[c.events.index(muted) :]
    played = b"".join(
        base64.b64decode(e["delta"])
        for e in fixture_deltas
        if e["type"] == "session.output_audio.delta"
    )
    assert len(played) == 8 * 500 and is_speech(played, "audio/pcmu", FRAME)


# ---- strict validation, auth, limits ---------------------------------------------------


async def test_invalid_events_are_errors_worded_like_the_server(sim: LiveSimulator) -> None:
    async def exchange(ws: aiohttp.ClientWebSocketResponse, event: Any) -> dict:
        await ws.send_str(event if isinstance(event, str) else orjson.dumps(event).decode())
        return orjson.loads((await ws.receive(timeout=3)).data)

    headers = {"Authorization": "Bearer sk-test"}
    start = {"type": "session.start", "session": {"model": MODEL}}
    async with aiohttp.ClientSession() as http, http.ws_connect(sim.ws_url, headers=headers) as ws:
        early = await exchange(
            ws, {"type": "session.input_audio.append", "audio": "", "event_id": "e0"}
        )
        voice = await exchange(
            ws, {**start, "event_id": "e1", "session": {"model": MODEL, "voice": "x"}}
        )
        rate = {"model": MODEL, "audio": {"format": {"type": "audio/pcmu", "rate": "8000"}}}
        wrong_type = await exchange(ws, {**start, "session": rate})
        beta = await exchange(ws, {"type": "input_audio_buffer.append", "audio": ""})
        started = await exchange(ws, start)
        again = await exchange(ws, start)
        no_delegation_id = await exchange(
            ws, {"type": "session.instructions.append", "content": "x", "event_id": "e5"}
        )
        bad_json = await exchange(ws, "{not json")
        decision = await exchange(ws, {"type": "decision.create", "event_id": "e7"})

    assert early["error"]["code"] == "session_not_started"
    assert voice["error"] == {
        "type": "invalid_request_error",
        "code": "unknown_parameter",
        "message": "Unknown parameter: 'session.voice'.",
        "param": "session.voice",
        "client_event_id": "e1",
    }
    assert voice["client_event_id"] == "e1"
    assert wrong_type["error"]["message"] == (
        "Invalid type for 'session.audio.format.rate': expected an integer, "
        "but got a string instead."
    )
    assert beta["error"]["code"] == "invalid_value" and beta["error"]["param"] == "type"
    assert beta["error"]["message"].startswith("Invalid value: 'input_audio_buffer.append'.")
    assert started["type"] == "session.started"
    assert again["error"]["code"] == "session_already_started"
    assert no_delegation_id["error"]["message"] == "Missing required parameter: 'delegation_id'."
    assert bad_json["error"]["code"] == "invalid_json"
    assert decision["error"]["code"] == "not_simulated"
    assert len(sim.sessions[0].errors) == 8


async def test_missing_auth_is_401_and_refused_upgrades_are_500(
    make_sim: Callable[..., Any],
) -> None:
    sim = await make_sim(refuse_sessions=1)
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer "}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(sim.ws_url, headers=headers)
            assert info.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(sim.ws_url, headers={"Authorization": "Bearer sk"})
        assert info.value.status == 500
    assert sim.sessions == []


def _history(count: int, text: str = "ok") -> list[dict]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": [{"text": text}]} for i in range(count)]


async def test_seeded_history_limits(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(history_token_limit=2000)
    openai = AsyncOpenAI(api_key="sk-test", base_url=sim.base_url)
    async with openai.live.connect() as conn:
        client = Client(conn, await sim.wait_for_session())
        two_parts = [{"role": "user", "content": [{"text": "a"}, {"text": "b"}]}]
        cases = [_history(129), two_parts, _history(10, "palavra " * 120), _history(128)]
        for items in cases:
            await conn.session.start(session={"model": MODEL, "input": items})
        errors = [(await client.until("error"))["error"] for _ in range(3)]
        started = await client.until("session.started")

    assert errors[0]["code"] == "array_above_max_length"
    assert errors[0]["message"] == (
        "Invalid 'session.input': array too long. Expected an array with maximum length 128, "
        "but got an array with length 129 instead."
    )
    assert (errors[1]["code"], errors[1]["param"]) == ("invalid_value", "session.input[0].content")
    assert errors[2]["param"] == "session.input" and "2000 tokens" in errors[2]["message"]
    assert len(started["session"]["input"]) == 128 and len(client.session.history) == 128


# ---- closing ---------------------------------------------------------------------------


async def test_close_and_expiry_end_with_session_closed(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(max_session_s=0.4)
    async with connect(sim) as c:
        await c.conn.session.close(event_id="evt_bye")
        closed = await c.until("session.closed")
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    async with connect(sim) as c:
        expired = await c.until("session.closed", within=3)

    assert (closed["reason"], closed["client_event_id"]) == ("close_requested", "evt_bye")
    assert closed["usage"]["seconds"] >= 1.0 and closed["session"]["id"] == sim.sessions[0].id
    assert expired["reason"] == "expired" and "client_event_id" not in expired
    first, second = sim.sessions
    await second.wait_for(lambda: second.closed, timeout=3)
    assert (first.close_reason, second.close_reason) == ("close_requested", "expired")


async def test_faults_look_like_upstream_failures(make_sim: Callable[..., Any]) -> None:
    sim = await make_sim(drop_after_deltas=2, speed=2.0)
    async with connect(sim, audio={"format": PCMU}) as c:
        turn = user_turn()
        await c.append(turn, frame=len(turn))
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await c.recv()
        assert info.value.rcvd is None  # no close frame: 1006
    assert len(c.of("session.output_audio.delta")) == 2
    async with connect(sim) as c:
        await c.session.drop()
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    for session in sim.sessions:
        await session.wait_for(lambda s=session: s.closed, timeout=3)
    assert [s.close_reason for s in sim.sessions] == ["connection_lost", "connection_lost"]


# ---- the validator on its own (no sockets) ---------------------------------------------


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "session.start", "session": {}}, "missing_required_parameter", "session.model"),
        (
            {"type": "session.start", "session": {"model": MODEL, "turn_detection": None}},
            "unknown_parameter",
            "session.turn_detection",
        ),
        (
            {
                "type": "session.start",
                "session": {"model": MODEL, "audio": {"format": PCMU | {"rate": 8000.0}}},
            },
            "invalid_type",
            "session.audio.format.rate",
        ),
        (
            {
                "type": "session.start",
                "session": {"model": MODEL, "input": [{"role": "system", "content": []}]},
            },
            "invalid_value",
            "session.input[0].role",
        ),
        (
            {"type": "session.commentary.append", "content": "x"},
            "missing_required_parameter",
            "delegation_id",
        ),
        (
            {"type": "response.item.create", "item": {"role": "user", "content": "x", "meta": 1}},
            "unknown_parameter",
            "item.meta",
        ),
        ({"type": "decision.create"}, "missing_required_parameter", "event_id"),
        ({"type": "response.cancel"}, "invalid_value", "type"),
    ],
)
def test_check_client_event_rejects_malformed_events(event: dict, code: str, param: str) -> None:
    with pytest.raises(ClientEventError) as info:
        check_client_event(event)
    assert (info.value.code, info.value.param) == (code, param)


def test_check_client_event_accepts_what_the_sdk_documents() -> None:
    session = {
        "model": "gpt-live-1.1",
        "instructions": "...",
        "audio": {
            "format": {"type": "audio/pcma", "rate": 8000},
            "output": {"voice": {"id": "voice_1"}},
        },
        "input": [
            {"role": "developer", "content": [{"text": "a"}]},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "b"}],
                "status": "incomplete",
            },
        ],
        "delegation": {"type": "client", "acknowledgement_delay_ms": 400},
        "store": False,
        "safety_identifier": "user_1",
    }
    check_client_event({"type": "session.start", "session": session, "event_id": "e"})
    check_client_event({"type": "session.thinking.append", "content": "x", "delegation_id": None})
    check_client_event({"type": "decision.create", "event_id": "d1"})
