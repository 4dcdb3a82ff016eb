"""Calls under fault, over real sockets: a broken, frozen, dropped, refusing or late OpenAI,
and a phone that vanishes. Each time the caller hears the call go on (a reconnect with the
transcript) or end cleanly; nothing logs a traceback (the suite fails on one, see conftest).

Bounds stated here: a frozen upstream is replaced within REALTIME_STALL_S (1 s in these tests,
8 s by default) plus one open; a call whose upstream is gone for good ends within the backoff
(0 + 0.5 + 1.5 s) plus the opens; an ended call's last transcript is waited for at most 1.5 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from gateway.calls import REGISTRY
from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, metric_value
from tests.store_helpers import open_db

PUBLIC = "https://gw.example.test"
CALLER = "+5516999990002"
GREETING = "Olá, tudo bem? Aqui é o Endrigo."


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(
        first_audio_latency_ms=60, speed=8.0, ms_per_char=12, reply_text=GREETING
    )


@pytest.fixture
async def gateway(start_gateway, live_env):
    env = {**live_env, "PUBLIC_BASE_URL": PUBLIC, "REALTIME_STALL_S": "1"}
    return await start_gateway({**env, "CALL_CLAIM_TIMEOUT_S": "1"})


async def connected_call(gateway, realtime_sim, count: int = 1):
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    assert (await caller.dial()).status == 200
    await caller.connect()
    session = await realtime_sim.wait_for_session(count=count)
    return caller, session


async def a_turn_is_answered(caller: SimulatedCaller, seed: int) -> None:
    before = len(caller.audio_received)
    await caller.speak_and_wait(speech_mulaw(1000, seed=seed))
    await caller.wait_playback_idle(quiet_s=0.3)
    assert len(caller.audio_received) > before and not caller.closed.is_set()
    assert caller.violations == []


async def errors_of_kind(gateway, kind: str) -> float:
    return await metric_value(gateway.url, "gateway_errors_total", kind=kind)


def stored_turns(gateway) -> list[tuple[str, str]]:
    db = open_db(gateway)
    try:
        return db.execute("SELECT role, text FROM turns ORDER BY id").fetchall()
    finally:
        db.close()


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not (result := predicate()):  # noqa: ASYNC110 - the store is a file: polled
            await asyncio.sleep(0.05)
    return result


def first_of(event_type: str, breaker: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """A mangle for the simulator: break the first event of `event_type`, pass the rest."""
    broken = False

    def mangle(event: dict) -> Any:
        nonlocal broken
        if event["type"] != event_type or broken:
            return event
        broken = True
        return breaker(event)

    return mangle


def with_field(path: str, value: Any) -> Callable[[dict], Any]:
    def breaker(event: dict) -> dict:
        node = event
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
        return event

    return breaker


# Every event type the call core reads, broken the way a buggy or changed upstream could.
MALFORMED = {
    "delta not base64": ("response.output_audio.delta", with_field("delta", "%%not base64%%")),
    "delta as a number": ("response.output_audio.delta", with_field("delta", 12345)),
    "item_id null": ("response.output_audio.delta", with_field("item_id", None)),
    "audio_end_ms null": (
        "input_audio_buffer.speech_stopped",
        with_field("audio_end_ms", None),
    ),
    "audio_end_ms a string": (
        "input_audio_buffer.speech_stopped",
        with_field("audio_end_ms", "500"),
    ),
    "session a list": ("session.updated", with_field("session", [])),
    "turn_detection a string": (
        "session.updated",
        with_field("session.audio.input.turn_detection", "server_vad"),
    ),
    "response null": ("response.created", with_field("response", None)),
    "usage a list": ("response.done", with_field("response.usage", [1, 2])),
    "audio done item_id a dict": ("response.output_audio.done", with_field("item_id", {})),
    "transcript a number": (
        "response.output_audio_transcript.done",
        with_field("transcript", 7),
    ),
    "user transcript a list": (
        "conversation.item.input_audio_transcription.completed",
        with_field("transcript", ["oi"]),
    ),
    "committed item_id null": ("input_audio_buffer.committed", with_field("item_id", None)),
    "error a string": ("error", with_field("error", "boom")),
    "speech_started a list": ("input_audio_buffer.speech_started", lambda e: [e]),
    "an event that is a number": ("response.output_audio.delta", lambda e: 42),
    "a frame that is not JSON": ("response.output_audio.delta", lambda e: "{not json"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_upstream_event_is_logged_and_the_call_goes_on(
    case, gateway, realtime_sim, sim_config
):
    event_type, breaker = MALFORMED[case]
    sim_config.mangle = first_of(event_type, breaker)
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)  # the greeting (maybe one delta short)
        await a_turn_is_answered(caller, seed=3)
        if event_type == "error":  # the simulator sends errors only when provoked
            session.inject({"type": "error", "event_id": "e1", "error": "boom"})
            await a_turn_is_answered(caller, seed=4)
    assert len(realtime_sim.sessions) == 1  # survived in place: no reconnect was needed
    assert await errors_of_kind(gateway, "realtime_protocol") >= 1


async def test_a_frozen_upstream_is_replaced_and_the_caller_is_answered(gateway, realtime_sim):
    caller, first = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        first.freeze()  # still connected, never answers again, not even a close
        caller.speak(speech_mulaw(1000, seed=5))  # owed a reply that will never come
        second = await realtime_sim.wait_for_session(count=2, timeout=5)
        await second.wait_event("session.updated", 3)
        [update] = [t.event for t in second.received if t.event.get("type") == "session.update"]
        assert GREETING in update["session"]["instructions"]  # the call so far came along
        await caller.wait_playback_idle(quiet_s=0.3)
        await a_turn_is_answered(caller, seed=6)


async def test_a_drop_mid_reply_keeps_what_was_heard_and_the_call_goes_on(
    gateway, realtime_sim, sim_config
):
    sim_config.reply_text = "Uma resposta bem comprida, para que a queda chegue no meio dela."
    caller, first = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        caller.speak(speech_mulaw(1000, seed=7))
        await first.wait_for(lambda: len(first.responses) == 2 and first.responses[1].audio_sent)
        first.abort()  # TCP gone without a close frame, mid-reply
        second = await realtime_sim.wait_for_session(count=2, timeout=5)
        await second.wait_event("session.updated", 3)
        await caller.wait_playback_idle(quiet_s=0.3)
        await a_turn_is_answered(caller, seed=8)
    assert first.errors == [] and second.errors == []
    cut = await eventually(lambda: [t for t in stored_turns(gateway) if t[1].endswith("…")])
    assert sim_config.reply_text.startswith(cut[0][1][:-1])  # the part heard before the drop


async def test_an_error_at_session_open_is_retried_and_the_caller_is_greeted(
    gateway, realtime_sim, sim_config
):
    sim_config.refuse_sessions = 2  # HTTP 500 at the upgrade, twice
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    async with caller:
        assert (await caller.dial()).status == 200
        await caller.connect()
        await caller.wait_until(lambda: caller.first_reply_at is not None, 6)
        await caller.wait_playback_idle(quiet_s=0.3)
        await a_turn_is_answered(caller, seed=9)
    assert len(realtime_sim.sessions) == 1


async def test_when_every_open_fails_the_call_ends_cleanly_with_the_apology(
    gateway, realtime_sim, sim_config
):
    sim_config.refuse_sessions = 100
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    async with caller:
        dial = await caller.dial()
        await caller.connect()
        await caller.wait_until(lambda: caller.closed.is_set(), 8)
    assert caller.closed_by_server and caller.audio_received == bytearray()
    assert "<Say" in dial.body  # Twilio goes on to the TwiML's apology
    assert realtime_sim.sessions == []


async def test_a_session_that_opens_after_the_claim_timeout_is_closed_unused(
    gateway, realtime_sim, sim_config
):
    sim_config.open_delay_s = 1.6  # slower than CALL_CLAIM_TIMEOUT_S = 1
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    async with caller:
        assert (await caller.dial()).status == 200  # and no media stream ever comes
        await asyncio.sleep(2.5)
    for session in realtime_sim.sessions:  # none, or one closed before it said anything
        await session.wait_for(lambda s=session: s.closed, timeout=3)
        assert not [t for t in session.received if t.event.get("type") == "response.create"]
    assert not any(s.responses for s in realtime_sim.sessions)  # no greeting was billed


async def test_a_session_that_opens_after_the_caller_hung_up_is_closed_unused(
    gateway, realtime_sim, sim_config
):
    sim_config.open_delay_s = 0.8
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    async with caller:
        assert (await caller.dial()).status == 200
        await caller.connect()
        await caller.hangup()  # before OpenAI has answered the upgrade
        await asyncio.sleep(1.6)
    for session in realtime_sim.sessions:
        await session.wait_for(lambda s=session: s.closed, timeout=3)
    assert not any(s.responses for s in realtime_sim.sessions)


def drop_tcp(caller: SimulatedCaller) -> None:
    """The phone's connection dies: no `stop`, no close frame."""
    assert caller._ws is not None
    caller._ws._conn.transport.abort()


