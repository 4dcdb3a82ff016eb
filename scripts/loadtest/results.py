"""What the run measured, as dataclasses: the callers' results added up, and the targets."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.store.lifecycle import USAGE_TOTALS
from gateway.usage import cost_usd, load_prices

from .callers import CallResult
from .config import LoadConfig
from .metrics_scrape import BucketSummary
from .procstats import MachineReport, ProcessReport
from .progress import Progress
from .summary import Summary
from .whatsapp_burst import WhatsAppReport
from .workers import CallBatch

LATE_FRAME_MS = 20  # a caller frame a whole frame late means the generator fell behind
ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
PRICES_FILE = "config/prices.toml"  # the gateway's default PRICES_FILE, from the repository
# The gateway's usage columns per model, added up as the store's usage_by_model does.
USAGE_BY_MODEL = f"{USAGE_TOTALS} WHERE id > ? GROUP BY model ORDER BY model"


@dataclass
class FramesReport:
    reply_messages: int  # `media` messages
    reply_frames: int  # 160-byte frames in them
    violations: int
    violation_reasons: list[str]
    odd_size_frames: int
    reply_gaps_over_40ms: int
    max_reply_gap_ms: float
    underruns: int


@dataclass
class GeneratorReport:
    processes: int
    frames_sent: int
    late_frames_over_20ms: int
    send_lateness_ms: Summary
    loop_lag_ms: Summary
    cpu_s: float


@dataclass
class CostReport:
    """The measured calls' usage rows in the gateway's store (all people, per model), priced
    with the price table: USD per minute of call (stream start -> hang-up, at the callers)."""

    prices_file: str
    call_minutes: float
    models: list[dict[str, Any]]  # usage_by_model's columns, and cost_usd (None: no price)
    total_usd: float | None  # None if a model has no price: a partial sum would understate
    per_call_minute_usd: float | None


@dataclass
class CallsReport:
    calls: int
    ok: int
    failed: int
    errors: dict[str, int]
    turns_requested: int
    turns_measured: int
    peak_live_calls: int
    latency_ms: Summary  # end of caller speech -> first reply frame
    greeting_ms: Summary  # stream start -> first frame
    dial_to_greeting_ms: Summary
    dial_ms: Summary  # voice webhook answer time
    gateway_share_ms: Summary
    gateway_share_naive_ms: Summary
    gateway_view_ms: Summary | None
    gateway_share_sim_ms: Summary | None  # share with the simulator's measured latency, not F
    simulator_overshoot_ms: Summary | None  # the simulator's own latency - F
    gateway_forwarding: dict[str, BucketSummary]  # its /metrics, per direction
    gateway_gc_pauses: dict[str, BucketSummary]  # its /metrics, per collector generation
    gateway_loop_lag: BucketSummary | None  # its /metrics: how late a 50 ms timer fired
    frames: FramesReport
    generator: GeneratorReport
    gateway_process: ProcessReport | None = None
    simulator_process: ProcessReport | None = None
    voice_process: ProcessReport | None = None  # the ElevenLabs simulator
    machine: MachineReport | None = None
    cost: CostReport | None = None  # with --spawn or --db


@dataclass
class Target:
    name: str
    limit: float
    value: float | None
    met: bool | None


@dataclass
class Report:
    config: dict[str, Any]
    setup: list[str] = field(default_factory=list)  # how the processes were arranged
    warmup_greeting_ms: list[float] = field(default_factory=list)
    calls: CallsReport | None = None
    whatsapp: WhatsAppReport | None = None
    targets: list[Target] = field(default_factory=list)


def calls_report(cfg: LoadConfig, batch: CallBatch, progress: Progress) -> CallsReport:
    results = batch.results
    turns = [t for r in results for t in r.turns]
    errors = Counter(r.error_kind for r in results if r.error_kind)
    return CallsReport(
        calls=len(results),
        ok=sum(r.error is None for r in results),
        failed=sum(r.error is not None for r in results),
        errors=dict(errors),
        turns_requested=cfg.calls * cfg.turns,
        turns_measured=len(turns),
        peak_live_calls=progress.peak_live,
        latency_ms=Summary.of(t.latency_ms for t in turns),
        greeting_ms=Summary.of(r.greeting_ms for r in results),
        dial_to_greeting_ms=Summary.of(r.dial_to_greeting_ms for r in results),
        dial_ms=Summary.of(r.dial_ms for r in results),
        gateway_share_ms=Summary.of(t.share_ms for t in turns),
        gateway_share_naive_ms=Summary.of(t.naive_share_ms for t in turns),
        gateway_view_ms=None,
        gateway_share_sim_ms=None,
        simulator_overshoot_ms=None,
        gateway_forwarding={},
        gateway_gc_pauses={},
        gateway_loop_lag=None,
        frames=frames_report(results),
        generator=generator_report(batch),
    )


def frames_report(results: list[CallResult]) -> FramesReport:
    reasons = sorted({reason for r in results for reason in r.violation_reasons})
    return FramesReport(
        reply_messages=sum(r.reply_messages for r in results),
        reply_frames=sum(r.reply_frames for r in results),
        violations=sum(r.violations for r in results),
        violation_reasons=reasons[:5],
        odd_size_frames=sum(r.odd_size_frames for r in results),
        reply_gaps_over_40ms=sum(r.reply_gaps for r in results),
        max_reply_gap_ms=round(max((r.max_reply_gap_ms for r in results), default=0.0), 1),
        underruns=sum(r.underruns for r in results),
    )


def generator_report(batch: CallBatch) -> GeneratorReport:
    lateness: Counter[int] = Counter()
    for result in batch.results:
        lateness.update(result.lateness_ms)
    return GeneratorReport(
        processes=batch.processes,
        frames_sent=sum(r.frames_sent for r in batch.results),
        late_frames_over_20ms=sum(n for ms, n in lateness.items() if ms >= LATE_FRAME_MS),
        send_lateness_ms=Summary.of_counts(lateness),
        loop_lag_ms=Summary.of_counts(batch.loop_lag_ms),
        cpu_s=round(batch.cpu_s, 2),
    )


def gateway_view(db_path: Path, since_id: int, silence_ms: int) -> Summary:
    """The gateway's own record: response_latency - upstream_first_audio - S per turn."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT response_latency_ms - upstream_first_audio_ms FROM turns "
            "WHERE id > ? AND response_latency_ms IS NOT NULL "
            "AND upstream_first_audio_ms IS NOT NULL",
            (since_id,),
        ).fetchall()
    return Summary.of(row[0] - silence_ms for row in rows)


