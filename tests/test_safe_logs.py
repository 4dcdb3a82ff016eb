"""A gateway process at LOG_LEVEL=DEBUG, driven through a WhatsApp message and a phone call:
its whole log holds no full phone number, no message text and no transcript."""

from __future__ import annotations

import asyncio
import signal

import pytest

from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN
from tests.test_shutdown import gateway_env, start_process

NUMBER = "+5516987654321"
SECRET_TEXT = "minha senha do banco é girassol"
SPOKEN = "tenho uma fazenda em Jaboticabal"
REPLY = "Que bom falar contigo, vamos conversar sobre a fazenda."


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=40, speed=8.0, ms_per_char=12,
                             reply_text=REPLY, input_transcript=SPOKEN)  # fmt: skip


async def test_a_debug_log_holds_no_number_text_or_transcript(
    tmp_path, realtime_sim, twilio_sim, sim_config
):
    env, url = gateway_env(tmp_path, realtime_sim, twilio_sim)
    proc = await start_process({**env, "LOG_LEVEL": "DEBUG"}, url)
    sender = WhatsAppSender(url, url, AUTH_TOKEN, ACCOUNT_SID, from_number=NUMBER)
    caller = SimulatedCaller(url, url, AUTH_TOKEN, ACCOUNT_SID, from_number=NUMBER)
    try:
        await sender.send_text(SECRET_TEXT)
        await twilio_sim.wait_for_messages(2, timeout=10)
        assert (await caller.dial()).status == 200
        await caller.connect()
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.speak_and_wait(speech_mulaw(800, seed=4))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.hangup()
    finally:
        await sender.close()
        await caller.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            _, stderr = await proc.communicate()
    log = stderr.decode()
    assert "ending (caller hung up)" in log  # the log is the whole run's
    for private in (NUMBER, NUMBER[1:], SECRET_TEXT, SPOKEN, REPLY):
        assert private not in log, f"{private!r} is in the DEBUG log"
