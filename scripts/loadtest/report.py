"""The report as text."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .procstats import MachineReport, ProcessReport
from .results import CallsReport, Report
from .summary import Summary
from .voice import voice_name
from .whatsapp_burst import WhatsAppReport

OTHERS_WARN_CORES = 0.15  # CPU used by processes outside the test that makes a run suspect


def _row(label: str, s: Summary | None) -> str:
    if s is None or s.n == 0:
        return f"  {label:<44} {'-':>6}"
    cells = [f"{v:8.1f}" if v is not None else f"{'-':>8}" for v in (s.p50, s.p95, s.p99, s.max)]
    return f"  {label:<44} {s.n:>6}" + "".join(cells)


def format_text(report: Report) -> str:
    cfg = report.config
    lines = [
        f"Almada gateway load test: {cfg['calls']} calls x {cfg['turns']} turns, ramp "
        f"{cfg['ramp_s']:g} s, upstream first audio F = {cfg['first_audio_ms']:g} ms, "
        f"VAD silence S = {cfg['vad_silence_ms']} ms"
    ]
    lines.append(f"voice: {voice_name(cfg.get('voice', 'openai'))}")
    lines += [f"setup: {note}" for note in report.setup]
    if report.warmup_greeting_ms:
        lines.append(f"warm-up greeting (not counted): {report.warmup_greeting_ms} ms")
    if report.calls is not None:
        lines += _calls_text(report.calls)
    if report.whatsapp is not None:
        lines += _whatsapp_text(report.whatsapp)
    for t in report.targets:
        verdict = {True: "MET", False: "NOT MET", None: "n/a for this run"}[t.met]
        lines.append(f"target {t.name} <= {t.limit:g}: {t.value} -> {verdict}")
    return "\n".join(lines)


def _calls_text(c: CallsReport) -> list[str]:
    header = f"  {'(ms)':<44} {'n':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
    lines = [
        f"calls: {c.ok} ok, {c.failed} failed{_errors_text(c.errors)}; turns measured "
        f"{c.turns_measured}/{c.turns_requested}; peak live calls {c.peak_live_calls}",
        header,
        _row("end of speech -> first reply frame", c.latency_ms),
        _row("greeting: stream start -> first frame", c.greeting_ms),
        _row("greeting from the voice webhook POST", c.dial_to_greeting_ms),
        _row("voice webhook answer", c.dial_ms),
        _row("gateway share: reply - stop frame - F", c.gateway_share_ms),
        _row("gateway share, naive: latency - S - F", c.gateway_share_naive_ms),
        _row("gateway's view: its turns table - S", c.gateway_view_ms),
        _row("share with the simulator's own latency", c.gateway_share_sim_ms),
        _row("  the simulator's own latency - F", c.simulator_overshoot_ms),
        "  (share: the stop frame is the ceil(S / 20 ms)-th frame after the last voiced one;",
        "   its arrival ends the VAD's silence window. See --help for every definition.)",
    ]
    for direction, b in c.gateway_forwarding.items():
        lines.append(
            f"  gateway's own time per relayed frame, {direction} (its /metrics, sampled): "
            f"n {b.n}, p50 <= {_le_text(b.p50_le_ms)}, p99 <= {_le_text(b.p99_le_ms)}"
        )
    if c.gateway_gc_pauses:  # every live stream stalls during a collection
        pauses = "; ".join(
            f"gen {gen}: n {b.n}" + (f", max <= {_le_text(b.max_le_ms)}" if b.n else "")
            for gen, b in c.gateway_gc_pauses.items()
        )
        lines.append(f"  gateway's garbage-collector pauses (its /metrics): {pauses}")
    if (lag := c.gateway_loop_lag) is not None and lag.n:
        lines.append(
            f"  gateway's event-loop lag, a 50 ms timer (its /metrics): n {lag.n}, "
            f"p50 <= {_le_text(lag.p50_le_ms)}, p99 <= {_le_text(lag.p99_le_ms)}, "
            f"max <= {_le_text(lag.max_le_ms)}"
        )
    f, g = c.frames, c.generator
    lines.append(
        f"reply audio: {f.reply_frames} frames in {f.reply_messages} media messages; "
        f"{f.violations} protocol violations"
        f"{' ' + str(f.violation_reasons) if f.violation_reasons else ''}; "
        f"{f.odd_size_frames} not whole 160-byte frames; "
        f"{f.reply_gaps_over_40ms} gaps > 40 ms (max {f.max_reply_gap_ms} ms); "
        f"{f.underruns} underruns"
    )
    lines.append(
        f"load generator ({g.processes} process(es)): {g.frames_sent} frames sent, "
        f"{g.late_frames_over_20ms} >= 20 ms late (p99 {g.send_lateness_ms.p99}, max "
        f"{g.send_lateness_ms.max}); loop lag p99 {g.loop_lag_ms.p99} max {g.loop_lag_ms.max} "
        f"ms; CPU {g.cpu_s} s"
    )
    if c.gateway_process is not None:
        lines.append(_process_text(c.gateway_process))
    if c.simulator_process is not None:
        lines.append(_process_text(c.simulator_process, "realtime simulator"))
    if c.voice_process is not None:
        lines.append(_process_text(c.voice_process, "elevenlabs simulator"))
    if c.machine is not None:
        lines.append(_machine_text(c.machine))
    return lines


def _machine_text(m: MachineReport) -> str:
    text = f"machine: {m.cores_busy} of {m.cores} cores busy; others {m.other_cores} cores"
    if m.other_cores is not None and m.other_cores > OTHERS_WARN_CORES:
        text += "\nWARNING: other processes loaded the machine during the run: figures perturbed"
    return text


def _le_text(ms: float | None) -> str:
    return "(above the top bucket)" if ms is None else f"{ms:g} ms"


def _resolution(ms: float | None) -> str:
    return "exact" if not ms else f"to within {ms:g} ms (polled)"


def _errors_text(errors: Mapping[str, int]) -> str:
    return " (" + ", ".join(f"{k} x{n}" for k, n in errors.items()) + ")" if errors else ""


def _process_text(p: ProcessReport, name: str = "gateway", unit: str = "call") -> str:
    cpu = [f"{p.cpu_ms_per_call} ms per {unit}"] if p.cpu_ms_per_call is not None else []
    if p.core_pct_per_live_call is not None:
        cpu.append(f"{p.core_pct_per_live_call} % of a core per live call")
    if p.cpu_ms_per_call_minute is not None:
        cpu.append(f"{p.cpu_ms_per_call_minute} ms per call-minute")
    rss = f" ({p.rss_kb_per_live_call} KB per live call)" if p.rss_kb_per_live_call else ""
    return (
        f"{name} pid {p.pid}: CPU {p.cpu_s} s over {p.wall_s} s ({p.cores_busy} cores)"
        + "".join(f", {part}" for part in cpu)
        + f"; RSS {p.rss_before_mb} -> {p.rss_peak_mb} MB peak{rss}, VmHWM {p.vm_hwm_mb} MB"
    )


def _whatsapp_text(w: WhatsAppReport) -> list[str]:
    lines = [
        f"whatsapp burst: {w.messages} {w.kind} messages, webhook statuses {w.statuses}"
        + (f", errors {w.errors}" if w.errors else ""),
        _row("webhook answer", w.webhook_ms),
    ]
    if not w.channel:
        lines.append("  the gateway has no WhatsApp channel (no 2xx): no reply times")
    elif w.reply_ms is not None:
        lines += [
            _row(f"message -> first reply ({w.replied} replied)", w.reply_ms),
            _row(f"message -> voice-note reply ({w.voice_replied})", w.voice_reply_ms),
            f"  (reply times at the Twilio simulator, {_resolution(w.reply_resolution_ms)})",
        ]
    if w.gateway_process is not None:
        lines.append(_process_text(w.gateway_process, unit="message"))
    if w.simulator_process is not None:
        lines.append(_process_text(w.simulator_process, "realtime simulator", "message"))
    if w.machine is not None:
        lines.append(_machine_text(w.machine))
    return lines


def format_side_by_side(reports: Mapping[str, Report]) -> str:
    """--voice both: the main figures of each voice's run, one column per voice."""
    names = list(reports)
    lines = ["side by side, the same load in each voice:"]
    lines.append(f"  {'':<40}" + "".join(f"{v:>26}" for v in names))
    for label, cell in _SIDE_ROWS:
        cells = [cell(c) if (c := reports[v].calls) is not None else "-" for v in names]
        lines.append(f"  {label:<40}" + "".join(f"{text:>26}" for text in cells))
    return "\n".join(lines)


