"""Call guardrails end to end, over real sockets: what Twilio gets back from the voice webhook
when the gateway is full, when the same call is asked for twice, and when the form's fields are
not Twilio's; and that none of these opens a Realtime session or writes a row it should not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from xml.etree import ElementTree

import pytest

from gateway.calls import REGISTRY
from simulators.caller import DialResult, SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.store_helpers import open_db
from tests.test_call_faults import errors_of_kind

PUBLIC = "https://gw.example.test"


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(
        first_audio_latency_ms=60, speed=8.0, ms_per_char=12, reply_text="Olá, tudo bem?"
    )


async def limited_gateway(start_gateway, live_env, **limits: int):
    env = {**live_env, "PUBLIC_BASE_URL": PUBLIC, "CALL_CLAIM_TIMEOUT_S": "5"}
    return await start_gateway({**env, **{key: str(value) for key, value in limits.items()}})


def new_caller(gateway, index: int = 0, from_number: str | None = None) -> SimulatedCaller:
    number = f"+55169{index:08d}" if from_number is None else from_number
    return SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=number)


async def dial_all(callers: list[SimulatedCaller]) -> list[DialResult]:
    """Every webhook posted at once, as Twilio does when calls ring together."""
    return list(await asyncio.gather(*(caller.dial() for caller in callers)))


async def close_all(callers: list[SimulatedCaller]) -> None:
    await asyncio.gather(*(caller.close() for caller in callers))


def twiml(dial: DialResult) -> ElementTree.Element:
    assert dial.status == 200, dial.body
    return ElementTree.fromstring(dial.body)


def is_apology(dial: DialResult) -> bool:
    """The persona's "lines busy" in Portuguese, then <Hangup/>, and no stream: the call ends
    politely, at no cost."""
    root = twiml(dial)
    say = root.find("Say")
    return (
        [child.tag for child in root] == ["Say", "Hangup"]
        and say is not None
        and say.get("language") == "pt-BR"
        and say.get("voice") == "Polly.Ricardo"
        and "linhas estão ocupadas" in (say.text or "")
    )


def conversations(gateway) -> list[str]:
    db = open_db(gateway)
    try:
        return [sid for (sid,) in db.execute("SELECT external_id FROM conversations")]
    finally:
        db.close()


def people(gateway) -> int:
    db = open_db(gateway)
    try:
        return db.execute("SELECT count(*) FROM people").fetchone()[0]
    finally:
        db.close()


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not (result := predicate()):  # noqa: ASYNC110 - registry and files: polled
            await asyncio.sleep(0.02)
    return result


def greetings(session) -> list[dict]:
    return [t.event for t in session.received if t.event.get("type") == "response.create"]


async def test_forty_calls_at_once_open_no_more_sessions_than_the_parked_cap(
    start_gateway, live_env, realtime_sim
):
    gateway = await limited_gateway(start_gateway, live_env, MAX_PARKED_CALLS=5, MAX_LIVE_CALLS=8)
    refused_before = await errors_of_kind(gateway, "call_capacity")
    callers = [new_caller(gateway, i) for i in range(40)]
    try:
        dials = await dial_all(callers)
        answered = [d for d in dials if d.stream_url is not None]
        refused = [d for d in dials if d.stream_url is None]
        assert len(answered) == 5
        assert len(refused) == 35 and all(is_apology(d) for d in refused)
        await realtime_sim.wait_for_session(count=5)
        await asyncio.sleep(0.3)  # any extra session would be opening by now
        assert len(realtime_sim.sessions) == 5
        assert sorted(conversations(gateway)) == sorted(d.call_sid for d in answered)
        assert people(gateway) == 5  # a refused caller is not even remembered as a number
        assert await errors_of_kind(gateway, "call_capacity") - refused_before == 35
    finally:
        await close_all(callers)


async def test_calls_ringing_together_cannot_pass_the_live_cap(
    start_gateway, live_env, realtime_sim
):
    gateway = await limited_gateway(start_gateway, live_env, MAX_LIVE_CALLS=2)
    callers = [new_caller(gateway, i) for i in range(10)]
    try:
        dials = await dial_all(callers)
        assert sum(d.stream_url is not None for d in dials) == 2  # parked calls count as live
        assert sum(is_apology(d) for d in dials if d.stream_url is None) == 8
        await realtime_sim.wait_for_session(count=2)
        await asyncio.sleep(0.3)
        assert len(realtime_sim.sessions) == 2 and len(conversations(gateway)) == 2
    finally:
        await close_all(callers)


async def test_a_call_over_the_live_cap_hears_the_apology_until_a_line_frees(
    start_gateway, live_env, realtime_sim
):
    gateway = await limited_gateway(start_gateway, live_env, MAX_LIVE_CALLS=1)
    first, second, third = (new_caller(gateway, i) for i in range(3))
    async with first, second, third:
        await first.dial()
        await first.connect()
        await first.wait_until(lambda: first.first_reply_at is not None)  # greeting heard
        assert gateway.app[REGISTRY].live_count == 1
        assert is_apology(await second.dial())
        await asyncio.sleep(0.3)
        assert len(realtime_sim.sessions) == 1
        assert second.call_sid not in conversations(gateway)
        await first.hangup()
        await eventually(lambda: gateway.app[REGISTRY].live_count == 0)
        assert (await third.dial()).stream_url is not None  # the line is free again
        await realtime_sim.wait_for_session(count=2)


async def test_the_same_webhook_twice_opens_one_session_and_the_call_works(
    start_gateway, live_env, realtime_sim
):
    gateway = await limited_gateway(start_gateway, live_env)
    caller = new_caller(gateway, 1)
    retry, late_retry, replay = (new_caller(gateway, 1) for _ in range(3))
    for twin in (retry, late_retry, replay):
        twin.call_sid = caller.call_sid  # the same form, so the same signature
    async with caller, retry, late_retry, replay:
        first, again = await dial_all([caller, retry])  # Twilio's retry racing the original
        later = await late_retry.dial()  # and one after it, while the call is still parked
        tokens = {d.parameters.get("token") for d in (first, again, later)}
        assert len(tokens) == 1 and None not in tokens  # one parked call, one stream
        await caller.connect()
        session = await realtime_sim.wait_for_session()
        await caller.wait_playback_idle(quiet_s=0.3)  # the greeting
        # Once live, the webhook again starts nothing: no stream, no apology.
        assert [child.tag for child in twiml(await replay.dial())] == []
        turn = await caller.speak_and_wait(speech_mulaw(1000, seed=4))
        assert turn.latency_s is not None and not caller.closed.is_set()
        assert len(realtime_sim.sessions) == 1 and len(greetings(session)) == 1
        assert conversations(gateway) == [caller.call_sid]
        await caller.hangup()
        await wait_until_no_live_calls(gateway)
        # Once the call is over, a replay of its webhook still opens nothing.
        assert [child.tag for child in twiml(await replay.dial())] == []
        await asyncio.sleep(0.3)
        assert len(realtime_sim.sessions) == 1 and conversations(gateway) == [caller.call_sid]


async def wait_until_no_live_calls(gateway) -> None:
    async with asyncio.timeout(10):
        while gateway.app[REGISTRY].live:  # noqa: ASYNC110 - the registry has no change event
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("field", "value"),
    [("CallSid", "CA123"), ("AccountSid", "AC" + "cd" * 16), ("From", "x'; DROP"), ("To", None)],
    ids=["short-CallSid", "foreign-AccountSid", "From-not-a-number", "no-To"],
)
async def test_a_signed_webhook_with_fields_twilio_never_sends_is_refused_for_free(
    start_gateway, live_env, realtime_sim, field, value
):
    gateway = await limited_gateway(start_gateway, live_env)
    caller = new_caller(gateway, 7)
    form = {k: v for k, v in caller.voice_form().items() if k != field}
    if value is not None:
        form[field] = value
    caller.voice_form = lambda: form  # signed as it is: the signature holds, the fields do not
    refused_before = await errors_of_kind(gateway, "voice_bad_fields")
    async with caller:
        dial = await caller.dial()
    assert dial.status == 400 and field in dial.body
    await asyncio.sleep(0.3)
    assert realtime_sim.sessions == []
    assert conversations(gateway) == [] and people(gateway) == 0
    assert await errors_of_kind(gateway, "voice_bad_fields") - refused_before == 1


@pytest.mark.parametrize("withheld", ["anonymous", ""])
async def test_a_withheld_caller_id_still_gets_a_call_without_memory(
    start_gateway, live_env, realtime_sim, withheld
):
    gateway = await limited_gateway(start_gateway, live_env)
    caller = new_caller(gateway, from_number=withheld)
    async with caller:
        assert (await caller.dial()).stream_url is not None
        await caller.connect()
        await realtime_sim.wait_for_session()
        await caller.wait_playback_idle(quiet_s=0.3)
        turn = await caller.speak_and_wait(speech_mulaw(1000, seed=6))
        assert turn.latency_s is not None and not caller.closed.is_set()
    assert conversations(gateway) == [] and people(gateway) == 0
