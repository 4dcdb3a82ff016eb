"""The measured callers: one simulated call each, timed frame by frame, and its result."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from simulators.caller import FRAME_BYTES, FRAME_S, SimulatedCaller, Turn
from simulators.realtime import RealtimeSimConfig, vad_params, window_power
from simulators.speech import speech_mulaw

from .config import LoadConfig
from .progress import Progress

BYTES_PER_S = 8000  # mu-law at 8 kHz
GAP_S = 0.040  # a reply frame later than this after the previous one is a gap
PLAYOUT_TIMEOUT_S = 60.0  # a reply of the longest simulated length plays in < 20 s


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
