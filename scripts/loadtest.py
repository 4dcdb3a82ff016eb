"""Load test: N concurrent simulated phone calls (and a WhatsApp burst) against the gateway.

    # All spawned here: the gateway, a Realtime simulator in its own process (first audio
    # 300 ms) and the Twilio simulator (in this process), so /proc shows the gateway alone.
    .venv/bin/python scripts/loadtest.py --spawn --calls 100 --turns 3 --ramp-s 10
    # Against a gateway already running (its pid gives CPU and RSS):
    .venv/bin/python scripts/loadtest.py --gateway http://127.0.0.1:8080 --gateway-pid 1234
    # A burst of 200 signed WhatsApp webhooks (voice notes), reply time at the Twilio simulator:
    .venv/bin/python scripts/loadtest.py --spawn --calls 0 --whatsapp 200

Each caller is `simulators.caller.SimulatedCaller`: the signed voice webhook, the media
stream, a 160-byte mu-law frame every 20 ms for the whole call (silence between utterances),
Twilio's playback buffer and mark echoes. A call waits for the greeting to play out, then says
`--turns` utterances of speech-like audio, each once the previous reply has played out.

Definitions (milliseconds):

* latency: end of caller speech -> first reply frame, at the caller: arrival of the first
  `media` frame after the turn minus the send time of the turn's last speech frame.
* greeting: stream start (the caller sent `start`) -> first `media` frame. The gateway opens
  the Realtime session and asks for the greeting while Twilio fetches the TwiML, so this can be
  less than the upstream's first-audio time F. Target: <= F + 20 ms.
* gateway share, what the gateway adds to the latency:

      share = first reply frame at the caller - send time of the VAD's stop frame - F

  F is the simulator's first-audio latency (`--latency-ms`: response.created -> first audio
  delta). The stop frame is the ceil(S / 20)-th frame after the last speech frame, S being
  the VAD silence window (`--vad-silence-ms`): the simulator's server VAD says
  `speech_stopped` and starts the response when the S ms of silence after the last voiced
  20 ms window have arrived. Each utterance is cut after its last frame that is voiced by the
  simulator's own energy rule, so the stop frame is known exactly. What remains: that frame's
  trip caller -> gateway -> simulator, the simulator's VAD step and timer slack, the first
  delta's trip simulator -> gateway -> caller, and the caller's receive scheduling. It is an
  upper bound on the gateway's own share. The issue's simpler form `latency - S - F` is shown
  as "naive": the same, give or take the caller's own send jitter over those S ms.
* gateway's view (only with --spawn or --db): from the gateway's `turns` table,
  response_latency_ms - upstream_first_audio_ms - S. The gateway dates the end of speech
  by the arrival of the last voiced frame (speech_stopped.audio_end_ms - S), so this is
  (first frame sent - first delta received) + (speech_stopped received - stop frame
  received): its forwarding time plus one gateway <-> simulator round trip, without the
  caller's socket.
* frames: protocol violations (anything that is not an exact Twilio shape, per the caller),
  `media` payloads that are not a whole number of 160-byte (20 ms) frames, reply gaps
  (consecutive `media` messages of one reply arriving more than 40 ms apart) and underruns
  (a `media` message arriving after the caller's playback buffer ran dry: an audible gap).
* load generator: how late the callers sent their frames against the 20 ms schedule, and the
  event-loop lag of each generator process. When these grow the generator is saturated and
  its figures, not the gateway, are suspect: split the callers with `--workers`.
* gateway process: CPU seconds (utime + stime of /proc/<pid>/stat) over the load, per call and
  per live call; RSS from /proc/<pid>/status sampled every 250 ms: (peak - before) / peak live
  calls, and VmHWM (the peak over the process's whole life).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

SCRIPT = str(Path(__file__).resolve())
ROOT = Path(SCRIPT).parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from gateway.runtime import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN  # noqa: E402
from simulators.caller import FRAME_BYTES, FRAME_S, SimulatedCaller, Turn  # noqa: E402
from simulators.realtime import RealtimeSimConfig, vad_params, window_power  # noqa: E402
from simulators.speech import speech_mulaw, speech_pcm24k  # noqa: E402
from simulators.whatsapp_sender import WebhookResult, WhatsAppSender, new_sid  # noqa: E402

BYTES_PER_S = 8000  # mu-law at 8 kHz
GAP_S = 0.040  # a reply frame later than this after the previous one is a gap
LATE_FRAME_MS = 20  # a caller frame a whole frame late means the generator fell behind
PLAYOUT_TIMEOUT_S = 60.0  # a reply of the longest simulated length plays in < 20 s
SAMPLE_S = 0.25  # /proc sampling period
SETTLE_S = 3.0  # after the warm-up
GOLDEN = (math.sqrt(5) - 1) / 2  # phase step: the most even spread of any count
OTHERS_WARN_CORES = 0.15  # CPU used by processes outside the test that makes a run suspect


# ---- configuration ---------------------------------------------------------------------


@dataclass
class LoadConfig:
    gateway_url: str = "http://127.0.0.1:8080"
    public_base_url: str = ""  # what Twilio signs over; default: gateway_url
    auth_token: str = SANDBOX_AUTH_TOKEN
    account_sid: str = SANDBOX_ACCOUNT_SID
    calls: int = 10
    turns: int = 3
    ramp_s: float = 5.0  # call i starts at about i * ramp_s / calls (see start_offset)
    phases: str = "spread"  # spread: callers' frame clocks at unrelated phases | grid
    speech_ms: int = 1500  # length of each utterance before trimming to its last voiced frame
    first_audio_ms: float = 300.0  # the simulator's response.created -> first delta
    vad_silence_ms: int = 500  # the gateway's VAD_SILENCE_MS
    vad_threshold: float = 0.5  # the gateway's VAD_THRESHOLD
    reply_timeout_s: float = 10.0
    quiet_s: float = 0.3  # playback idle: buffer empty and no audio for this long
    max_s: float = 90.0  # hard bound on the call phase, ramp included
    workers: int = 1  # generator processes (callers split round-robin)
    warmup: int = 1  # calls before the measured load (cold imports, first connections)
    whatsapp: int = 0  # burst size; 0: no burst
    whatsapp_kind: str = "voice"  # voice (needs a Twilio simulator for the media) | text
    whatsapp_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.public_base_url = (self.public_base_url or self.gateway_url).rstrip("/")

    @property
    def silence_frames(self) -> int:
        return math.ceil(self.vad_silence_ms / (FRAME_S * 1000))


# ---- measured callers ------------------------------------------------------------------


def voiced_clip(duration_ms: int, seed: int, threshold: float) -> bytes:
    """Speech cut after its last frame that the simulator's VAD calls voiced."""
    audio = speech_mulaw(duration_ms, seed)
    params = vad_params({"type": "server_vad", "threshold": threshold}, RealtimeSimConfig())
    assert params is not None
    power = window_power(audio, "audio/pcmu", FRAME_BYTES)
    voiced = np.flatnonzero(power >= params.power_threshold)
    if voiced.size == 0:
        raise ValueError(f"speech seed {seed} has no voiced frame at threshold {threshold}")
    return audio[: (int(voiced[-1]) + 1) * FRAME_BYTES]


