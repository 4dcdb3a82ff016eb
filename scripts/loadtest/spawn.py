"""The gateway, the Realtime simulator (GPT-Live's too, on the same base URL) and (with
--voice elevenlabs) the ElevenLabs simulator as subprocesses, the Twilio simulator in this
one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from . import voice
from .config import LoadConfig, free_port
from .stack import Stack
from .whatsapp_burst import LocalTwilio

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository


@dataclass
class SpawnOptions:
    realtime_args: list[str]
    log_level: str = "INFO"
    keep: bool = False
    pin: bool = False  # the gateway alone on CPU 0; simulators and callers on CPU 1


async def _start_process(
    argv: list[str], log: Path, env: Mapping[str, str] | None = None
) -> asyncio.subprocess.Process:
    with log.open("wb") as out:  # the child keeps its own handle
        return await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env=dict(env or os.environ), stdout=out, stderr=out
        )


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def _wait_ready(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    """Until `url` answers 200 (any HTTP answer for a bare port check)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if proc.returncode is not None:
                tail = _log_tail(log)
                raise RuntimeError(f"{log.name}: exited {proc.returncode}\n{tail}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within 30 s (see {log})")


@contextlib.asynccontextmanager
async def spawned_stack(cfg: LoadConfig, options: SpawnOptions) -> AsyncIterator[Stack]:
    """Realtime simulator and gateway as subprocesses, the Twilio simulator in this process."""
    from simulators.twilio import TwilioSimulator

    workdir = Path(tempfile.mkdtemp(prefix="almada-loadtest-"))
    twilio = TwilioSimulator(cfg.account_sid, cfg.auth_token)
    procs: list[asyncio.subprocess.Process] = []
    affinity = os.sched_getaffinity(0)
    if options.pin:
        os.sched_setaffinity(0, {1})  # inherited by the simulator and the workers
    try:
        await twilio.start()
        sim_port, gw_port = free_port(), urlsplit(cfg.gateway_url).port or 80
        sim_argv = [sys.executable, "-m", "simulators.realtime", "--port", str(sim_port)]
        sim_argv += ["--latency-ms", str(cfg.first_audio_ms), "--no-record", "--log-level"]
        sim_argv += ["WARNING", *_live_vad_args(cfg), *options.realtime_args]
        sim_log = workdir / "realtime-sim.log"
        procs.append(await _start_process(sim_argv, sim_log))
        await _wait_ready(f"http://127.0.0.1:{sim_port}/", procs[-1], sim_log)
        voice_port = await _start_voice(cfg, procs, workdir)
        db_path = workdir / "gateway.db"
        env = _gateway_env(cfg, options, gw_port, sim_port, twilio.base_url, db_path)
        env |= voice.gateway_env(cfg.voice, voice_port) | voice.backend_env(cfg.backend)
        gw_log = workdir / "gateway.log"
        procs.append(await _start_process([sys.executable, "-m", "gateway"], gw_log, env))
        if options.pin:
            os.sched_setaffinity(procs[-1].pid, {0})
        await _wait_ready(f"{cfg.gateway_url}/health", procs[-1], gw_log)
        print(f"spawned: gateway pid {procs[-1].pid}, logs in {workdir}", file=sys.stderr)
        sim_url = f"http://127.0.0.1:{sim_port}"
        voice_pid = procs[1].pid if voice_port is not None else None
        yield Stack(procs[-1].pid, LocalTwilio(twilio), db_path, procs[0].pid, sim_url, voice_pid)
    finally:
        for proc in reversed(procs):
            await _stop_process(proc)
        await twilio.close()
        os.sched_setaffinity(0, affinity)
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


async def _start_voice(
    cfg: LoadConfig, procs: list[asyncio.subprocess.Process], workdir: Path
) -> int | None:
    """The ElevenLabs simulator for --voice elevenlabs (its port), else nothing."""
    if cfg.voice != "elevenlabs":
        return None
    port, log = free_port(), workdir / "elevenlabs-sim.log"
    procs.append(await _start_process(voice.simulator_argv(port), log))
    await _wait_ready(f"http://127.0.0.1:{port}/", procs[-1], log)
    return port


def _live_vad_args(cfg: LoadConfig) -> list[str]:
    """GPT-Live's turn end as the gateway's VAD settings make the Realtime one's: the same
    silence window S and the same level (threshold 0..1 over the Realtime simulator's scale),
    so that the stop frame, hence the gateway's share, means the same on either backend."""
    from simulators.realtime_config import RealtimeSimConfig

    scale = RealtimeSimConfig()
    dbfs = scale.vad_floor_dbfs + scale.vad_span_db * cfg.vad_threshold
    return [
        "--live-vad-silence-ms",
        str(cfg.vad_silence_ms),
        "--live-vad-threshold-dbfs",
        str(dbfs),
    ]


def _inherited_env() -> dict[str, str]:
    """This process's environment without voice settings: the run's --voice and --backend
    decide."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in ("VOICE_PROVIDER", "VOICE_BACKEND") and not key.startswith("ELEVENLABS_")
    }


def _gateway_env(
    cfg: LoadConfig,
    options: SpawnOptions,
    port: int,
    sim_port: int,
    twilio_url: str,
    db_path: Path,
) -> dict[str, str]:
    return {
        **_inherited_env(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PUBLIC_BASE_URL": cfg.public_base_url,
        "DATABASE_URL": f"sqlite:///{db_path}",
        "OPENAI_API_KEY": "sk-loadtest-not-a-secret",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "TWILIO_ACCOUNT_SID": cfg.account_sid,
        "TWILIO_AUTH_TOKEN": cfg.auth_token,
        "TWILIO_API_BASE_URL": twilio_url,
        "VAD_SILENCE_MS": str(cfg.vad_silence_ms),
        "VAD_THRESHOLD": str(cfg.vad_threshold),
        "LOG_LEVEL": options.log_level,
        # The load is what is measured, not the gateway's caps: every call must get a line.
        "MAX_LIVE_CALLS": str(cfg.calls + cfg.warmup + 10),
        "MAX_PARKED_CALLS": str(cfg.calls + cfg.warmup + 10),
    }
