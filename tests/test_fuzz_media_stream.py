"""End-to-end fuzz over the real media-stream socket: one call's Twilio side sends thousands of
random messages (real shapes with wrong types, missing and extra keys, broken JSON, binary
frames) while another call goes on. The gateway stays up, the other call is answered, and the
fuzzed call still gets only well-formed Twilio messages.

FUZZ_MESSAGES sets the count (CI: 2000; BENCHMARKS records a 10,000-message run). The seed is
fixed (FUZZ_SEED to vary it), so a failure reproduces.
"""

from __future__ import annotations

import base64
import os
import random
from typing import Any

import aiohttp
import orjson
import pytest

from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

PUBLIC = "https://gw.example.test"
MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "2000"))
SEED = int(os.environ.get("FUZZ_SEED", "20261202"))
JUNK: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    3.5,
    "",
    "x" * 300,
    "é\x80",
    "²",  # a digit to str.isdigit, not to int: once crashed the mark handler
    "1" * 4301,
    [],
    [1, "a"],
    {},
    {"a": None},
]


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=60, speed=8.0, ms_per_char=30,
                             reply_text="Olá, tudo bem?", record_audio=False)  # fmt: skip


def real_shapes(rng: random.Random, sid: str, call_sid: str) -> dict[str, Any]:
    frame = base64.b64encode(rng.randbytes(160)).decode()
    return rng.choice(
        [
            {"event": "media", "streamSid": sid, "sequenceNumber": "9",
             "media": {"track": "inbound", "chunk": "3", "timestamp": "60", "payload": frame}},
            {"event": "mark", "streamSid": sid, "mark": {"name": str(rng.randint(0, 50))}},
            {"event": "dtmf", "streamSid": sid, "dtmf": {"track": "inbound_track", "digit": "5"}},
            {"event": "start", "streamSid": sid,
             "start": {"callSid": call_sid, "customParameters": {"token": "t"}}},
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        ]
    )  # fmt: skip


def mutate(rng: random.Random, message: dict[str, Any]) -> Any:
    for _ in range(rng.randint(1, 3)):
        node = message
        while rng.random() < 0.5:
            children = [v for v in node.values() if isinstance(v, dict) and v]
            if not children:
                break
            node = rng.choice(children)
        key = rng.choice(sorted(node))
        choice = rng.random()
        if choice < 0.5:
            node[key] = rng.choice(JUNK)
        elif choice < 0.8:
            del node[key]
        else:
            node[f"extra_{rng.randint(0, 9)}"] = rng.choice(JUNK)
        if not node:
            break
    return message


def fuzz_frame(rng: random.Random, sid: str, call_sid: str) -> tuple[str | bytes, bool]:
    """A frame, and whether it is certainly not a Twilio message (binary, not JSON, no object)."""
    roll = rng.random()
    if roll < 0.05:
        return rng.randbytes(rng.randint(1, 64)), True
    if roll < 0.10:
        return rng.choice(["{", "not json", '{"event":', "\x00\x01", "[]", "null", "42"]), True
    message = real_shapes(rng, sid, call_sid)
    if roll < 0.85:
        message = mutate(rng, message)
    return orjson.dumps(message).decode(), False


async def test_ten_thousand_random_messages_harm_neither_the_gateway_nor_another_call(
    start_gateway, live_env, realtime_sim
):
    gateway = await start_gateway({**live_env, "PUBLIC_BASE_URL": PUBLIC})
    calm, fuzzed = (
        SimulatedCaller(gateway.url, PUBLIC, AUTH_TOKEN, ACCOUNT_SID, from_number=number)
        for number in ("+5516999991001", "+5516999991002")
    )
    rng = random.Random(SEED)
    async with calm, fuzzed:
        for caller in (calm, fuzzed):
            assert (await caller.dial()).status == 200
            await caller.connect()
            await caller.wait_until(lambda c=caller: c.first_reply_at is not None, 5)
        ws = fuzzed._ws
        assert ws is not None
        unusable = 0  # frames that are certainly not a Twilio message: each must be counted
        for _ in range(MESSAGES):
            frame, certainly_bad = fuzz_frame(rng, fuzzed.stream_sid, fuzzed.call_sid)
            unusable += certainly_bad
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        before = len(calm.audio_received)
        await calm.speak_and_wait(speech_mulaw(1000, seed=21))
        await calm.wait_playback_idle(quiet_s=0.3)
        assert len(calm.audio_received) > before and calm.violations == []
        assert not fuzzed.closed.is_set()  # garbage is logged and counted, not a reason to hang up
        assert fuzzed.violations == []  # what it got back is still well-formed Twilio protocol
        sizes = {len(base64.b64decode(r.message["media"]["payload"]))
                 for r in fuzzed.received if r.event == "media"}  # fmt: skip
        assert all(size % 160 == 0 for size in sizes)
    async with aiohttp.ClientSession() as http, http.get(f"{gateway.url}/health") as response:
        assert response.status == 200
        metrics = await (await http.get(f"{gateway.url}/metrics")).text()
    [line] = [
        x
        for x in metrics.splitlines()
        if x.startswith("gateway_errors_total{") and 'kind="twilio_' in x
    ]
    assert float(line.split()[-1]) >= unusable > 0  # each logged once at most, all counted