@cache
def turn_clips(duration_ms: int, threshold: float, count: int = 3) -> tuple[bytes, ...]:
    return tuple(voiced_clip(duration_ms, seed, threshold) for seed in range(count))


@dataclass
class ReplyFrames:
    """Reply audio as received, counted on the fly: gaps and underruns within each reply.

    A reply is what arrives between two caller utterances (segment = turns begun so far).
    A `media` message may carry several 160-byte frames; an underrun is a message arriving
    after the playback of everything before it had ended.
    """

    messages: int = 0
    frames: int = 0  # 20 ms of audio each
    odd_size: int = 0  # payloads that are not a whole number of 160-byte frames
    gaps: int = 0  # > 40 ms since the previous message of the same reply
    max_gap_ms: float = 0.0
    underruns: int = 0
    _segment: int = -1
    _previous: float = 0.0
    _play_end: float = 0.0

    def add(self, at: float, segment: int, payload: object) -> None:
        size = _decoded_size(payload)
        self.messages += 1
        self.frames += size // FRAME_BYTES
        self.odd_size += size == 0 or size % FRAME_BYTES != 0
        duration = size / BYTES_PER_S
        if segment == self._segment:
            gap = at - self._previous
            self.max_gap_ms = max(self.max_gap_ms, gap * 1000)
            self.gaps += gap > GAP_S
            self.underruns += at > self._play_end + 0.001
            self._play_end = max(at, self._play_end) + duration
        else:
            self._segment, self._play_end = segment, at + duration
        self._previous = at


def _decoded_size(payload: object) -> int:
    """Bytes a base64 payload decodes to, without decoding it (0 if it is not base64-sized)."""
    if not isinstance(payload, str) or len(payload) % 4:
        return 0
    return len(payload) // 4 * 3 - payload[-2:].count("=")


