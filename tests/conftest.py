"""Shared end-to-end fixtures: the simulators and a gateway on real loopback sockets."""

from __future__ import annotations

import gc
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.runtime import RUNTIME, Runtime
from gateway.settings import Settings
from simulators.live_config import LiveSimConfig
from simulators.realtime import RealtimeSimConfig, RealtimeSimulator
from simulators.twilio import TwilioSimulator
from tests.pg import pg_url  # noqa: F401  (a session fixture, shared by every test)

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
    config.addinivalue_line(
        "markers",
        "both_stores: run on SQLite and on PostgreSQL (the store, queue, memory and "
        "WhatsApp suites); TEST_STORE=postgres runs every test on PostgreSQL alone",
    )


# Which store a test's gateway and Store.open use: SQLite by default; a module marked
# both_stores runs on both; TEST_STORE=postgres (make test-postgres) puts every test on it.
ALL_ON = os.environ.get("TEST_STORE", "sqlite")
STORES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" not in metafunc.fixturenames:
        return
    if ALL_ON not in STORES:
        raise pytest.UsageError(f"TEST_STORE must be one of {STORES}, got {ALL_ON!r}")
    both = metafunc.definition.get_closest_marker("both_stores") is not None
    stores = STORES if both and ALL_ON == "sqlite" else (ALL_ON,)
    metafunc.parametrize("database_url", stores, indirect=True, ids=list(stores))


_databases = itertools.count(1)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh, empty store for this test: a SQLite file, or a new PostgreSQL database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path}/gateway.db"
        return
    server = request.getfixturevalue("pg_url")
    name = f"t{os.getpid()}_{next(_databases)}"
    _admin(server, f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _admin(server: str, sql: str) -> None:
    import psycopg  # the sync driver (dev extra): fixtures here are not async

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql)


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
def live_sim_config() -> LiveSimConfig:
    """The GPT-Live simulator's knobs (it shares the Realtime simulator's base URL)."""
    return LiveSimConfig(first_audio_latency_ms=80, speed=8.0)


@pytest.fixture
async def realtime_sim(
    sim_config: RealtimeSimConfig, live_sim_config: LiveSimConfig
) -> AsyncIterator[RealtimeSimulator]:
    sim = RealtimeSimulator(sim_config, live_sim_config)
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
async def start_gateway(database_url: str) -> AsyncIterator[GatewayFactory]:
    """Start gateways with an environment; each is stopped at the end of the test."""
    running: list[RunningGateway] = []

    async def start(env: dict[str, str], port: int | None = None) -> RunningGateway:
        # The socket is bound before the settings name its port, and handed to the server:
        # a port picked then released could be taken by another test process meanwhile.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port or 0))
        port = sock.getsockname()[1]
        full = {"DATABASE_URL": database_url, "PORT": str(port), **env}
        full.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
        try:
            app = create_app(Settings.from_env(full))
        except BaseException:
            sock.close()
            raise
        runner = web.AppRunner(app, handle_signals=False)
        gw = RunningGateway(f"http://127.0.0.1:{port}", app, runner)
        running.append(gw)  # stopped at the end even if its start fails half-way
        await runner.setup()
        await web.SockSite(runner, sock).start()
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


async def metric_value(base_url: str, name: str, **labels: str) -> float:
    """One sample of `/metrics` (0 when absent), matched on the labels given; the label
    every sample carries (`instance_id`) need not be named."""
    async with aiohttp.ClientSession() as http, http.get(f"{base_url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found = {k: v for k, v in sample.labels.items() if k != "instance_id"}
            if sample.name == name and found == labels:
                return sample.value
    return 0.0
