"""The load test's core, as a library, against an in-process gateway and simulators."""

from __future__ import annotations

import base64
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from scripts import loadtest
from scripts.loadtest import voice
from scripts.loadtest.config import parse_args
from simulators.elevenlabs import ElevenLabsSimConfig, ElevenLabsSimulator
from simulators.live_config import LiveSimConfig
from simulators.realtime import RealtimeSimConfig
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

FIRST_AUDIO_MS = 60


@pytest.fixture
def sim_config() -> RealtimeSimConfig:
    # Short replies streamed fast: three calls of one turn take about three seconds.
    return RealtimeSimConfig(
        first_audio_latency_ms=FIRST_AUDIO_MS,
        speed=8.0,
        ms_per_char=30,
        reply_text="Olá, tudo bem?",
        record_audio=False,
    )


@pytest.fixture
def live_sim_config() -> LiveSimConfig:
    # GPT-Live paced as the Realtime simulator above (a spawned one gets the same flags).
    return LiveSimConfig(
        first_audio_latency_ms=FIRST_AUDIO_MS,
        speed=8.0,
        ms_per_char=30,
        reply_text="Olá, tudo bem?",
        record_audio=False,
    )


def tiny_load(gateway, calls: int = 2, **chosen: str) -> loadtest.LoadConfig:
    """A load of a few one-turn calls against `gateway`, quick enough for the suite."""
    return loadtest.LoadConfig(
        gateway_url=gateway.url, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, calls=calls,
        turns=1, ramp_s=0.2, speech_ms=600, first_audio_ms=FIRST_AUDIO_MS, quiet_s=0.2,
        warmup=0, **chosen,
    )  # fmt: skip


async def test_three_calls_of_one_turn_give_a_complete_sane_report(
    start_gateway, live_env, realtime_sim
):
    gateway = await start_gateway(live_env)
    cfg = tiny_load(gateway, calls=3)
    # The gateway runs in this process, so its /proc figures include the callers: only shape.
    simulator = realtime_sim.base_url.removesuffix("/v1")
    stack = loadtest.Stack(gateway_pid=os.getpid(), simulator_url=simulator)
    report = await loadtest.run_load(cfg, stack)

    calls = report.calls
    assert (calls.calls, calls.ok, calls.failed, calls.errors) == (3, 3, 0, {})
    assert (calls.turns_requested, calls.turns_measured) == (3, 3)
    assert 1 <= calls.peak_live_calls <= 3
    # The caller hears a reply after the silence window and the upstream's first audio.
    assert calls.latency_ms.n == 3
    assert calls.latency_ms.p50 > cfg.vad_silence_ms + FIRST_AUDIO_MS
    assert calls.gateway_share_ms.n == 3 and calls.gateway_share_ms.p50 >= 0
    assert calls.gateway_share_naive_ms.n == 3
    assert calls.greeting_ms.n == 3 and calls.greeting_ms.p50 > 0
    assert calls.dial_ms.n == 3
    assert calls.greeting_ms.p50 <= calls.greeting_ms.p95 <= calls.greeting_ms.p99
    assert calls.gateway_view_ms is None  # no --db given
    # Each turn found its response in the simulator's own timings (by the greeting's call_sid).
    assert calls.gateway_share_sim_ms.n == 3 and calls.simulator_overshoot_ms.n == 3
    assert calls.simulator_overshoot_ms.p50 > -1  # its first audio never comes before F
    assert calls.gateway_share_sim_ms.p50 <= calls.gateway_share_ms.p50 + 1
    # Read from the gateway's /metrics: its own forwarding time and collector pauses.
    assert set(calls.gateway_forwarding) == {"inbound", "outbound"}
    assert calls.gateway_forwarding["inbound"].n >= 1
    assert set(calls.gateway_gc_pauses) == {"0", "1", "2"}
    assert calls.gateway_loop_lag is not None and calls.gateway_loop_lag.n >= 10  # 20 a second
    frames = calls.frames
    assert frames.reply_frames > 0
    assert (frames.violations, frames.odd_size_frames, frames.underruns) == (0, 0, 0)
    generator = calls.generator
    assert generator.processes == 1 and generator.frames_sent > 3 * 50  # > 1 s of audio each
    assert generator.send_lateness_ms.n == generator.frames_sent
    assert calls.machine.cores >= 1 and calls.machine.cores_busy >= 0
    process = calls.gateway_process
    assert process.pid == os.getpid() and process.cpu_s > 0 and process.rss_peak_mb > 0
    assert [t.name for t in report.targets] == [
        "gateway share p99 (ms), at 100 calls",
        "turn p95 (ms): end of speech -> first reply frame",
        "greeting p99 (ms): first audio + 20",
        "RSS per live call (KB)",
    ]
    assert report.targets[0].met is None  # the share target is set at 100 live calls, not 3
    assert "end of speech -> first reply frame" in loadtest.format_text(report)
    assert "garbage-collector pauses" in loadtest.format_text(report)
    assert "voice: openai (the Realtime voice)" in loadtest.format_text(report)


@pytest.fixture
async def elevenlabs_sim() -> AsyncIterator[ElevenLabsSimulator]:
    # Any key, as the spawned simulator; fast, so that the calls stay short.
    sim = ElevenLabsSimulator(
        ElevenLabsSimConfig(api_key=None, first_audio_latency_ms=20, speed=20.0)
    )
    await sim.start()
    yield sim
    await sim.close()


async def test_calls_in_the_elevenlabs_voice_are_measured_and_the_report_names_it(
    start_gateway, live_env, realtime_sim, elevenlabs_sim
):
    # The gateway gets the same voice settings as a spawned one (--voice elevenlabs).
    env = voice.gateway_env("elevenlabs", urlsplit(elevenlabs_sim.base_url).port)
    gateway = await start_gateway({**live_env, **env})
    cfg = tiny_load(gateway, voice="elevenlabs")
    report = await loadtest.run_load(cfg, loadtest.Stack(gateway_pid=os.getpid()))

    calls = report.calls
    assert (calls.calls, calls.ok, calls.failed, calls.errors) == (2, 2, 0, {})
    assert (calls.turns_requested, calls.turns_measured) == (2, 2)
    # The reply is ElevenLabs' audio: it comes after the silence window and the model's text.
    assert calls.latency_ms.n == 2
    assert calls.latency_ms.p50 > cfg.vad_silence_ms + FIRST_AUDIO_MS
    assert calls.frames.reply_frames > 0
    assert (calls.frames.violations, calls.frames.odd_size_frames) == (0, 0)
    assert len(elevenlabs_sim.requests) >= 4  # each call's greeting and reply
    text = loadtest.format_text(report)
    assert "voice: elevenlabs" in text
    assert "calls: 2 ok, 0 failed; turns measured 2/2" in text
    assert "end of speech -> first reply frame                2" in text
    assert "ms per call-minute" in text


async def test_calls_on_gpt_live_are_measured_and_priced_per_call_minute(
    start_gateway, live_env, realtime_sim, database_url
):
    if not database_url.startswith("sqlite:///"):
        pytest.skip("the load test reads the gateway's SQLite file")
    # The gateway as a spawned one with --backend live: the Live simulator on the same URL.
    gateway = await start_gateway({**live_env, **voice.backend_env("live")})
    cfg = tiny_load(gateway, backend="live")
    simulator = realtime_sim.base_url.removesuffix("/v1")
    db_path = Path(database_url.removeprefix("sqlite:///"))
    stack = loadtest.Stack(gateway_pid=os.getpid(), db_path=db_path, simulator_url=simulator)
    report = await loadtest.run_load(cfg, stack)

    calls = report.calls
    assert (calls.calls, calls.ok, calls.failed, calls.errors) == (2, 2, 0, {})
    assert (calls.turns_requested, calls.turns_measured) == (2, 2)
    assert calls.latency_ms.n == 2
    assert calls.latency_ms.p50 > cfg.vad_silence_ms + FIRST_AUDIO_MS
    assert len(realtime_sim.live.sessions) >= 2 and not realtime_sim.sessions
    # The Realtime simulator's timings know no Live session: not measured, said so.
    assert calls.gateway_share_sim_ms is None
    # Live's usage is session seconds of its model, priced per minute.
    (model,) = calls.cost.models
    assert model["model"].startswith("gpt-live") and model["session_seconds"] > 0
    assert calls.cost.per_call_minute_usd > 0
    text = loadtest.format_text(report)
    assert "backend: live (GPT-Live" in text
    assert "calls: 2 ok, 0 failed; turns measured 2/2" in text
    assert "share with the simulator's own latency       n/a on live" in text
    assert "cost per call-minute (USD, config/prices.toml): " in text
    assert f"  {model['model']}: " in text


