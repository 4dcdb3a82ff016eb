"""Shared end-to-end fixtures: the simulators and a gateway on real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.runtime import RUNTIME, Runtime
from gateway.settings import Settings
from gateway.sim.realtime import RealtimeSimConfig, RealtimeSimulator
from gateway.sim.twilio import TwilioSimulator

ACCOUNT_SID = "AC" + "ab" * 16
AUTH_TOKEN = "test-auth-token"
OPENAI_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    """Fast and deterministic: override fields in a test to change the simulator."""
    return RealtimeSimConfig(first_audio_latency_ms=80, speed=8.0)


@pytest.fixture
async def realtime_sim(sim_config: RealtimeSimConfig) -> AsyncIterator[RealtimeSimulator]:
    sim = RealtimeSimulator(sim_config)
    await sim.start(host="127.0.0.1", port=0)
    yield sim
    await sim.close()


@pytest.fixture
async def twilio_sim() -> AsyncIterator[TwilioSimulator]:
    sim = TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN)
    await sim.start(host="127.0.0.1", port=0)
    yield sim
    await sim.close()


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    async def stop(self) -> None:
        await self.runner.cleanup()


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def start_gateway(tmp_path) -> AsyncIterator[GatewayFactory]:
    """Start gateways with an environment; each is stopped at the end of the test."""
    running: list[RunningGateway] = []

    async def start(env: dict[str, str], port: int | None = None) -> RunningGateway:
        port = port or free_port()
        full = {"DATABASE_URL": f"sqlite:///{tmp_path}/gateway.db", "PORT": str(port), **env}
        full.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
        app = create_app(Settings.from_env(full))
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        gw = RunningGateway(f"http://127.0.0.1:{port}", app, runner)
        running.append(gw)
        return gw

    yield start
    for gw in reversed(running):
        await gw.stop()


@pytest.fixture
def live_env(realtime_sim: RealtimeSimulator, twilio_sim: TwilioSimulator) -> dict[str, str]:
    """Credentials set, pointed at the simulators as if they were OpenAI and Twilio."""
    return {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": realtime_sim.base_url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": twilio_sim.base_url,
    }


@pytest.fixture
async def gateway(start_gateway: GatewayFactory, live_env: dict[str, str]) -> RunningGateway:
    return await start_gateway(live_env)
