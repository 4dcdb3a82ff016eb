"""The command: parse, run against a spawned or a running gateway, print the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import aiohttp

from .config import config_from, parse_args
from .measure import run_load
from .profiling import profiled
from .report import format_side_by_side, format_text
from .results import Report
from .spawn import SpawnOptions, spawned_stack
from .stack import Stack
from .voice import VOICES
from .whatsapp_burst import RemoteTwilio, TwilioView
from .workers import worker_main

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: git runs here


async def _main(args: argparse.Namespace) -> dict[str, Report]:
    """One run per voice asked for (--voice both: openai, then elevenlabs), in order."""
    voices = VOICES if args.voice == "both" else (args.voice,)
    reports = {}
    for voice in voices:
        reports[voice] = await _run(args, voice)
    return reports


async def _run(args: argparse.Namespace, voice: str) -> Report:
    cfg = config_from(args)
    cfg.voice = voice
    async with contextlib.AsyncExitStack() as exits:
        if args.spawn:
            options = SpawnOptions(args.sim_arg, args.gateway_log_level, args.keep, args.pin)
            stack = await exits.enter_async_context(spawned_stack(cfg, options))
        else:
            twilio: TwilioView | None = None
            if args.twilio_sim:
                session = await exits.enter_async_context(aiohttp.ClientSession())
                twilio = RemoteTwilio(args.twilio_sim, session)
            stack = Stack(args.gateway_pid, twilio, args.db, args.simulator_pid, args.simulator_url)
        await exits.enter_async_context(
            profiled(stack.gateway_pid, args.profile, args.profile_native)
        )
        report = await run_load(cfg, stack, show_progress=not args.no_progress)
    report.setup = _setup_notes(args, voice)
    return report


def _code_version() -> str:
    """The commit measured, and whether the gateway's code differed from it."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        run.check_returncode()
        return run.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "gateway")
    except (OSError, subprocess.CalledProcessError):
        return "code: unknown (no git)"
    return f"code: {head}" + (" with uncommitted changes in gateway/" if dirty else "")


def _setup_notes(args: argparse.Namespace, voice: str) -> list[str]:
    notes = [_code_version()]
    simulators = (
        "Realtime and ElevenLabs simulators" if voice == "elevenlabs" else "Realtime simulator"
    )
    notes += [
        f"spawned: gateway and {simulators} as subprocesses"
        if args.spawn
        else f"running gateway at {args.gateway}"
    ]
    notes.append(
        "callers' frame phases: spread over the 20 ms period (golden ratio)"
        if args.phases == "spread"
        else "callers' frame phases: all on one 20 ms grid (stress; no phone network does this)"
    )
    if args.simulator_pid:
        notes.append(f"realtime simulator pid {args.simulator_pid}")
    if args.pin:
        notes.append("pinned: gateway on CPU 0; simulators and callers on CPU 1")
    if args.profile:
        notes.append(f"profiled with py-spy into {args.profile}: figures are perturbed")
    return notes


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1], int(argv[2]))
        return
    args = parse_args(argv)
    reports = asyncio.run(_main(args))
    if args.json:
        both = {voice: asdict(report) for voice, report in reports.items()}
        print(json.dumps(both if len(reports) > 1 else both[args.voice], indent=2))
    else:
        print("\n\n".join(format_text(report) for report in reports.values()))
        if len(reports) > 1:
            print("\n" + format_side_by_side(reports))
    failed = [r for r in reports.values() if r.calls is not None and r.calls.ok == 0]
    sys.exit(1 if failed else 0)