class MeasuredCaller(SimulatedCaller):
    """A SimulatedCaller that times its own frames and keeps no per-message records.

    200 callers' message records add up to a million objects, and the garbage collector's
    full passes over them stall the generator for hundreds of ms: counted on the fly instead.
    """

    POLL_S = 0.020  # the base class polls its conditions every 5 ms; 4x fewer wake-ups

    def __init__(self, *args: Any, silence_frames: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.silence_frames = silence_frames
        self.sent_at: dict[int, float] = {}  # media chunk number -> when it was sent
        self.lateness_ms: Counter[int] = Counter()  # whole ms late vs the 20 ms schedule
        self.last_speech_chunk: list[int] = []  # per turn
        self.reply = ReplyFrames()
        self._last_chunk = 0

    async def _send(self, message: dict[str, Any], *, numbered: bool = False) -> bool:
        media = message.get("media") if message.get("event") == "media" else None
        if media is None or self.started_at is None:
            return await super()._send(message, numbered=numbered)
        loop = asyncio.get_running_loop()
        chunk = int(media["chunk"])
        late_ms = (loop.time() - (self.started_at + chunk * FRAME_S)) * 1000
        sent = await super()._send(message, numbered=numbered)
        if sent:
            self.sent_at[chunk] = loop.time()
            self.lateness_ms[max(0, int(late_ms))] += 1
            self._last_chunk = chunk
        return sent

    def _after_speech_frame(self, now: float) -> None:
        super()._after_speech_frame(now)
        if self.turns[-1].speech_end is not None:
            self.last_speech_chunk.append(self._last_chunk)

    async def _on_text(self, raw: str, now: float) -> None:
        await super()._on_text(raw, now)
        record = self.received.pop()
        if record.event == "media" and record.message is not None:
            media = record.message.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            self.reply.add(now, len(self.turns), payload)

    def _on_mark(self, name: str, now: float) -> None:
        super()._on_mark(name, now)
        if len(self.marks) > 256:  # only the last one is looked at (`_marks_echoed`)
            del self.marks[:-1]

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float | None = 5.0,  # noqa: ASYNC109 - the base class's signature
    ) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - the playback clock fires no event
                await asyncio.sleep(self.POLL_S)

    def stop_frame_sent_at(self, turn_index: int) -> float | None:
        """When the frame that completes the VAD's silence window after this turn was sent."""
        if turn_index >= len(self.last_speech_chunk):
            return None
        return self.sent_at.get(self.last_speech_chunk[turn_index] + self.silence_frames)


@dataclass
class TurnResult:
    latency_ms: float
    share_ms: float | None
    naive_share_ms: float
    stop_at: float | None = None  # monotonic s: the VAD's stop frame sent
    reply_at: float | None = None  # monotonic s: the first reply frame received


@dataclass
class CallResult:
    index: int
    call_sid: str = ""
    error: str | None = None
    error_kind: str | None = None  # "phase: ExceptionType", for counting
    phase: str = "start"
    dial_ms: float | None = None
    greeting_ms: float | None = None
    dial_to_greeting_ms: float | None = None
    duration_s: float = 0.0  # stream start -> hang-up
    turns: list[TurnResult] = field(default_factory=list)
    reply_messages: int = 0
    reply_frames: int = 0
    violations: int = 0
    violation_reasons: list[str] = field(default_factory=list)
    odd_size_frames: int = 0
    reply_gaps: int = 0
    max_reply_gap_ms: float = 0.0
    underruns: int = 0
    frames_sent: int = 0
    lateness_ms: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CallResult:
        result = cls(**{k: v for k, v in data.items() if k not in ("turns", "lateness_ms")})
        result.turns = [TurnResult(**t) for t in data["turns"]]
        result.lateness_ms = {int(k): v for k, v in data["lateness_ms"].items()}
        return result


def turn_result(cfg: LoadConfig, caller: MeasuredCaller, turn: Turn) -> TurnResult:
    assert turn.first_reply_at is not None and turn.speech_end is not None
    latency_ms = (turn.first_reply_at - turn.speech_end) * 1000
    stop_at = caller.stop_frame_sent_at(turn.index)
    share = None
    if stop_at is not None:
        share = (turn.first_reply_at - stop_at) * 1000 - cfg.first_audio_ms
    naive = latency_ms - cfg.vad_silence_ms - cfg.first_audio_ms
    return TurnResult(latency_ms, share, naive, stop_at, turn.first_reply_at)


def collect_frames(caller: MeasuredCaller, result: CallResult) -> None:
    reply = caller.reply
    result.reply_messages, result.reply_frames = reply.messages, reply.frames
    result.odd_size_frames = reply.odd_size
    result.reply_gaps, result.max_reply_gap_ms = reply.gaps, reply.max_gap_ms
    result.underruns = reply.underruns
    result.violations = len(caller.violations)
    result.violation_reasons = sorted({v.reason for v in caller.violations})[:3]
    result.frames_sent = caller.media_frames_sent
    result.lateness_ms = dict(caller.lateness_ms)


# ---- one call --------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters for the progress bar; `listener` forwards events from a worker process."""

    calls: int = 0
    turns: int = 0
    live: int = 0
    peak_live: int = 0
    done: int = 0
    failed: int = 0
    turns_done: int = 0
    listener: Callable[[str], None] | None = None

    def apply(self, event: str) -> None:
        if event == "connected":
            self.live += 1
            self.peak_live = max(self.peak_live, self.live)
        elif event == "disconnected":
            self.live -= 1
        elif event == "turn":
            self.turns_done += 1
        elif event == "ok":
            self.done += 1
        elif event == "failed":
            self.done += 1
            self.failed += 1
        if self.listener is not None:
            self.listener(event)


def caller_number(index: int) -> str:
    return f"+55169{index % 10**8:08d}"  # a Brazilian mobile per call: one person each


def new_caller(cfg: LoadConfig, index: int) -> MeasuredCaller:
    return MeasuredCaller(
        cfg.gateway_url,
        cfg.public_base_url,
        cfg.auth_token,
        cfg.account_sid,
        from_number=caller_number(index),
        silence_frames=cfg.silence_frames,
    )