def last_turn_id(db_path: Path | None) -> int:
    return _last_id(db_path, "turns")


def last_usage_id(db_path: Path | None) -> int:
    return _last_id(db_path, "usage")


def _last_id(db_path: Path | None, table: str) -> int:
    if db_path is None or not db_path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            return db.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return 0


def usage_by_model(db_path: Path, since_id: int) -> list[dict[str, Any]]:
    """The usage rows written after `since_id`, added up per model (all people)."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(USAGE_BY_MODEL, (since_id,)).fetchall()]


def cost_report(rows: list[dict[str, Any]], call_seconds: float) -> CostReport:
    """`rows` priced with the price table (a model missing from it: cost None, "unknown")."""
    prices = load_prices(ROOT / PRICES_FILE)
    models = []
    for row in rows:
        cost = cost_usd(prices.get(row["model"]), row)
        models.append({**row, "cost_usd": None if cost is None else round(cost, 6)})
    costs = [m["cost_usd"] for m in models]
    # No rows at all is not a free call: the store did not record it (None, not 0).
    total = None if not costs or any(c is None for c in costs) else round(sum(costs), 6)
    minutes = call_seconds / 60
    per_minute = round(total / minutes, 6) if total is not None and minutes > 0 else None
    return CostReport(PRICES_FILE, round(minutes, 3), models, total, per_minute)


def evaluate(cfg: LoadConfig, report: Report) -> list[Target]:
    """Issue 6's targets and issue 15's turn; `met` is None when this run cannot tell."""
    calls = report.calls
    if calls is None:
        return []
    share = calls.gateway_share_ms.p99
    greeting = calls.greeting_ms.p99
    limit = cfg.first_audio_ms + 20
    proc = calls.gateway_process
    rss = proc.rss_kb_per_live_call if proc else None
    # The share target is set at 100 live calls: another load can neither meet nor miss it.
    share_met = _le(share, 5.0) if calls.peak_live_calls == 100 else None
    turn = calls.latency_ms.p95
    return [
        Target("gateway share p99 (ms), at 100 calls", 5.0, share, share_met),
        Target("turn p95 (ms): end of speech -> first reply frame", 800.0, turn, _le(turn, 800.0)),
        Target("greeting p99 (ms): first audio + 20", limit, greeting, _le(greeting, limit)),
        Target("RSS per live call (KB)", 1024.0, rss, _le(rss, 1024.0)),
    ]


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit
