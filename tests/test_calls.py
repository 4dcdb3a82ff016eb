"""Live calls end to end: simulated caller -> gateway -> Realtime simulator, real sockets."""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import pytest

from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.realtime_events import check_client_event
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, free_port
from tests.store_helpers import open_db

PUBLIC = "https://gw.example.test"
CALLER = "+5516999990001"
LONG_REPLY = (
    "Claro! Posso te explicar com calma como a gente trabalha o marketing digital "
    "para imobiliárias no interior, passo a passo, do anúncio até a visita."
)


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(
        first_audio_latency_ms=80, speed=8.0, ms_per_char=30, reply_text="Olá, tudo bem?"
    )


@pytest.fixture
async def gateway(start_gateway, live_env):
    return await start_gateway({**live_env, "PUBLIC_BASE_URL": PUBLIC, "CALL_CLAIM_TIMEOUT_S": "1"})


def new_caller(gateway, token: str = AUTH_TOKEN) -> SimulatedCaller:
    return SimulatedCaller(gateway.url, PUBLIC, token, ACCOUNT_SID, from_number=CALLER)


async def connected_call(gateway, realtime_sim):
    caller = new_caller(gateway)
    dial = await caller.dial()
    assert dial.status == 200
    await caller.connect()
    session = await realtime_sim.wait_for_session()
    return caller, session


def received(session, event_type: str) -> list[dict]:
    return [t.event for t in session.received if t.event.get("type") == event_type]