async def run_call(
    cfg: LoadConfig, index: int, start_at: float, deadline: float, progress: Progress
) -> CallResult:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    caller = new_caller(cfg, index)
    result = CallResult(index, caller.call_sid)
    try:
        async with caller, asyncio.timeout_at(deadline):
            await _converse(cfg, caller, result, progress)
    except Exception as err:  # a failed call is a figure in the report, not the end of the run
        result.error_kind = f"{result.phase}: {type(err).__name__}"
        result.error = f"{result.error_kind} {err}".strip()
    finally:
        if result.phase not in ("start", "dial", "connect"):  # it was counted live
            assert caller.started_at is not None
            result.duration_s = loop.time() - caller.started_at
            progress.apply("disconnected")
        progress.apply("failed" if result.error else "ok")
    collect_frames(caller, result)
    return result


async def _converse(
    cfg: LoadConfig, caller: MeasuredCaller, result: CallResult, progress: Progress
) -> None:
    loop = asyncio.get_running_loop()
    result.phase, dialed_at = "dial", loop.time()
    dialed = await caller.dial()
    result.dial_ms = dialed.elapsed_s * 1000
    if dialed.status != 200 or dialed.stream_url is None:
        raise RuntimeError(f"webhook answered HTTP {dialed.status}")
    result.phase = "connect"
    await caller.connect()
    progress.apply("connected")
    result.phase = "greeting"
    await caller.wait_until(lambda: caller.first_reply_at is not None, cfg.reply_timeout_s)
    assert caller.first_reply_at is not None and caller.started_at is not None
    result.greeting_ms = (caller.first_reply_at - caller.started_at) * 1000
    result.dial_to_greeting_ms = (caller.first_reply_at - dialed_at) * 1000
    await caller.wait_playback_idle(cfg.quiet_s, PLAYOUT_TIMEOUT_S)
    clips = turn_clips(cfg.speech_ms, cfg.vad_threshold)
    for i in range(cfg.turns):
        result.phase = f"turn {i + 1}"
        turn = await caller.speak_and_wait(clips[i % len(clips)], cfg.reply_timeout_s)
        result.turns.append(turn_result(cfg, caller, turn))
        progress.apply("turn")
        await caller.wait_playback_idle(cfg.quiet_s, PLAYOUT_TIMEOUT_S)
        if caller.closed.is_set():
            raise RuntimeError(f"the gateway closed the stream (code {caller.close_code})")
    result.phase = "hangup"
    # The gateway stores a reply when its last mark comes back; hanging up before that
    # (the playback buffer is empty at the same instant) would lose the turn's record.
    await caller.wait_until(lambda: _marks_echoed(caller), cfg.reply_timeout_s)
    await caller.hangup()


def _marks_echoed(caller: SimulatedCaller) -> bool:
    return not caller.marks or caller.marks[-1].echoed_at is not None  # echoed in order


# ---- the call load in one process ------------------------------------------------------


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
            SCRIPT,
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


# ---- statistics ------------------------------------------------------------------------


@dataclass
class Summary:
    n: int
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Summary:
        data = np.array([v for v in values if v is not None], dtype=float)
        if data.size == 0:
            return cls(0)
        p50, p95, p99 = (round(float(np.percentile(data, q)), 2) for q in (50, 95, 99))
        return cls(int(data.size), p50, p95, p99, round(float(data.max()), 2))

    @classmethod
    def of_counts(cls, counts: Mapping[int, int]) -> Summary:
        """From a histogram of whole milliseconds."""
        keys = sorted(counts)
        return cls.of(np.repeat(np.array(keys, dtype=float), [counts[k] for k in keys]))


# ---- the gateway process: CPU and RSS --------------------------------------------------


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


# ---- progress bar ----------------------------------------------------------------------


class ProgressBar:
    """Plain text on stderr: redrawn in place on a terminal, a line every 5 s otherwise."""

    WIDTH = 30

    def __init__(self, progress: Progress, label: str, enabled: bool = True) -> None:
        self.progress = progress
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def line(self) -> str:
        p = self.progress
        total = max(p.calls, 1)
        filled = round(self.WIDTH * p.done / total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.monotonic() - self.started
        return (
            f"{self.label} [{bar}] {p.done}/{p.calls} done, {p.live} live, "
            f"turns {p.turns_done}/{p.turns}, failed {p.failed}, {elapsed:.0f} s"
        )

    async def __aenter__(self) -> ProgressBar:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)

    async def _run(self) -> None:
        period = 0.5 if self.tty else 5.0
        while True:
            await asyncio.sleep(period)
            if self.tty:
                print("\r" + self.line(), end="", file=sys.stderr, flush=True)
            else:
                print(self.line(), file=sys.stderr, flush=True)


# ---- WhatsApp burst --------------------------------------------------------------------


@dataclass
class SentReply:
    to: str
    at: float  # time.monotonic() when the simulator accepted (or we first saw) it
    has_media: bool