def test_voice_option() -> None:
    assert parse_args([]).voice == "openai"
    assert parse_args(["--spawn", "--voice", "both"]).voice == "both"
    with pytest.raises(SystemExit):  # a running gateway's voice is its own
        parse_args(["--voice", "elevenlabs"])
    assert parse_args([]).backend == "realtime"
    assert parse_args(["--spawn", "--backend", "both"]).backend == "both"
    for refused in (
        ["--backend", "live"],  # a running gateway's backend is its own
        ["--spawn", "--backend", "live", "--voice", "elevenlabs"],  # GPT-Live has its own voice
        ["--spawn", "--backend", "both", "--voice", "both"],  # one comparison at a time
    ):
        with pytest.raises(SystemExit):
            parse_args(refused)
    assert voice.backend_env("live") == {"VOICE_BACKEND": "live"}
    assert voice.gateway_env("openai", None) == {}
    env = voice.gateway_env("elevenlabs", 8767)
    assert env["VOICE_PROVIDER"] == "elevenlabs"
    assert env["ELEVENLABS_BASE_URL"] == "http://127.0.0.1:8767"


def test_each_utterance_ends_on_a_voiced_frame() -> None:
    clip = loadtest.voiced_clip(1500, seed=0, threshold=0.5)
    assert 0 < len(clip) <= 1500 * 8 and len(clip) % 160 == 0


def _phase_gaps_ms(cfg) -> list[float]:
    """Gaps between the callers' frame phases on the 20 ms circle, sorted, in ms."""
    period = loadtest.FRAME_S
    phases = sorted(loadtest.start_offset(cfg, i) % period for i in range(cfg.calls))
    gaps = [b - a for a, b in itertools.pairwise(phases)]
    gaps.append(period - phases[-1] + phases[0])
    return sorted(g * 1000 for g in gaps)


def test_callers_frames_are_spread_over_the_20_ms_period_like_real_calls() -> None:
    spread = loadtest.LoadConfig(calls=100, ramp_s=10.0)  # a 100 ms step: 5 whole frames
    offsets = [loadtest.start_offset(spread, i) for i in range(100)]
    assert offsets == sorted(offsets) and 9.9 <= offsets[-1] <= 10.0
    assert _phase_gaps_ms(spread)[-1] <= 0.6  # no phase left empty longer than 3 callers' share
    grid = loadtest.LoadConfig(calls=100, ramp_s=10.0, phases="grid")
    assert _phase_gaps_ms(grid)[-1] == pytest.approx(20.0)  # the stress case: all in phase


def test_summary_percentiles() -> None:
    summary = loadtest.Summary.of([*range(1, 101), None])
    assert (summary.n, summary.p50, summary.max) == (100, 50.5, 100.0)
    assert loadtest.Summary.of_counts({0: 99, 7: 1}).max == 7.0
    assert loadtest.Summary.of([]).n == 0


def test_reply_frames_count_gaps_underruns_and_odd_sizes() -> None:
    frame = base64.b64encode(bytes(160)).decode()
    reply = loadtest.ReplyFrames()
    for i in range(5):  # a burst 5 ms apart: 100 ms of audio queued ahead of playback
        reply.add(i * 0.005, 0, frame)
    reply.add(0.2, 0, frame)  # 180 ms later: a gap, and the buffer ran dry at 0.1 s
    reply.add(0.21, 0, base64.b64encode(bytes(480)).decode())  # 3 frames in one message
    reply.add(1.0, 1, "c2hvcnQ=")  # the next reply: no gap across replies; 5 bytes
    assert (reply.messages, reply.frames) == (8, 9)
    assert (reply.gaps, reply.underruns, reply.odd_size) == (1, 1, 1)
    assert round(reply.max_gap_ms) == 180
