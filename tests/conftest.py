"""Shared end-to-end fixtures: the simulators and a gateway on real loopback sockets."""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.runtime import RUNTIME, Runtime
from gateway.settings import Settings
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator
from simulators.twilio import TwilioSimulator

ACCOUNT_SID = "AC" + "ab" * 16
AUTH_TOKEN = "test-auth-token"
OPENAI_KEY = "sk-test-key"


class _TracebackCatcher(logging.Handler):
    """Every log record that carries a traceback, or says a task died unseen."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.caught: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        unseen = "exception was never retrieved" in message or "Traceback (most" in message
        if record.exc_info or unseen:
            self.caught.append(f"{record.name}: {message[:300]}\n{self.format(record)[-1500:]}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_tracebacks: the test provokes a logged traceback on purpose"
    )


@pytest.fixture(autouse=True)
def no_tracebacks_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test whose run logs a traceback or "Task exception was never retrieved" fails:
    every fault the gateway expects is handled and logged in one line; a traceback is a bug."""
    catcher = _TracebackCatcher()
    root = logging.getLogger()
    root.addHandler(catcher)
    try:
        yield
        gc.collect()  # a task that died unseen is reported when it is collected
    finally:
        root.removeHandler(catcher)
    if catcher.caught and request.node.get_closest_marker("allow_tracebacks") is None:
        pytest.fail("logged with a traceback:\n" + "\n---\n".join(catcher.caught), False)


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
    """Also knows every SimulatedCaller's call once its stream starts (Calls resource)."""
    sim = TwilioSimulator(ACCOUNT_SID, AUTH_TOKEN)
    await sim.start(host="127.0.0.1", port=0)
    with sim.adopting_callers():
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