class TwilioView(Protocol):
    """Where the Twilio simulator is: hosts inbound media, shows what the gateway sent."""

    resolution_ms: float

    async def host_media(self, data: bytes, content_type: str, message_sid: str) -> str: ...

    async def replies(self) -> list[SentReply]: ...


class LocalTwilio:
    """The simulator object in this process: exact acceptance times."""

    resolution_ms = 0.0

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    async def host_media(self, data: bytes, content_type: str, message_sid: str) -> str:
        return self.sim.add_media(data, content_type, message_sid)

    async def replies(self) -> list[SentReply]:
        return [SentReply(m.to, m.accepted_at, bool(m.media_urls)) for m in self.sim.messages]


class RemoteTwilio:
    """A simulator in another process, through its loopback-only /_sim routes (polled)."""

    resolution_ms = 100.0  # the poll period: /_sim/messages has only whole-second dates

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._seen: dict[str, SentReply] = {}

    async def host_media(self, data: bytes, content_type: str, message_sid: str) -> str:
        url = f"{self.base_url}/_sim/media?message_sid={message_sid}"
        headers = {"Content-Type": content_type}
        async with self.session.post(url, data=data, headers=headers) as response:
            response.raise_for_status()
            return (await response.json())["media_url"]

    async def replies(self) -> list[SentReply]:
        async with self.session.get(f"{self.base_url}/_sim/messages") as response:
            rows = await response.json()
        now = time.monotonic()
        for row in rows:
            if row["sid"] not in self._seen:
                has_media = row.get("num_media", "0") != "0"
                self._seen[row["sid"]] = SentReply(row["to"], now, has_media)
        return list(self._seen.values())


@dataclass
class WhatsAppReport:
    messages: int
    kind: str
    statuses: dict[str, int]
    webhook_ms: Summary
    channel: bool  # POST /webhook/whatsapp answered 2xx, not 404
    reply_ms: Summary | None = None  # webhook POST -> first reply message accepted
    voice_reply_ms: Summary | None = None  # webhook POST -> first reply with media
    replied: int = 0
    voice_replied: int = 0
    reply_resolution_ms: float | None = None
    errors: list[str] = field(default_factory=list)
    gateway_process: ProcessReport | None = None
    simulator_process: ProcessReport | None = None
    machine: MachineReport | None = None


def wa_number(index: int) -> str:
    return f"+55119{index % 10**8:08d}"


@cache
def voice_note() -> bytes:
    from gateway.transcode import encode_ogg_opus

    return encode_ogg_opus(speech_pcm24k(2000, seed=11))


async def run_whatsapp_burst(cfg: LoadConfig, twilio: TwilioView | None) -> WhatsAppReport:
    """`cfg.whatsapp` signed webhooks at once; then wait for each sender's replies."""
    kind = cfg.whatsapp_kind if twilio is not None else "text"
    senders = [
        WhatsAppSender(
            cfg.gateway_url,
            cfg.public_base_url,
            cfg.auth_token,
            cfg.account_sid,
            from_number=wa_number(i),
        )
        for i in range(cfg.whatsapp)
    ]
    try:
        posts = await _post_burst(senders, kind, twilio)
    finally:
        await asyncio.gather(*(s.close() for s in senders))
    report = _webhook_report(kind, posts)
    if report.channel and twilio is not None:
        await _wait_replies(cfg, twilio, senders, posts, report)
    return report


async def _post_burst(
    senders: list[WhatsAppSender], kind: str, twilio: TwilioView | None
) -> list[tuple[float, WebhookResult | BaseException]]:
    sids = [new_sid("MM") for _ in senders]  # fresh: the gateway's queue drops a seen MessageSid
    urls: list[str | None] = [None] * len(senders)
    if kind == "voice" and twilio is not None:
        data = voice_note()
        urls = [await twilio.host_media(data, "audio/ogg", sid) for sid in sids]

    async def post(sender: WhatsAppSender, url: str | None, sid: str) -> tuple[float, Any]:
        started = time.monotonic()
        if url is None:
            return started, await sender.send_text("Olá, tudo bem? Uma pergunta rápida.")
        return started, await sender.send_media(url, "audio/ogg", message_sid=sid)

    results = await asyncio.gather(
        *(post(*job) for job in zip(senders, urls, sids, strict=True)), return_exceptions=True
    )
    return [r if isinstance(r, tuple) else (0.0, r) for r in results]


def _webhook_report(kind: str, posts: list[tuple[float, Any]]) -> WhatsAppReport:
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    for _, result in posts:
        if isinstance(result, BaseException):
            statuses["error"] += 1
            errors.append(f"{type(result).__name__} {result}".strip())
        else:
            statuses[str(result.status)] += 1
    answered = [r for _, r in posts if isinstance(r, WebhookResult)]
    return WhatsAppReport(
        messages=len(posts),
        kind=kind,
        statuses=dict(statuses),
        webhook_ms=Summary.of(r.elapsed_s * 1000 for r in answered),
        channel=any(200 <= r.status < 300 for r in answered),
        errors=sorted(set(errors))[:5],
    )


