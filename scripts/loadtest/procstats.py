"""CPU and RSS of a process, and the whole machine's CPU, sampled from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.25  # /proc sampling period


@dataclass
class ProcSample:
    cpu_s: float
    rss_kb: int
    hwm_kb: int


def read_proc(pid: int) -> ProcSample:
    """utime + stime from /proc/<pid>/stat, VmRSS and VmHWM from /proc/<pid>/status."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    after_name = stat[stat.rindex(")") + 2 :].split()  # field 3 (state) onwards
    ticks = int(after_name[11]) + int(after_name[12])  # fields 14 and 15
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value
    kb = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return ProcSample(ticks / os.sysconf("SC_CLK_TCK"), kb["VmRSS"], kb["VmHWM"])


@dataclass
class ProcessReport:
    pid: int
    wall_s: float
    cpu_s: float
    cores_busy: float
    rss_before_mb: float
    rss_peak_mb: float
    vm_hwm_mb: float
    cpu_ms_per_call: float | None = None
    core_pct_per_live_call: float | None = None  # CPU / total call time
    cpu_ms_per_call_minute: float | None = None  # the same, as ms of CPU per minute of call
    rss_kb_per_live_call: float | None = None


class ProcWatch:
    """CPU and RSS of one process over a measured window, RSS sampled every 250 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = read_proc(pid)
        self.after = self.before
        self.peak_rss_kb = self.before.rss_kb
        self.started = time.monotonic()
        self.wall_s = 0.0
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            with contextlib.suppress(OSError):  # the process may be ending
                self.peak_rss_kb = max(self.peak_rss_kb, read_proc(self.pid).rss_kb)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.wall_s = time.monotonic() - self.started
        with contextlib.suppress(OSError):
            self.after = read_proc(self.pid)
            self.peak_rss_kb = max(self.peak_rss_kb, self.after.rss_kb)

    def report(self, calls: int, live: int, call_seconds: float) -> ProcessReport:
        cpu = self.after.cpu_s - self.before.cpu_s
        report = ProcessReport(
            pid=self.pid,
            wall_s=round(self.wall_s, 2),
            cpu_s=round(cpu, 2),
            cores_busy=round(cpu / self.wall_s, 3) if self.wall_s else 0.0,
            rss_before_mb=round(self.before.rss_kb / 1024, 1),
            rss_peak_mb=round(self.peak_rss_kb / 1024, 1),
            vm_hwm_mb=round(self.after.hwm_kb / 1024, 1),
        )
        if calls:
            report.cpu_ms_per_call = round(cpu * 1000 / calls, 1)
        if call_seconds:
            report.core_pct_per_live_call = round(100 * cpu / call_seconds, 3)
            report.cpu_ms_per_call_minute = round(cpu * 1000 * 60 / call_seconds, 1)
        if live:
            report.rss_kb_per_live_call = round((self.peak_rss_kb - self.before.rss_kb) / live, 1)
        return report


@dataclass
class MachineReport:
    """All CPUs over the call phase (/proc/stat): is the box itself saturated?"""

    cores: int
    wall_s: float
    cores_busy: float
    other_cores: float | None = None  # busy minus gateway, simulator and callers: others' load


def read_machine() -> tuple[float, float]:
    """(busy, total) seconds of all CPUs since boot, from the first line of /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def machine_report(before: tuple[float, float], after: tuple[float, float]) -> MachineReport:
    cores = os.cpu_count() or 1
    total = (after[1] - before[1]) / cores  # wall seconds
    busy = after[0] - before[0]
    return MachineReport(cores, round(total, 2), round(busy / total, 2) if total else 0.0)
