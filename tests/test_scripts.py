"""The command-line scripts a newcomer runs, driven as they would run them."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from simulators.realtime import RealtimeSimConfig
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    """Short replies: the script waits for each to play out at the phone's real pace."""
    return RealtimeSimConfig(first_audio_latency_ms=80, speed=8.0, ms_per_char=30,
                             reply_text="Olá, tudo bem?")  # fmt: skip


async def run_script(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_the_call_script_dials_a_gateway_given_only_by_its_url(gateway):
    # No PUBLIC_BASE_URL and no PORT: the signature is made over the URL it was given.
    env = {k: v for k, v in os.environ.items() if k not in ("PUBLIC_BASE_URL", "PORT")}
    env |= {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_ACCOUNT_SID": ACCOUNT_SID}
    code, out = await run_script(
        "scripts/call.py", "--gateway", gateway.url, "--turns", "1", "--speech-ms", "800", env=env
    )
    assert code == 0, out
    assert "dial: HTTP 200" in out
    assert "turn 1: first reply after" in out and "0 protocol violations" in out


async def test_the_call_script_fails_loudly_when_the_gateway_refuses_it(gateway):
    env = {k: v for k, v in os.environ.items() if k not in ("PUBLIC_BASE_URL", "PORT")}
    env |= {"TWILIO_AUTH_TOKEN": "not-the-token", "TWILIO_ACCOUNT_SID": ACCOUNT_SID}
    code, out = await run_script("scripts/call.py", "--gateway", gateway.url, env=env)
    assert code == 1 and "dial: HTTP 403" in out