async def _wait_replies(
    cfg: LoadConfig,
    twilio: TwilioView,
    senders: list[WhatsAppSender],
    posts: list[tuple[float, Any]],
    report: WhatsAppReport,
) -> None:
    sent_at = {f"whatsapp:{s.from_number}": at for s, (at, _) in zip(senders, posts, strict=True)}
    want_media = report.kind == "voice"
    deadline = time.monotonic() + cfg.whatsapp_timeout_s
    first: dict[str, float] = {}
    voice: dict[str, float] = {}
    while time.monotonic() < deadline:
        for reply in await twilio.replies():
            if reply.to in sent_at:
                first.setdefault(reply.to, reply.at - sent_at[reply.to])
                if reply.has_media:
                    voice.setdefault(reply.to, reply.at - sent_at[reply.to])
        if len(voice if want_media else first) >= len(sent_at):
            break
        await asyncio.sleep(0.1)
    report.replied, report.voice_replied = len(first), len(voice)
    report.reply_ms = Summary.of(v * 1000 for v in first.values())
    report.voice_reply_ms = Summary.of(v * 1000 for v in voice.values())
    report.reply_resolution_ms = twilio.resolution_ms


# ---- the report ------------------------------------------------------------------------


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
    machine: MachineReport | None = None


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


# The gateway's own histograms read from its /metrics, and the label that splits each.
SCRAPED = {
    "gateway_frame_forward_seconds": "direction",
    "gateway_gc_pause_seconds": "generation",
    "gateway_event_loop_lag_seconds": "",  # one series, no label
}

Buckets = dict[str, dict[float, float]]  # label value -> upper bound (s) -> cumulative count


async def scrape_histograms(gateway_url: str) -> dict[str, Buckets]:
    """The SCRAPED histograms from the gateway's GET /metrics ({} without /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gateway_url}/metrics") as response,
        ):
            if response.status != 200:
                return {}
            text = await response.text()
    except aiohttp.ClientError:
        return {}
    found: dict[str, Buckets] = {}
    for family in text_string_to_metric_families(text):
        label = SCRAPED.get(family.name)
        for sample in family.samples if label is not None else ():
            if sample.name == f"{family.name}_bucket":
                value = sample.labels.get(label, "")
                series = found.setdefault(family.name, {}).setdefault(value, {})
                series[float(sample.labels["le"])] = sample.value
    return found


@dataclass
class BucketSummary:
    """Quantiles as the histogram's bucket upper bounds (None: above the top bucket)."""

    n: int
    p50_le_ms: float | None
    p99_le_ms: float | None
    max_le_ms: float | None


def histogram_report(before: Buckets | None, after: Buckets | None) -> dict[str, BucketSummary]:
    """What one scraped histogram counted between two scrapes, per label value."""
    report = {}
    for value, counts in sorted((after or {}).items()):
        old = (before or {}).get(value, {})
        delta = {le: n - old.get(le, 0.0) for le, n in sorted(counts.items())}
        total = delta.get(math.inf, 0.0)
        report[value] = BucketSummary(
            int(total),
            _bucket_quantile(delta, total, 0.5),
            _bucket_quantile(delta, total, 0.99),
            _bucket_quantile(delta, total, 1.0),
        )
    return report


def _bucket_quantile(cumulative: dict[float, float], total: float, q: float) -> float | None:
    for le, count in cumulative.items():
        if total and count >= q * total:
            return None if math.isinf(le) else round(le * 1000, 3)
    return None


def last_turn_id(db_path: Path | None) -> int:
    if db_path is None or not db_path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT coalesce(max(id), 0) FROM turns").fetchone()[0]
    except sqlite3.Error:
        return 0


def evaluate(cfg: LoadConfig, report: Report) -> list[Target]:
    """Issue 6's targets; `met` is None when this run cannot tell."""
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
    return [
        Target("gateway share p99 (ms), at 100 calls", 5.0, share, share_met),
        Target("greeting p99 (ms): first audio + 20", limit, greeting, _le(greeting, limit)),
        Target("RSS per live call (KB)", 1024.0, rss, _le(rss, 1024.0)),
    ]


def _le(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


# ---- running it ------------------------------------------------------------------------


@dataclass
class Stack:
    """What the load runs against."""

    gateway_pid: int | None = None
    twilio: TwilioView | None = None
    db_path: Path | None = None
    simulator_pid: int | None = None  # the Realtime simulator, when spawned
    simulator_url: str | None = None  # its origin, for its own timings (GET /sim/timings)


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


async def _measure_calls(cfg: LoadConfig, stack: Stack, show_progress: bool) -> CallsReport:
    progress = Progress(calls=cfg.calls, turns=cfg.calls * cfg.turns)
    first_turn = last_turn_id(stack.db_path)
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
    report.machine, report.gateway_forwarding = seen.machine, seen.forwarding
    report.gateway_gc_pauses, report.gateway_loop_lag = seen.gc_pauses, seen.loop_lag
    if stack.db_path is not None:
        await asyncio.sleep(0.5)  # the last turns are written in the background
        with contextlib.suppress(sqlite3.Error):  # another schema: no view, not a failure
            report.gateway_view_ms = gateway_view(stack.db_path, first_turn, cfg.vad_silence_ms)
    if stack.simulator_url is not None:
        sessions = await fetch_sim_timings(stack.simulator_url)
        exact, overshoot = share_with_sim_measured(batch.results, sessions, cfg.first_audio_ms)
        report.gateway_share_sim_ms, report.simulator_overshoot_ms = exact, overshoot
    return report


async def fetch_sim_timings(simulator_url: str) -> list[dict[str, Any]]:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{simulator_url}/sim/timings") as response,
        ):
            return await response.json() if response.status == 200 else []
    except aiohttp.ClientError:
        return []


