"""The one Realtime link, against the simulator over real sockets: opens and closes are bounded,
an abandoned open leaves no session behind, and the receive loop turns every failure into a
reason instead of a dead task."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai import AsyncOpenAI

from gateway.bridge import LinkPolicy, NotJson, RealtimeSession, pump, sdk_socket_available
from simulators.realtime import RealtimeSimConfig
from tests.conftest import OPENAI_KEY

SESSION = {"type": "realtime", "instructions": "Olá"}
POLICY = LinkPolicy(open_timeout_s=0.5, close_timeout_s=0.3, stall_s=5.0)


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=20, speed=8.0)


@pytest.fixture
async def client(realtime_sim):
    client = AsyncOpenAI(api_key=OPENAI_KEY, base_url=realtime_sim.base_url)
    yield client
    await client.close()


def test_the_sdk_still_keeps_its_websocket_where_the_hot_path_writes():
    assert sdk_socket_available()


def test_the_backoff_is_one_policy_with_an_end():
    policy = LinkPolicy(reconnect_delays_s=(0.0, 0.5))
    assert [policy.reconnect_delay(n) for n in (1, 2, 3)] == [0.0, 0.5, None]


async def test_an_open_slower_than_its_timeout_fails_and_leaves_nothing_open(
    client, realtime_sim, sim_config
):
    sim_config.open_delay_s = 1.5
    with pytest.raises(TimeoutError):
        await RealtimeSession.open(client, "gpt-realtime-2.1", SESSION, POLICY)
    await asyncio.sleep(1.5)  # the simulator finishes its delay and finds the client gone
    assert all(s.closed for s in realtime_sim.sessions)


async def test_closing_a_frozen_session_is_bounded(client, realtime_sim):
    session = await RealtimeSession.open(client, "gpt-realtime-2.1", SESSION, POLICY)
    remote = await realtime_sim.wait_for_session()
    await remote.wait_event("session.updated")
    remote.freeze()  # it will never answer our close frame
    started = time.monotonic()
    await session.close()
    assert time.monotonic() - started < POLICY.close_timeout_s + 1.0
    assert session.closed


async def test_the_receive_loop_reports_a_drop_and_hands_on_broken_frames(client, realtime_sim):
    session = await RealtimeSession.open(client, "gpt-realtime-2.1", SESSION, POLICY)
    remote = await realtime_sim.wait_for_session()
    seen: list = []

    async def on_event(event) -> None:
        seen.append(event)
        if isinstance(event, NotJson):
            remote.abort()

    await remote.wait_event("session.updated")
    remote.inject("{this is not json")
    reason = await asyncio.wait_for(pump(session, on_event, "test"), 5)
    assert "upstream closed" in reason
    assert isinstance(seen[-1], NotJson) and seen[-1].preview.startswith(b"{this")


@pytest.mark.allow_tracebacks  # the owner's bug is logged with its traceback, as it should be
async def test_a_failing_handler_ends_the_loop_with_a_reason_not_a_dead_task(client, realtime_sim):
    session = await RealtimeSession.open(client, "gpt-realtime-2.1", SESSION, POLICY)

    async def on_event(event) -> None:
        raise KeyError("a bug in the owner")

    reason = await asyncio.wait_for(pump(session, on_event, "test"), 5)
    assert reason == "handling 'session.created' failed"
    await session.close()
