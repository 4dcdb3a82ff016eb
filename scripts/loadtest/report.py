"""The report as text."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .procstats import MachineReport, ProcessReport
from .results import CallsReport, CostReport, Report
from .summary import Summary
from .voice import backend_name, voice_name
from .whatsapp_burst import WhatsAppReport

OTHERS_WARN_CORES = 0.15  # CPU used by processes outside the test that makes a run suspect
NA_ON_LIVE = "n/a on live"  # the GPT-Live simulator keeps no /sim/timings of its sessions


def _row(label: str, s: Summary | None, missing: str = "-") -> str:
    if s is None or s.n == 0:
        return f"  {label:<44} {missing:>6}"
    cells = [f"{v:8.1f}" if v is not None else f"{'-':>8}" for v in (s.p50, s.p95, s.p99, s.max)]
    return f"  {label:<44} {s.n:>6}" + "".join(cells)


def format_text(report: Report) -> str:
    cfg = report.config
    lines = [
        f"Almada gateway load test: {cfg['calls']} calls x {cfg['turns']} turns, ramp "
        f"{cfg['ramp_s']:g} s, upstream first audio F = {cfg['first_audio_ms']:g} ms, "
        f"VAD silence S = {cfg['vad_silence_ms']} ms"
    ]
    backend = cfg.get("backend", "realtime")
    lines.append(f"backend: {backend_name(backend)}")
    lines.append(f"voice: {voice_name(cfg.get('voice', 'openai'), backend)}")
    lines += [f"setup: {note}" for note in report.setup]
    if report.warmup_greeting_ms:
        lines.append(f"warm-up greeting (not counted): {report.warmup_greeting_ms} ms")
    if report.calls is not None:
        lines += _calls_text(report.calls, backend)
        lines += _cost_text(report.calls.cost, cfg.get("voice", "openai"))
    if report.whatsapp is not None:
        lines += _whatsapp_text(report.whatsapp, backend)
    for t in report.targets:
        verdict = {True: "MET", False: "NOT MET", None: "n/a for this run"}[t.met]
        lines.append(f"target {t.name} <= {t.limit:g}: {t.value} -> {verdict}")
    return "\n".join(lines)


def _simulator_name(backend: str) -> str:
    return "realtime simulator (serving GPT-Live)" if backend == "live" else "realtime simulator"


def _calls_text(c: CallsReport, backend: str = "realtime") -> list[str]:
    header = f"  {'(ms)':<44} {'n':>6}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
    live = backend == "live"
    # On GPT-Live the gateway's turns table has no silence window in it: first frame sent
    # minus first delta received, its forwarding time alone (no round trip).
    view = (
        "gateway's view: turns table, frame - delta"
        if live
        else "gateway's view: its turns table - S"
    )
    missing = NA_ON_LIVE if live else "-"
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
        _row(view, c.gateway_view_ms),
        _row("share with the simulator's own latency", c.gateway_share_sim_ms, missing),
        _row("  the simulator's own latency - F", c.simulator_overshoot_ms, missing),
        "  (share: the stop frame is the ceil(S / 20 ms)-th frame after the last voiced one;",
        "   its arrival ends the VAD's silence window. See --help for every definition.)",
    ]
    if live:
        lines += [
            "  (live: the model ends the turn itself; the spawned simulator's silence window",
            "   and level are set to S and --vad-threshold. It keeps no timings of its own.)",
        ]
    for direction, b in c.gateway_forwarding.items():
        head = f"  gateway's own time per relayed frame, {direction} (its /metrics, sampled): "
        if b.n == 0:  # on GPT-Live the gateway times Realtime's audio deltas only
            outbound_live = live and direction == "outbound"
            why = ": it times Realtime's audio deltas, not Live's" if outbound_live else ""
            lines.append(f"{head}none timed{why}")
            continue
        lines.append(
            f"{head}n {b.n}, p50 <= {_le_text(b.p50_le_ms)}, p99 <= {_le_text(b.p99_le_ms)}"
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
        lines.append(_process_text(c.simulator_process, _simulator_name(backend)))
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


def _cost_text(cost: CostReport | None, voice: str = "openai") -> list[str]:
    title = f"cost per call-minute (USD, {cost.prices_file if cost else 'config/prices.toml'})"
    if cost is None:
        return [f"{title}: n/a (the gateway's store is read with --spawn or --db)"]
    if not cost.models:
        return [f"{title}: unknown (no usage rows recorded for the calls)"]
    total = "unknown" if cost.total_usd is None else f"{cost.total_usd:.4f}"
    per_minute = _usd(cost.per_call_minute_usd, "unknown (a model has no price)")
    lines = [f"{title}: {per_minute}; total {total} over {cost.call_minutes:g} call-minutes"]
    for m in cost.models:
        price = _usd(m["cost_usd"], "unknown (not in the price table)")
        lines.append(f"  {m['model'] or '(no model)'}: {price}; {_usage_text(m)}")
    if voice == "elevenlabs" and not any(m["characters"] for m in cost.models):
        lines.append("  (no ElevenLabs characters recorded for the calls: its voice is not in it)")
    return lines


def _usd(value: float | None, unknown: str) -> str:
    return unknown if value is None else f"{value:.4f}"


def _usage_text(m: Mapping[str, Any]) -> str:
    parts = [f"{m['responses']} rows"]
    if m["input_tokens"] or m["output_tokens"]:
        parts.append(
            f"tokens in {m['input_tokens']} (audio {m['input_audio_tokens']}), "
            f"out {m['output_tokens']} (audio {m['output_audio_tokens']})"
        )
    if m["characters"]:
        parts.append(f"{m['characters']} characters")
    if m["session_seconds"]:
        parts.append(f"{m['session_seconds']:g} session s")
    return ", ".join(parts)


def _whatsapp_text(w: WhatsAppReport, backend: str = "realtime") -> list[str]:
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
        lines.append(_process_text(w.simulator_process, _simulator_name(backend), "message"))
    if w.machine is not None:
        lines.append(_machine_text(w.machine))
    return lines


def format_side_by_side(reports: Mapping[str, Report], across: str = "voice") -> str:
    """--voice both or --backend both: the main figures of each run, one column each."""
    names = list(reports)
    each = "on each backend" if across == "backend" else "in each voice"
    lines = [f"side by side, the same load {each}:"]
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
    ("cost per call-minute (USD)", lambda c: _cost_cell(c.cost)),
    ("  models in the usage table", lambda c: _models_cell(c.cost)),
)


def _cost_cell(cost: CostReport | None) -> str:
    if cost is None:
        return "-"
    return _usd(cost.per_call_minute_usd, "unknown")


def _models_cell(cost: CostReport | None) -> str:
    if cost is None or not cost.models:
        return "-"
    return ", ".join(
        (m["model"] or "(no model)") + ("" if m["cost_usd"] is not None else " unknown")
        for m in cost.models
    )