def share_with_sim_measured(
    results: list[CallResult], sessions: list[dict[str, Any]], first_audio_ms: float
) -> tuple[Summary, Summary]:
    """The share with the simulator's own latency subtracted instead of F, per turn.

    The simulator dates each response on the clock this process shares: created when its
    VAD took the stop frame, first audio when it handed the first delta to its socket.
    What that takes beyond F (timer slack, its queue) is its own, not the gateway's. The
    sessions are matched to calls by the call_sid the gateway puts in the greeting's
    metadata, and a turn to the first response created after its stop frame left.
    Turns without a match (no metadata, a session swapped mid-call) are left out.
    """
    by_call: dict[str, list[tuple[float, float]]] = {}
    for session in sessions:
        call_sid = session.get("metadata", {}).get("call_sid")
        timed = [(r["created_at"], r["first_audio_at"]) for r in session["responses"]
                 if r["first_audio_at"] is not None]  # fmt: skip
        if call_sid:
            by_call.setdefault(call_sid, []).extend(sorted(timed))
    shares, overshoots = [], []
    for result in results:
        for turn in result.turns:
            if turn.stop_at is None or turn.reply_at is None:
                continue
            created, first_audio = next(
                # The caller dates a frame once its send returned; the simulator may have
                # taken it a moment before that.
                (t for t in by_call.get(result.call_sid, []) if t[0] >= turn.stop_at - 0.005),
                (None, None),
            )
            if created is None or first_audio is None or first_audio > turn.reply_at:
                continue
            own_ms = (first_audio - created) * 1000
            shares.append((turn.reply_at - turn.stop_at) * 1000 - own_ms)
            overshoots.append(own_ms - first_audio_ms)
    return Summary.of(shares), Summary.of(overshoots)


