"""What is observed around a measured phase besides the callers."""

from __future__ import annotations

from dataclasses import dataclass

from .metrics_scrape import SCRAPED, Buckets, BucketSummary, histogram_report, scrape_histograms
from .procstats import MachineReport, ProcessReport, ProcWatch, machine_report, read_machine
from .stack import Stack


@dataclass
class Watches:
    """What is observed around the call phase besides the callers: processes, box, /metrics."""

    gateway_url: str
    gateway: ProcWatch | None
    simulator: ProcWatch | None
    voice: ProcWatch | None  # the ElevenLabs simulator
    machine_before: tuple[float, float]
    histograms_before: dict[str, Buckets]

    @classmethod
    async def start(cls, stack: Stack, gateway_url: str) -> Watches:
        return cls(
            gateway_url,
            ProcWatch(stack.gateway_pid) if stack.gateway_pid else None,
            ProcWatch(stack.simulator_pid) if stack.simulator_pid else None,
            ProcWatch(stack.voice_pid) if stack.voice_pid else None,
            read_machine(),
            await scrape_histograms(gateway_url),
        )

    async def finish(
        self, units: int, live: int, call_seconds: float, own_cpu_s: float
    ) -> Observed:
        """`own_cpu_s`: the load generator's CPU, so that the rest is others' load."""
        machine = machine_report(self.machine_before, read_machine())
        histograms = await scrape_histograms(self.gateway_url)
        processes: list[ProcessReport | None] = []
        for watch in (self.gateway, self.simulator, self.voice):
            if watch is not None:
                await watch.stop()
            processes.append(watch.report(units, live, call_seconds) if watch else None)
        ours = own_cpu_s + sum(p.cpu_s for p in processes if p is not None)
        if machine.wall_s:
            machine.other_cores = round(machine.cores_busy - ours / machine.wall_s, 2)
        before = self.histograms_before
        forwarding, gc_pauses, loop_lag = (
            histogram_report(before.get(name), histograms.get(name)) for name in SCRAPED
        )
        gateway, simulator, voice = processes
        return Observed(gateway, simulator, machine, forwarding, gc_pauses, loop_lag.get(""), voice)


@dataclass
class Observed:
    gateway: ProcessReport | None
    simulator: ProcessReport | None
    machine: MachineReport
    forwarding: dict[str, BucketSummary]
    gc_pauses: dict[str, BucketSummary]
    loop_lag: BucketSummary | None
    voice: ProcessReport | None = None
