"""SIGTERM on a real gateway process with live calls, warm WhatsApp sessions and a message in
flight, while OpenAI has stopped answering: the process exits within 5 s (close handshakes are
bounded and run at once), the phones are closed first, and the message cut off is answered
exactly once after the restart."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, OPENAI_KEY, free_port

ROOT = Path(__file__).resolve().parent.parent
EXIT_BOUND_S = 5.0


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=60, speed=8.0, ms_per_char=30,
                             reply_text="Olá, tudo bem?")  # fmt: skip


async def start_process(env: dict[str, str], url: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with aiohttp.ClientSession() as http, asyncio.timeout(20):
        while True:
            try:
                async with http.get(f"{url}/health") as response:
                    if response.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


def gateway_env(tmp_path, realtime_sim, twilio_sim) -> tuple[dict[str, str], str]:
    """The environment of a gateway process pointed at the simulators, and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "TWILIO"))},
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": realtime_sim.base_url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": twilio_sim.base_url,
        "DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db",
        "PORT": str(port),
        "PUBLIC_BASE_URL": url,
    }
    return env, url


async def test_sigterm_with_a_frozen_upstream_exits_in_time_and_loses_nothing(
    tmp_path, realtime_sim, twilio_sim, sim_config
):
    env, url = gateway_env(tmp_path, realtime_sim, twilio_sim)
    proc = await start_process(env, url)
    callers = [
        SimulatedCaller(url, url, AUTH_TOKEN, ACCOUNT_SID, from_number=f"+551699999100{i}")
        for i in range(2)
    ]
    senders = [
        WhatsAppSender(url, url, AUTH_TOKEN, ACCOUNT_SID, from_number=f"+551699999200{i}")
        for i in range(3)
    ]
    try:
        for caller in callers:
            assert (await caller.dial()).status == 200
            await caller.connect()
            await caller.wait_until(lambda c=caller: c.first_reply_at is not None, 5)
        for sender in senders[:2]:  # two warm WhatsApp sessions
            await sender.send_text("Oi, tudo bem?")
        await twilio_sim.wait_for_messages(4, timeout=10)
        sim_config.first_audio_latency_ms = 60_000  # the next answer will not come in time
        in_flight = senders[2].from_number
        await senders[2].send_text("Quero anunciar minha fazenda")
        await realtime_sim.wait_for_session(count=5, timeout=5)
        await asyncio.sleep(0.3)  # its response has started
        for session in realtime_sim.sessions:
            session.freeze()  # OpenAI stops answering anything, even a close

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(EXIT_BOUND_S):
            _, stderr = await proc.communicate()
        took = time.monotonic() - started
        assert proc.returncode == 0, stderr.decode()[-2000:]
        assert b"Traceback" not in stderr, stderr.decode()[-2000:]
        for caller in callers:  # each phone was closed by us, so Twilio's <Say> runs
            await caller.wait_until(lambda c=caller: c.closed.is_set(), 1)
            assert caller.closed_by_server
        print(f"SIGTERM with 2 calls, 2 warm sessions, 1 in flight, upstream frozen: {took:.2f} s")

        sim_config.first_audio_latency_ms = 60
        proc = await start_process(env, url)
        await twilio_sim.wait_for_messages(6, timeout=10)
        await asyncio.sleep(1.0)  # nothing more should come
        to_it = [m for m in twilio_sim.messages if m.to == f"whatsapp:{in_flight}"]
        assert len(to_it) == 2  # its text and its voice note, once
    finally:
        for client in (*callers, *senders):
            await client.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                await proc.wait()