async def test_a_spoken_question_gets_a_spoken_reply_in_exact_twilio_frames(gateway, realtime_sim):
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)  # the greeting
        greeting_bytes = len(caller.audio_received)
        turn = await caller.speak_and_wait(speech_mulaw(1200, seed=3))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert turn.latency_s is not None
        assert len(caller.audio_received) > greeting_bytes + 8 * 400  # a real reply arrived
        assert caller.violations == []
        medias = [r.message for r in caller.received if r.event == "media"]
        sizes = {len(base64.b64decode(m["media"]["payload"])) for m in medias}
        assert sizes and all(size % 160 == 0 for size in sizes)
        marks = [r.message for r in caller.received if r.event == "mark"]
        assert len(marks) == len(medias)
    # What the gateway told OpenAI: validated by the SDK's types, pcmu both ways, server VAD.
    [update] = received(session, "session.update")
    check_client_event(update)
    audio = update["session"]["audio"]
    assert audio["input"]["format"] == {"type": "audio/pcmu"}
    assert audio["output"]["format"] == {"type": "audio/pcmu"}
    assert audio["input"]["turn_detection"]["type"] == "server_vad"
    assert audio["input"]["noise_reduction"] == {"type": "far_field"}
    assert audio["input"]["transcription"]["language"] == "pt"
    assert audio["output"]["voice"] == "cedar"  # REALTIME_VOICE unset: the persona's, a man's
    assert "Endrigo" in update["session"]["instructions"]
    assert session.errors == []
    # The reply the caller heard is the simulator's audio, byte for byte.
    sent_audio = b"".join(
        base64.b64decode(e["delta"]) for e in session.events("response.output_audio.delta")
    )
    assert (
        bytes(caller.audio_received[: len(sent_audio) // 160 * 160])
        == (sent_audio[: len(sent_audio) // 160 * 160])
    )


async def test_a_custom_voice_id_reaches_openai_as_a_voice_object(
    start_gateway, live_env, realtime_sim
):
    env = {**live_env, "PUBLIC_BASE_URL": PUBLIC, "REALTIME_VOICE": "voice_endrigo01"}
    caller, session = await connected_call(await start_gateway(env), realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.first_reply_at is not None)  # greeting heard
    [update] = received(session, "session.update")
    check_client_event(update)
    assert update["session"]["audio"]["output"]["voice"] == {"id": "voice_endrigo01"}
    assert session.errors == []


async def test_the_caller_audio_reaches_openai_untouched(gateway, realtime_sim):
    caller, session = await connected_call(gateway, realtime_sim)
    speech = speech_mulaw(600, seed=9)
    async with caller:
        await caller.speak_and_wait(speech, reply_timeout=None)
        await session.wait_for(lambda: speech in bytes(session.input_audio), timeout=3)


async def test_the_greeting_is_asked_for_before_the_phone_stream_starts(gateway, realtime_sim):
    """The session is opened and the greeting requested while Twilio is still connecting the
    stream, so the caller waits only for the model's first audio, not for our set-up too.
    (How long that takes is measured by the load test, BENCHMARKS.md, not asserted here.)"""
    caller = new_caller(gateway)
    assert (await caller.dial()).status == 200
    session = await realtime_sim.wait_for_session()
    # No stream yet: the greeting is asked for all the same.
    await session.wait_for(lambda: received(session, "response.create"), 5)
    assert caller.started_at is None
    await caller.connect()
    async with caller:
        await caller.wait_until(lambda: caller.first_reply_at is not None, 5)
        assert len(received(session, "response.create")) == 1  # the one greeting, not a second


async def test_barge_in_clears_the_phone_and_truncates_to_what_was_played(
    gateway, realtime_sim, sim_config
):
    sim_config.reply = lambda session, user_item: LONG_REPLY if user_item else "Olá!"
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3, timeout=30)
        heard_before = caller.playback.queued_bytes - caller.playback.discarded_bytes
        await caller.speak_and_wait(speech_mulaw(1000, seed=5))
        await asyncio.sleep(0.8)  # the caller hears some of the reply, then talks over it
        caller.speak(speech_mulaw(800, seed=6))
        await caller.wait_until(lambda: caller.clears, 5)
        [clear] = caller.clears
        started = [
            t for t in session.sent if t.event["type"] == "input_audio_buffer.speech_started"
        ][-1]
        assert clear.at - started.at < 0.100
        heard_ms = (caller.playback.played(clear.at) - heard_before) / 8
        await session.wait_for(lambda: received(session, "conversation.item.truncate"), 3)
        [truncate] = received(session, "conversation.item.truncate")
        check_client_event(truncate)
        assert abs(truncate["audio_end_ms"] - heard_ms) <= 60
        item = session.conversation.get(truncate["item_id"])
        generated_ms = max(item.full_audio_ms, item.audio_ms) if item else 0
        assert truncate["audio_end_ms"] <= generated_ms
        await session.wait_event("conversation.item.truncated", 3)
        assert all(e["error"].get("code") != "invalid_value" for e in session.errors)
        assert caller.violations == []


async def test_a_forged_webhook_is_refused_and_opens_nothing(gateway, realtime_sim):
    caller = new_caller(gateway, token="not-the-auth-token")
    async with caller:
        dial = await caller.dial()
    assert dial.status == 403
    await asyncio.sleep(0.2)
    assert realtime_sim.sessions == []


async def test_a_forged_stream_is_refused_and_the_parked_session_closes(gateway, realtime_sim):
    honest = new_caller(gateway)
    async with honest:
        await honest.dial()
    session = await realtime_sim.wait_for_session()
    forger = new_caller(gateway, token="not-the-auth-token")
    forger.call_sid = honest.call_sid
    async with forger:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await forger.connect(honest.dial_result.stream_url, honest.dial_result.parameters)
    assert err.value.status == 403
    await session.wait_for(lambda: session.closed, timeout=3)  # unclaimed: closed after 1 s
    assert len(realtime_sim.sessions) == 1


async def test_a_replayed_stream_gets_no_session(gateway, realtime_sim):
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        replay = new_caller(gateway)
        replay.call_sid = caller.call_sid
        async with replay:
            await replay.connect(caller.dial_result.stream_url, caller.dial_result.parameters)
            await replay.wait_until(lambda: replay.closed.is_set(), 3)
        assert replay.audio_received == bytearray()
        assert len(realtime_sim.sessions) == 1 and not session.closed


async def test_hang_up_closes_the_upstream_within_100_ms(gateway, realtime_sim):
    caller, session = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.first_reply_at is not None, 5)
        hung_up = time.monotonic()
        await caller.hangup()
        await session.wait_for(lambda: session.closed, timeout=2)
    assert session.closed_at - hung_up < 0.100


async def test_an_upstream_drop_is_survived_with_the_transcript_replayed(
    gateway, realtime_sim, sim_config
):
    sim_config.reply_text = "Aqui é o Endrigo, tudo ótimo por aqui."
    caller, first = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        await first.drop()
        second = await realtime_sim.wait_for_session(count=2)
        await second.wait_for(lambda: received(second, "session.update"), 3)
        [update] = received(second, "session.update")
        assert "Aqui é o Endrigo, tudo ótimo por aqui." in update["session"]["instructions"]
        before = len(caller.audio_received)
        await caller.speak_and_wait(speech_mulaw(1000, seed=8))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert len(caller.audio_received) > before
        assert second.errors == []


async def test_turns_transcripts_and_latency_are_stored_with_the_person(gateway, realtime_sim):
    caller, _ = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.speak_and_wait(speech_mulaw(1000, seed=2))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.send_dtmf("5")
        await asyncio.sleep(0.1)
        await caller.hangup()
    store = gateway.runtime.store
    person = await store.person_by_number(CALLER)
    for _ in range(50):
        turns = await store.recent_turns(person.id)
        if sum(t.role == "assistant" for t in turns) >= 2:
            break
        await asyncio.sleep(0.05)
    roles = [t.role for t in turns]
    assert roles.count("assistant") >= 2 and "user" in roles and "dtmf" in roles
    assert all(t.channel == "call" for t in turns)
    db = open_db(gateway)
    rows = db.execute(
        "SELECT response_latency_ms, upstream_first_audio_ms FROM turns WHERE role = 'assistant'"
    ).fetchall()  # a call's rows may commit out of order on PostgreSQL's pool: not by position
    # A greeting answers no speech: its latency is the call's (greeting_latency_ms).
    [greeting] = [r for r in rows if r[0] is None]
    [reply] = [r for r in rows if r[0] is not None]
    assert greeting[1] is None
    (greeting_ms,) = db.execute("SELECT greeting_latency_ms FROM conversations").fetchone()
    assert greeting_ms is not None and greeting_ms >= 0  # stream start -> first frame
    assert reply[0] > reply[1] > 0  # end of speech -> first frame includes the upstream's share


async def test_when_openai_cannot_be_reached_again_the_call_ends_cleanly(gateway, realtime_sim):
    caller, _ = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_until(lambda: caller.first_reply_at is not None, 5)
        await realtime_sim.close()  # the upstream goes away and refuses reconnects
        await caller.wait_until(lambda: caller.closed.is_set(), 10)
        # Closing the stream hands the call back to the TwiML, whose <Say> apologises.
        assert caller.closed_by_server
        assert "<Say" in caller.dial_result.body and "Desculpe" in caller.dial_result.body


async def test_the_60_minute_cap_is_survived_like_a_drop(gateway, realtime_sim, sim_config):
    sim_config.max_session_s = 1.0  # the real cap is 60 minutes; the close is the same
    caller, first = await connected_call(gateway, realtime_sim)
    await first.wait_event("session.updated", 3)  # its 1 s clock is running by now
    sim_config.max_session_s = 3600.0  # only the first session is cut short
    async with caller:
        await first.wait_for(lambda: first.closed, timeout=5)
        assert first.close_code == 1001
        second = await realtime_sim.wait_for_session(count=2)
        await second.wait_for(lambda: received(second, "session.update"), 3)
        before = len(caller.audio_received)
        await caller.speak_and_wait(speech_mulaw(1000, seed=7))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert len(caller.audio_received) > before and not caller.closed.is_set()


async def test_when_openai_is_unreachable_from_the_start_the_stream_ends_at_once(
    start_gateway, live_env
):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    gateway = await start_gateway({**live_env, "OPENAI_BASE_URL": dead, "PUBLIC_BASE_URL": PUBLIC})
    caller = new_caller(gateway)
    async with caller:
        assert (await caller.dial()).status == 200  # Twilio still gets its TwiML
        await caller.connect()
        await caller.wait_until(lambda: caller.closed.is_set(), 10)
        assert caller.closed_by_server and caller.audio_received == bytearray()


async def test_the_session_is_rotated_before_its_cap_while_nobody_talks(
    start_gateway, live_env, realtime_sim
):
    env = {**live_env, "PUBLIC_BASE_URL": PUBLIC, "CALL_SESSION_ROTATE_S": "1.5"}
    gateway = await start_gateway(env)
    caller, first = await connected_call(gateway, realtime_sim)
    async with caller:
        await caller.wait_playback_idle(quiet_s=0.3)
        second = await realtime_sim.wait_for_session(count=2, timeout=5)
        await first.wait_for(lambda: first.closed, timeout=3)  # we closed it, after the swap
        [update] = received(second, "session.update")
        assert "Olá, tudo bem?" in update["session"]["instructions"]  # the call so far
        assert not received(second, "response.create")  # no second greeting
        before = len(caller.audio_received)
        await caller.speak_and_wait(speech_mulaw(1000, seed=11))
        await caller.wait_playback_idle(quiet_s=0.3)
        assert len(caller.audio_received) > before and not caller.closed.is_set()
        assert first.errors == [] and second.errors == []
        assert caller.clears == []  # nothing the caller heard was cut