async def hear_part_of_a_long_reply(caller: SimulatedCaller, session, sim_config) -> None:
    sim_config.ms_per_char = 80  # about 5 s of reply audio
    sim_config.speed = 1.0  # streamed in real time, so the end comes mid-reply
    caller.speak(speech_mulaw(1000, seed=10))
    await session.wait_for(lambda: len(session.responses) == 2 and session.responses[1].audio_sent)
    await asyncio.sleep(0.8)


LONG = "Posso te contar com calma como a gente faz o marketing de uma imobiliária no interior."


@pytest.mark.parametrize("how", ["tcp drop", "upstream lost for good", "shutdown"])
async def test_a_call_cut_mid_reply_remembers_what_the_phone_played(
    how, gateway, realtime_sim, sim_config
):
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        sim_config.reply_text = LONG
        await hear_part_of_a_long_reply(caller, session, sim_config)
        if how == "tcp drop":
            drop_tcp(caller)
        elif how == "upstream lost for good":
            sim_config.refuse_sessions = 100
            session.abort()
        else:
            await gateway.stop()
        await caller.wait_until(lambda: caller.closed.is_set(), 8)
    if how != "shutdown":
        await eventually(lambda: gateway.app[REGISTRY].live == {}, 6)
    turns = await eventually(lambda: [t for t in stored_turns(gateway) if t[1].endswith("…")])
    [(role, text)] = turns
    assert role == "assistant" and LONG.startswith(text[:-1]) and len(text) < len(LONG)