@dataclass
class Watches:
    """What is observed around the call phase besides the callers: processes, box, /metrics."""

    gateway_url: str
    gateway: ProcWatch | None
    simulator: ProcWatch | None
    machine_before: tuple[float, float]
    histograms_before: dict[str, Buckets]

    @classmethod
    async def start(cls, stack: Stack, gateway_url: str) -> Watches:
        return cls(
            gateway_url,
            ProcWatch(stack.gateway_pid) if stack.gateway_pid else None,
            ProcWatch(stack.simulator_pid) if stack.simulator_pid else None,
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
        for watch in (self.gateway, self.simulator):
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
        return Observed(*processes, machine, forwarding, gc_pauses, loop_lag.get(""))


@dataclass
class Observed:
    gateway: ProcessReport | None
    simulator: ProcessReport | None
    machine: MachineReport
    forwarding: dict[str, BucketSummary]
    gc_pauses: dict[str, BucketSummary]
    loop_lag: BucketSummary | None


# ---- spawning the gateway and the simulators -------------------------------------------


@dataclass
class SpawnOptions:
    realtime_args: list[str]
    log_level: str = "INFO"
    keep: bool = False
    pin: bool = False  # the gateway alone on CPU 0; simulators and callers on CPU 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        sim_argv += ["WARNING", *options.realtime_args]
        sim_log = workdir / "realtime-sim.log"
        procs.append(await _start_process(sim_argv, sim_log))
        await _wait_ready(f"http://127.0.0.1:{sim_port}/", procs[-1], sim_log)
        db_path = workdir / "gateway.db"
        env = _gateway_env(cfg, options, gw_port, sim_port, twilio.base_url, db_path)
        gw_log = workdir / "gateway.log"
        procs.append(await _start_process([sys.executable, "-m", "gateway"], gw_log, env))
        if options.pin:
            os.sched_setaffinity(procs[-1].pid, {0})
        await _wait_ready(f"{cfg.gateway_url}/health", procs[-1], gw_log)
        print(f"spawned: gateway pid {procs[-1].pid}, logs in {workdir}", file=sys.stderr)
        sim_url = f"http://127.0.0.1:{sim_port}"
        yield Stack(procs[-1].pid, LocalTwilio(twilio), db_path, procs[0].pid, sim_url)
    finally:
        for proc in reversed(procs):
            await _stop_process(proc)
        await twilio.close()
        os.sched_setaffinity(0, affinity)
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _gateway_env(
    cfg: LoadConfig,
    options: SpawnOptions,
    port: int,
    sim_port: int,
    twilio_url: str,
    db_path: Path,
) -> dict[str, str]:
    return {
        **os.environ,
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


@contextlib.asynccontextmanager
async def profiled(pid: int | None, output: str | None, native: bool) -> AsyncIterator[None]:
    """py-spy on the gateway while the load runs (a dev tool: only if asked for).

    `native` adds C frames (uvloop, orjson, syscalls) but pauses the process per sample.
    """
    if not output or pid is None:
        yield
        return
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(output).suffix, "raw")
    # Next to this interpreter (a venv's bin) or on PATH.
    search = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    py_spy = shutil.which("py-spy", path=search)
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    argv = [py_spy, "record", "--pid", str(pid), "--output", output, "--format", fmt]
    argv += ["--rate", "200", "--native" if native else "--nonblocking"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        await proc.wait()


# ---- text output -----------------------------------------------------------------------


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


# ---- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gateway", default="http://127.0.0.1:8080", help="gateway base URL")
    p.add_argument("--public-base-url", default=env.get("PUBLIC_BASE_URL", ""))
    p.add_argument("--auth-token", default=env.get("TWILIO_AUTH_TOKEN", SANDBOX_AUTH_TOKEN))
    p.add_argument("--account-sid", default=env.get("TWILIO_ACCOUNT_SID", SANDBOX_ACCOUNT_SID))
    p.add_argument("--gateway-pid", type=int, help="for CPU and RSS of a running gateway")
    p.add_argument("--simulator-pid", type=int, help="a running Realtime simulator's pid")
    p.add_argument("--simulator-url", help="a running Realtime simulator's origin (its timings)")
    p.add_argument("--db", type=Path, help="the running gateway's SQLite file (its own view)")
    p.add_argument("--twilio-sim", help="a running Twilio simulator's URL (WhatsApp replies)")
    p.add_argument("--spawn", action="store_true", help="start gateway + simulators here")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--ramp-s", type=float, default=5.0)
    p.add_argument(
        "--phases",
        choices=("spread", "grid"),
        default="spread",
        help="callers' 20 ms frame phases: spread like real calls, or all on one grid (stress)",
    )
    p.add_argument("--speech-ms", type=int, default=1500)
    p.add_argument("--latency-ms", type=float, default=300.0, help="simulator first audio")
    p.add_argument("--vad-silence-ms", type=int, default=500)
    p.add_argument("--vad-threshold", type=float, default=0.5)
    p.add_argument("--reply-timeout-s", type=float, default=10.0)
    p.add_argument("--max-s", type=float, default=90.0, help="bound on the call phase")
    p.add_argument("--workers", type=int, default=1, help="load generator processes")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured calls first")
    p.add_argument("--whatsapp", type=int, default=0, help="WhatsApp burst size")
    p.add_argument("--whatsapp-kind", choices=("voice", "text"), default="voice")
    p.add_argument("--whatsapp-timeout-s", type=float, default=60.0)
    p.add_argument("--sim-arg", action="append", default=[], help="extra simulator flag")
    p.add_argument("--gateway-log-level", default="INFO")
    p.add_argument("--keep", action="store_true", help="keep the spawned processes' logs")
    p.add_argument("--pin", action="store_true", help="gateway on CPU 0, the rest on CPU 1")
    p.add_argument("--profile", help="py-spy output (.svg, .json or raw) for the call phase")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.ramp_s >= args.max_s:
        p.error("--ramp-s must be shorter than --max-s (which bounds the whole call phase)")
    if args.calls < 0 or args.whatsapp < 0 or args.turns < 0:
        p.error("--calls, --turns and --whatsapp cannot be negative")
    if args.spawn and args.gateway == "http://127.0.0.1:8080":
        args.gateway = f"http://127.0.0.1:{free_port()}"
    return args


def config_from(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        gateway_url=args.gateway,
        public_base_url=args.public_base_url,
        auth_token=args.auth_token,
        account_sid=args.account_sid,
        calls=args.calls,
        turns=args.turns,
        ramp_s=args.ramp_s,
        phases=args.phases,
        speech_ms=args.speech_ms,
        first_audio_ms=args.latency_ms,
        vad_silence_ms=args.vad_silence_ms,
        vad_threshold=args.vad_threshold,
        reply_timeout_s=args.reply_timeout_s,
        max_s=args.max_s,
        workers=max(1, args.workers),
        warmup=args.warmup,
        whatsapp=args.whatsapp,
        whatsapp_kind=args.whatsapp_kind,
        whatsapp_timeout_s=args.whatsapp_timeout_s,
    )


async def _main(args: argparse.Namespace) -> Report:
    cfg = config_from(args)
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
    report.setup = _setup_notes(args)
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


def _setup_notes(args: argparse.Namespace) -> list[str]:
    notes = [_code_version()]
    notes += [
        "spawned: gateway and Realtime simulator as subprocesses"
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
    report = asyncio.run(_main(args))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(format_text(report))
    calls = report.calls
    sys.exit(1 if calls is not None and calls.ok == 0 else 0)


if __name__ == "__main__":
    main()
