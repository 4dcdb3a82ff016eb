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
from .voice import BACKENDS, VOICES
from .whatsapp_burst import RemoteTwilio, TwilioView
from .workers import worker_main

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: git runs here


def _runs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, voice, backend) of each run: --voice both runs each voice, --backend both each
    backend (not both at once: parse_args refuses it)."""
    if args.voice == "both":
        return [(voice, voice, args.backend) for voice in VOICES]
    if args.backend == "both":
        return [(backend, args.voice, backend) for backend in BACKENDS]
    return [(args.backend, args.voice, args.backend)]


async def _main(args: argparse.Namespace) -> dict[str, Report]:
    """One run per voice or backend asked for (both: openai then elevenlabs, or realtime
    then live), in order."""
    reports = {}
    for name, voice, backend in _runs(args):
        reports[name] = await _run(args, voice, backend)
    return reports


async def _run(args: argparse.Namespace, voice: str, backend: str) -> Report:
    cfg = config_from(args)
    cfg.voice, cfg.backend = voice, backend
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
    report.setup = _setup_notes(args, voice, backend)
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


def _setup_notes(args: argparse.Namespace, voice: str, backend: str) -> list[str]:
    notes = [_code_version()]
    simulators = (
        "Realtime and ElevenLabs simulators" if voice == "elevenlabs" else "Realtime simulator"
    )
    if backend == "live":
        simulators += " (its GPT-Live simulator answering, VOICE_BACKEND=live)"
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
        each = {name: asdict(report) for name, report in reports.items()}
        print(json.dumps(each if len(reports) > 1 else next(iter(each.values())), indent=2))
    else:
        print("\n\n".join(format_text(report) for report in reports.values()))
        if len(reports) > 1:
            across = "voice" if args.voice == "both" else "backend"
            print("\n" + format_side_by_side(reports, across))
    failed = [r for r in reports.values() if r.calls is not None and r.calls.ok == 0]
    sys.exit(1 if failed else 0)
