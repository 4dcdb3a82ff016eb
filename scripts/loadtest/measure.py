"""The whole measurement: warm-up, the calls, the WhatsApp burst, the targets."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import LoadConfig
from .progress import Progress, ProgressBar
from .results import (
    CallsReport,
    Report,
    calls_report,
    cost_report,
    evaluate,
    gateway_view,
    last_turn_id,
    last_usage_id,
    usage_by_model,
)
from .sim_timings import fetch_sim_timings, share_with_sim_measured
from .stack import Stack
from .watches import Watches
from .whatsapp_burst import WhatsAppReport, run_whatsapp_burst
from .workers import run_calls, run_calls_in_workers

SETTLE_S = 3.0  # after the warm-up
USAGE_POLL_S = 0.3  # the usage rows are read again until two reads agree (calls end async)
USAGE_WAIT_S = 5.0


async def warm_up(cfg: LoadConfig) -> list[float]:
    """A few calls before the load (first imports and connections); their greeting times."""
    warm = LoadConfig(**{**asdict(cfg), "calls": cfg.warmup, "turns": 1, "ramp_s": 0.0})
    batch = await run_calls(warm, range(10**6, 10**6 + cfg.warmup), time.monotonic(), Progress())
    failed = [r.error for r in batch.results if r.error]
    if failed:
        raise RuntimeError(f"warm-up call failed: {failed[0]}")
    return [round(r.greeting_ms or 0.0, 1) for r in batch.results]


async def run_load(
    cfg: LoadConfig, stack: Stack | None = None, *, show_progress: bool = False
) -> Report:
    """The whole measurement: warm-up, the calls, the WhatsApp burst, the targets."""
    stack = stack or Stack()
    report = Report(config=asdict(cfg))
    if cfg.calls and cfg.warmup:
        report.warmup_greeting_ms = await warm_up(cfg)
        # The warm-up call's background work (its rolling summary, first-use imports) must
        # not land in the measured phase.
        await asyncio.sleep(SETTLE_S)
    if cfg.calls:
        report.calls = await _measure_calls(cfg, stack, show_progress)
    if cfg.whatsapp:
        report.whatsapp = await _measure_whatsapp(cfg, stack)
    report.targets = evaluate(cfg, report)
    return report


async def _measure_whatsapp(cfg: LoadConfig, stack: Stack) -> WhatsAppReport:
    watches = await Watches.start(stack, cfg.gateway_url)
    cpu_before = time.process_time()
    report = await run_whatsapp_burst(cfg, stack.twilio)
    seen = await watches.finish(cfg.whatsapp, 0, 0.0, time.process_time() - cpu_before)
    report.gateway_process, report.simulator_process = seen.gateway, seen.simulator
    report.machine = seen.machine
    return report


async def _settled_usage(db_path: Path, since_id: int) -> list[dict[str, Any]]:
    """The usage rows per model once two reads agree: GPT-Live's seconds are written when
    each call's session closes, after its caller hung up."""
    rows = usage_by_model(db_path, since_id)
    deadline = time.monotonic() + USAGE_WAIT_S
    while time.monotonic() < deadline:
        await asyncio.sleep(USAGE_POLL_S)
        rows, before = usage_by_model(db_path, since_id), rows
        if rows == before:
            break
    return rows


async def _measure_calls(cfg: LoadConfig, stack: Stack, show_progress: bool) -> CallsReport:
    progress = Progress(calls=cfg.calls, turns=cfg.calls * cfg.turns)
    first_turn, first_usage = last_turn_id(stack.db_path), last_usage_id(stack.db_path)
    watches = await Watches.start(stack, cfg.gateway_url)
    async with ProgressBar(progress, "calls", enabled=show_progress):
        if cfg.workers > 1:
            batch = await run_calls_in_workers(cfg, progress)
        else:
            batch = await run_calls(cfg, range(cfg.calls), time.monotonic(), progress)
    report = calls_report(cfg, batch, progress)
    call_seconds = sum(r.duration_s for r in batch.results)
    seen = await watches.finish(cfg.calls, progress.peak_live, call_seconds, batch.cpu_s)
    report.gateway_process, report.simulator_process = seen.gateway, seen.simulator
    report.voice_process = seen.voice
    report.machine, report.gateway_forwarding = seen.machine, seen.forwarding
    report.gateway_gc_pauses, report.gateway_loop_lag = seen.gc_pauses, seen.loop_lag
    if stack.db_path is not None:
        await asyncio.sleep(0.5)  # the last turns are written in the background
        # On GPT-Live the gateway dates the end of speech itself (no silence window in it).
        silence_ms = 0 if cfg.backend == "live" else cfg.vad_silence_ms
        with contextlib.suppress(sqlite3.Error):  # another schema: no view, not a failure
            report.gateway_view_ms = gateway_view(stack.db_path, first_turn, silence_ms)
        with contextlib.suppress(sqlite3.Error):
            rows = await _settled_usage(stack.db_path, first_usage)
            report.cost = cost_report(rows, call_seconds)
    if stack.simulator_url is not None and cfg.backend != "live":  # Realtime sessions only
        sessions = await fetch_sim_timings(stack.simulator_url)
        exact, overshoot = share_with_sim_measured(batch.results, sessions, cfg.first_audio_ms)
        report.gateway_share_sim_ms, report.simulator_overshoot_ms = exact, overshoot
    return report
