"""The call load in one process, or split over generator processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulators.caller import FRAME_S

from .callers import CallResult, run_call, turn_clips
from .config import LoadConfig
from .progress import Progress

GOLDEN = (math.sqrt(5) - 1) / 2  # phase step: the most even spread of any count
# Workers start through the same entry a person runs (the package is importable from there).
ENTRY = str(Path(__file__).resolve().parent.parent / "loadtest.py")


class LagMonitor:
    """This process's event-loop lag: how late a 10 ms sleep wakes. A busy generator shows."""

    PERIOD_S = 0.010

    def __init__(self) -> None:
        self.lag_ms: Counter[int] = Counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.PERIOD_S)
            self.lag_ms[int((loop.time() - before - self.PERIOD_S) * 1000)] += 1


@dataclass
class CallBatch:
    """What one generator process measured."""

    results: list[CallResult] = field(default_factory=list)
    loop_lag_ms: dict[int, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    processes: int = 1

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallBatch:
        return cls(
            results=[CallResult.from_json(r) for r in data["results"]],
            loop_lag_ms={int(k): v for k, v in data["loop_lag_ms"].items()},
            cpu_s=data["cpu_s"],
        )

    @classmethod
    def merge(cls, batches: list[CallBatch]) -> CallBatch:
        lag: Counter[int] = Counter()
        for batch in batches:
            lag.update(batch.loop_lag_ms)
        results = sorted((r for b in batches for r in b.results), key=lambda r: r.index)
        cpu = sum(b.cpu_s for b in batches)
        return cls(results, dict(lag), cpu, sum(b.processes for b in batches))


async def run_calls(
    cfg: LoadConfig, indices: Iterable[int], start_at: float, progress: Progress
) -> CallBatch:
    """Calls `indices` of the load, call i starting at start_at + start_offset(cfg, i)."""
    turn_clips(cfg.speech_ms, cfg.vad_threshold)  # synthesize before the clock starts
    lag = LagMonitor()
    lag.start()
    cpu_before = time.process_time()
    deadline = start_at + cfg.max_s  # the whole call phase, ramp included
    results = await asyncio.gather(
        *(run_call(cfg, i, start_at + start_offset(cfg, i), deadline, progress) for i in indices)
    )
    await lag.stop()
    return CallBatch(list(results), dict(lag.lag_ms), time.process_time() - cpu_before)


def start_offset(cfg: LoadConfig, index: int) -> float:
    """When call `index` starts, from the start of the load: evenly over the ramp and, with
    `phases="spread"`, at a phase of the 20 ms frame clock of its own.

    Real calls start at unrelated instants, so their frames reach the gateway at phases
    spread over the 20 ms period; the golden-ratio sequence spreads N phases evenly.
    `phases="grid"` starts every call on the same 20 ms grid, so every caller's frame
    lands within the same few ms (the dial's jitter): a burst of N frames per period that
    no phone network produces, kept as a stress case.
    """
    step = cfg.ramp_s / max(cfg.calls, 1)
    if cfg.phases == "grid":
        return round(index * step / FRAME_S) * FRAME_S
    return index * step + (index * GOLDEN % 1.0) * FRAME_S


# ---- generator workers -----------------------------------------------------------------


async def run_calls_in_workers(cfg: LoadConfig, progress: Progress) -> CallBatch:
    """Split the callers round-robin over `cfg.workers` processes; merge what they measured."""
    config = json.dumps(asdict(cfg))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            ENTRY,
            "--worker",
            config,
            str(index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # the result is one long JSON line
        )
        for index in range(cfg.workers)
    ]
    try:
        for proc in procs:  # each has imported and synthesized its speech
            assert proc.stdout is not None
            if (await proc.stdout.readline()).strip() != b"ready":
                raise RuntimeError("a load generator worker failed to start")
        start_at = time.monotonic() + 0.2  # CLOCK_MONOTONIC is shared by all processes
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start_at!r}\n".encode())
            await proc.stdin.drain()
        batches = await asyncio.gather(*(_read_worker(proc, progress) for proc in procs))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    return CallBatch.merge(list(batches))


async def _read_worker(proc: asyncio.subprocess.Process, progress: Progress) -> CallBatch:
    assert proc.stdout is not None
    async for line in proc.stdout:
        message = json.loads(line)
        if "event" in message:
            progress.apply(message["event"])
        elif "result" in message:
            return CallBatch.from_json(message["result"])
    raise RuntimeError(f"a load generator worker exited without a result ({proc.returncode})")


def worker_main(config: str, worker_index: int) -> None:
    """A generator process: its share of the callers, events and result as JSON lines."""
    cfg = LoadConfig(**json.loads(config))

    def emit(message: Mapping[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def work() -> None:
        turn_clips(cfg.speech_ms, cfg.vad_threshold)
        print("ready", flush=True)
        start_at = float(await asyncio.to_thread(sys.stdin.readline))
        progress = Progress(listener=lambda event: emit({"event": event}))
        indices = range(worker_index, cfg.calls, cfg.workers)
        batch = await run_calls(cfg, indices, start_at, progress)
        emit({"result": asdict(batch)})

    asyncio.run(work())