def _triple(s: Summary | None) -> str:
    if s is None or s.n == 0:
        return "-"
    return " / ".join(f"{v:.1f}" if v is not None else "-" for v in (s.p50, s.p95, s.p99))


def _gateway(c: CallsReport, field: str) -> str:
    value = getattr(c.gateway_process, field, None)
    return "-" if value is None else f"{value:g}"


_SIDE_ROWS: tuple[tuple[str, Callable[[CallsReport], str]], ...] = (
    ("calls ok / failed", lambda c: f"{c.ok} / {c.failed}"),
    ("turns measured", lambda c: f"{c.turns_measured}/{c.turns_requested}"),
    ("turn p50 / p95 / p99 (ms)", lambda c: _triple(c.latency_ms)),
    ("gateway share p50 / p95 / p99 (ms)", lambda c: _triple(c.gateway_share_ms)),
    ("greeting p50 / p95 / p99 (ms)", lambda c: _triple(c.greeting_ms)),
    ("gateway CPU per call-minute (ms)", lambda c: _gateway(c, "cpu_ms_per_call_minute")),
    ("gateway CPU per call (ms)", lambda c: _gateway(c, "cpu_ms_per_call")),
    ("others' load (cores)", lambda c: str(c.machine.other_cores if c.machine else "-")),
)