async def test_the_callers_last_words_are_kept_when_they_hang_up_at_once(
    gateway, realtime_sim, sim_config
):
    sim_config.input_transcript = "tenho uma fazenda em Jaboticabal"
    sim_config.transcription_latency_ms = 700  # the words arrive well after the hang-up
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        caller.speak(speech_mulaw(1000, seed=12))
        await session.wait_event("input_audio_buffer.committed", 5)
        await asyncio.sleep(0.2)  # the commit has reached the gateway; the words have not
        await caller.hangup()
    await eventually(lambda: ("user", "tenho uma fazenda em Jaboticabal") in stored_turns(gateway))
    await session.wait_for(lambda: session.closed, 3)  # and then the session was closed


@pytest.mark.parametrize(
    "parameters",
    [["token", "x"], "token", None, {"token": 5}, {"token": None}],
    ids=["list", "string", "null", "int token", "null token"],
)
async def test_a_start_with_wrongly_typed_parameters_is_refused_cleanly(
    parameters, gateway, realtime_sim
):
    caller = SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=CALLER)
    async with caller:
        assert (await caller.dial()).status == 200
        caller._start_message = lambda _params: {  # type: ignore[method-assign]
            "event": "start",
            "streamSid": caller.stream_sid,
            "start": {"callSid": caller.call_sid, "customParameters": parameters},
        }
        await caller.connect()
        await caller.wait_until(lambda: caller.closed.is_set(), 3)
    assert caller.close_code == 1008


async def test_wrongly_typed_twilio_frames_mid_call_are_logged_and_the_call_goes_on(
    gateway, realtime_sim
):
    caller, _ = await connected_call(gateway, realtime_sim)
    sid = caller.stream_sid
    bad = [
        {"event": "media", "streamSid": sid, "media": {"payload": 5}},
        {"event": "media", "streamSid": sid, "media": "payload"},
        {"event": "media", "streamSid": sid, "media": None},
        {"event": "media", "streamSid": sid, "media": {"payload": "@@not base64@@"}},
        {"event": "mark", "streamSid": sid, "mark": {"name": None}},
        {"event": "mark", "streamSid": sid, "mark": []},
        {"event": "dtmf", "streamSid": sid, "dtmf": {"digit": 7}},
        {"event": "start", "streamSid": sid, "start": []},
        {"event": ["stop"]},
        [1, 2, 3],
        "just a string",
    ]
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        for message in bad:
            await caller._send(message)  # type: ignore[arg-type]
        assert caller._ws is not None
        await caller._ws.send_str("{not json")
        await caller._ws.send_bytes(b"\x00\x01")
        await a_turn_is_answered(caller, seed=13)
    assert await errors_of_kind(gateway, "twilio_protocol") >= len(bad)


async def test_words_cut_off_by_the_hang_up_are_committed_and_kept(
    gateway, realtime_sim, sim_config
):
    sim_config.input_transcript = "e quero anunciar a minha fazenda"
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        caller.speak(speech_mulaw(3000, seed=14))  # still talking when the line goes
        await session.wait_event("input_audio_buffer.speech_started", 5)
        await asyncio.sleep(0.3)
        await caller.hangup()
    await eventually(lambda: ("user", "e quero anunciar a minha fazenda") in stored_turns(gateway))
    assert [t.event for t in session.received if t.event.get("type") == "input_audio_buffer.commit"]
