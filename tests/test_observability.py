import asyncio
import gc
import io
import logging
import socket

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability import JsonFormatter, correlated, setup_logging
from simulators.caller import SimulatedCaller
from simulators.realtime import RealtimeSimConfig
from simulators.speech import speech_mulaw
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    return RealtimeSimConfig(first_audio_latency_ms=50, speed=8.0, reply_text="Olá, tudo bem?")


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    values = {}
    instances = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            instances.add(sample.labels.pop("instance_id", None))
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    assert instances == {socket.gethostname()}  # INSTANCE_ID's default, on every sample
    return values


async def test_metrics_count_calls_latency_and_rejected_signatures(gateway, realtime_sim):
    before = await scrape(gateway.url)
    forged = SimulatedCaller(gateway.url, gateway.url, "wrong-token", ACCOUNT_SID)
    async with forged:
        assert (await forged.dial()).status == 403
    caller = SimulatedCaller(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID)
    async with caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_until(lambda: caller.first_reply_at is not None, 5)  # stream is live
        during = await scrape(gateway.url)
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.speak_and_wait(speech_mulaw(1000, seed=4))
        await caller.wait_playback_idle(quiet_s=0.3)
        await caller.hangup()
    after = await scrape(gateway.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert during["gateway_active_calls{}"] == before.get("gateway_active_calls{}", 0) + 1
    assert after["gateway_active_calls{}"] == before.get("gateway_active_calls{}", 0)
    assert delta("gateway_calls_total{}") == 1
    assert delta("gateway_rejected_signatures_total{route=voice}") == 1
    assert delta("gateway_greeting_seconds_count{}") == 1
    assert delta("gateway_response_latency_seconds_count{}") >= 1
    assert delta("gateway_upstream_first_audio_seconds_count{}") >= 1
    assert delta("gateway_frame_forward_seconds_count{direction=inbound}") >= 1
    assert delta("gateway_frame_forward_seconds_count{direction=outbound}") >= 1
    assert delta("gateway_turns_total{channel=call,role=assistant}") >= 2
    assert delta("gateway_event_loop_lag_seconds_count{}") >= 10  # 20 a second during a call


def test_json_log_lines_carry_the_correlation_id():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    setup_logging("INFO", json_lines=True)
    root = logging.getLogger()
    handler.setFormatter(JsonFormatter())
    handler.filters = root.handlers[0].filters
    root.addHandler(handler)
    try:
        with correlated("call=CA123"):
            logging.getLogger("gateway.test").info("hello %s", "world")
        logging.getLogger("gateway.test").info("outside")
    finally:
        root.removeHandler(handler)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world" and first["cid"] == "call=CA123"
    assert first["level"] == "INFO" and first["logger"] == "gateway.test"
    assert "cid" not in second


async def test_whatsapp_metrics_count_webhook_and_reply_times(gateway, twilio_sim):
    before = await scrape(gateway.url)
    async with WhatsAppSender(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID) as sender:
        assert (await sender.send_text("Olá!")).status == 200
        assert (await sender.send_text("forjada", forge=True)).status == 403
    await twilio_sim.wait_for_messages(2, timeout=10, settled=True)
    after = await scrape(gateway.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("gateway_whatsapp_webhook_seconds_count{}") == 1
    assert delta("gateway_whatsapp_reply_seconds_count{}") == 1
    assert delta("gateway_rejected_signatures_total{route=whatsapp}") == 1
    assert delta("gateway_turns_total{channel=whatsapp,role=assistant}") == 1


async def test_start_up_objects_are_frozen_and_collector_pauses_are_timed(start_gateway, live_env):
    callbacks_before = len(gc.callbacks)
    gateway = await start_gateway(live_env)
    before = await scrape(gateway.url)
    # Modules, SDK clients and persona: far more than any per-call allocation.
    assert before["gateway_gc_frozen_objects{}"] > 50_000
    await asyncio.sleep(0.1)  # no call: the event-loop lag timer sleeps
    gc.collect()  # a full collection, as the process would run on its own sooner or later
    after = await scrape(gateway.url)
    key = "gateway_gc_pause_seconds_count{generation=2}"
    assert after[key] == before.get(key, 0.0) + 1
    assert after["gateway_gc_pause_seconds_sum{generation=2}"] > 0
    lag = "gateway_event_loop_lag_seconds_count{}"
    assert after.get(lag, 0.0) == before.get(lag, 0.0)  # an idle gateway stays asleep
    other = await start_gateway(live_env)  # two in one process share the one collector
    await gateway.stop()
    assert gc.get_freeze_count() > 50_000 and len(gc.callbacks) == callbacks_before + 1
    await other.stop()
    assert len(gc.callbacks) == callbacks_before  # the last to stop leaves no hook behind
    assert gc.get_freeze_count() == 0
