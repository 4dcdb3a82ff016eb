"""OpenAI Realtime API simulator (GA protocol) over a real WebSocket.

Faithful enough that passing against it means working against the real service:
every client event is validated strictly against the `openai` SDK's types (unknown
keys rejected, errors worded like the server's), the server emits only events that
validate against the SDK's server types, audio follows the session's formats, VAD runs
on the audio timeline, responses stream in the real order and faster than real time.

Layout: plain protocol classes without I/O (`EnergyVad`, `Conversation`, `SimSession`,
which emits through a sink) and a thin aiohttp layer (`RealtimeSimulator`).

Server VAD emulation (documented so benchmarks can subtract it):
- power is the mean square of the decoded samples over 20 ms windows of the audio
  timeline (ms since the session's first appended audio), via lookup tables for G.711;
- `threshold` t in 0..1 maps to a level of `vad_floor_dbfs + vad_span_db * t` dBFS
  (defaults -60 + 50 t: 0.5 -> -35 dBFS RMS). Speech-like audio at a normal level
  (-15..-30 dBFS) triggers; mu-law silence (0xFF) and line hiss below -35 dBFS do not;
- speech starts after `vad_start_ms` of consecutive voiced windows;
  `audio_start_ms` = start of that run - `prefix_padding_ms`;
- speech stops after `silence_duration_ms` of unvoiced windows;
  `audio_end_ms` = last voiced window end + `silence_duration_ms` (as the real server,
  whose end "includes the silence duration");
- `semantic_vad` uses the same detector, silence from `semantic_silence_ms[eagerness]`;
- `idle_timeout_ms` counts on the audio timeline from the end of the last response's
  audio playback (position of its first delta + its audio length), not wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import inspect
import logging
import math
import os
import string
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, NamedTuple, Protocol

import numpy as np
import orjson
from aiohttp import WSMsgType, web

from gateway.transcode import MULAW_DECODE, MULAW_ENCODE
from simulators.realtime_events import ClientEventError, check_client_event
from simulators.responses import ResponsesSimulator
from simulators.speech import synth_speech

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_APPEND_BYTES = 15 * MiB  # per input_audio_buffer.append, decoded
MIN_COMMIT_MS = 100
MAX_DURATION_MESSAGE = "Your session hit the maximum duration of 60 minutes."
BETA_DISABLED_MESSAGE = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. "
    "Act like a human, but remember that you aren't a human."
)
DEFAULT_REPLY = (
    "Olá! Daqui fala o Endrigo. Obrigado pela sua mensagem, estou a ouvir. "
    "Em que posso ajudar hoje?"
)

ReplyFn = Callable[["SimSession", "ConvItem | None"], "str | Awaitable[str]"]
TranscriptFn = Callable[["SimSession", "ConvItem"], str]
MangleFn = Callable[[dict], Any]


# ---- configuration ---------------------------------------------------------------------


@dataclass
class RealtimeSimConfig:
    """Timing and behaviour knobs; all explicit so benchmarks can subtract them."""

    first_audio_latency_ms: float = 300.0  # response.created -> first audio/text delta
    speed: float = 4.0  # audio streamed this many times faster than real time (inf: no pacing)
    delta_ms: float = 125.0  # audio per delta: 1000 B of pcmu, on purpose not a multiple of 160
    reply_text: str = DEFAULT_REPLY
    reply: ReplyFn | None = None  # (session, last user item) -> text; overrides reply_text
    ms_per_char: float = 60.0  # reply audio length per character of text
    min_reply_ms: int = 400
    max_reply_ms: int = 20_000
    max_session_s: float = 3600.0  # then close 1001 like the real 60-minute limit
    default_voice: str = "marin"
    instructions: str = DEFAULT_INSTRUCTIONS
    vad_floor_dbfs: float = -60.0  # level for threshold 0
    vad_span_db: float = 50.0  # threshold 1 = floor + span
    vad_start_ms: int = 60  # consecutive voiced audio before speech_started
    semantic_silence_ms: dict[str, int] = field(
        default_factory=lambda: {"low": 2000, "medium": 1000, "auto": 1000, "high": 500}
    )
    input_transcript: str | TranscriptFn = "(fala do cliente)"  # when transcription is on
    transcription_latency_ms: float = 150.0
    send_conversation_created: bool = False  # the real server may or may not; don't rely on it
    send_item_created: bool = False  # legacy conversation.item.created next to .added
    record_audio: bool = True  # False (load tests): no input_audio, appends/deltas not recorded
    # Fault knobs, for tests of what the gateway does when OpenAI misbehaves:
    open_delay_s: float = 0.0  # the websocket upgrade is answered this late
    refuse_sessions: int = 0  # this many upgrades are refused with HTTP 500 first
    mangle: MangleFn | None = None  # (event) -> what is sent instead: any JSON value or raw text
    drop_after_deltas: int | None = None  # each session's TCP dies after this many audio deltas


# ---- audio formats and tables ----------------------------------------------------------


def bytes_per_ms(fmt_type: str) -> int:
    """pcmu/pcma: 8 kHz x 1 byte; audio/pcm: 24 kHz x 2 bytes."""
    return 48 if fmt_type == "audio/pcm" else 8


def _build_alaw_decode() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    mantissa = (codes & 0x0F) << 4
    seg = (codes & 0x70) >> 4
    value = np.where(seg == 0, mantissa + 8, mantissa + 0x108)
    value = np.where(seg > 1, value << np.maximum(seg - 1, 0), value)
    return np.where(codes & 0x80, value, -value).astype(np.int16)


def _build_alaw_encode() -> np.ndarray:
    # CPython audioop's st_linear2alaw, vectorised over all 65536 int16 values.
    pcm = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 3
    mask = np.where(pcm >= 0, 0xD5, 0x55)
    pcm = np.where(pcm >= 0, pcm, -pcm - 1)
    seg_ends = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    seg = np.searchsorted(seg_ends, pcm, side="left")
    shift = np.where(seg < 2, 1, seg)
    aval = (seg << 4) | ((pcm >> shift) & 0x0F)
    return (np.where(seg >= 8, 0x7F, aval) ^ mask).astype(np.uint8)


ALAW_DECODE = _build_alaw_decode()
ALAW_ENCODE = _build_alaw_encode()
# Squared magnitude per code: the VAD's whole per-window cost is a lookup and a mean.
_POWER = {
    "audio/pcmu": MULAW_DECODE.astype(np.float64) ** 2,
    "audio/pcma": ALAW_DECODE.astype(np.float64) ** 2,
}
_NO_WINDOWS = np.zeros(0)
_MASTER_MS = 20_000


@cache
def _master_speech(rate: int) -> np.ndarray:
    return synth_speech(_MASTER_MS, rate, seed=7)


@lru_cache(maxsize=256)
def reply_audio(fmt_type: str, duration_ms: int) -> bytes:
    """Speech-like reply audio in `fmt_type`, synthesized once per process and sliced."""
    rate = 24000 if fmt_type == "audio/pcm" else 8000
    n = rate * duration_ms // 1000
    clip = np.resize(_master_speech(rate), n).astype(np.float32)
    fade = min(n, rate // 100)  # 10 ms fade-out: no click where the slice cuts a syllable
    if fade:
        clip[n - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    samples = clip.astype(np.int16)
    if fmt_type == "audio/pcm":
        return samples.astype("<i2").tobytes()
    table = ALAW_ENCODE if fmt_type == "audio/pcma" else MULAW_ENCODE
    return table[samples.view(np.uint16)].tobytes()


def warm_audio_cache() -> None:
    """Synthesize the master clips up front (slow once, ~0.3 s) so no response pays it."""
    _master_speech(8000)
    _master_speech(24000)


def window_power(data: bytes, fmt_type: str, window_bytes: int) -> np.ndarray:
    """Mean square (int16 units) of each whole window in `data`."""
    n = len(data) // window_bytes
    if n == 0:
        return _NO_WINDOWS
    if fmt_type == "audio/pcm":
        samples = np.frombuffer(data, dtype="<i2", count=n * window_bytes // 2)
        squares = samples.astype(np.float64) ** 2
    else:
        squares = _POWER[fmt_type][np.frombuffer(data, dtype=np.uint8, count=n * window_bytes)]
    per_window = squares.reshape(n, -1)
    return per_window.sum(axis=1) / per_window.shape[1]  # .mean() costs more in Python


# ---- server VAD (no I/O) ---------------------------------------------------------------


class VadEvent(NamedTuple):
    kind: str  # "start" (ms = start of the voiced run) | "stop" | "idle" (ms = window end)
    ms: float
    idle_from_ms: float = 0.0  # "idle": where the idle period began


@dataclass(frozen=True)
class VadParams:
    power_threshold: float  # mean square, int16 units
    prefix_padding_ms: int
    silence_duration_ms: int
    start_ms: int
    idle_timeout_ms: int | None


class EnergyVad:
    """Energy detector over 20 ms windows of the audio timeline."""

    WINDOW_MS = 20

    def __init__(self) -> None:
        self.reset(0.0)

    def reset(self, at_ms: float) -> None:
        self._carry = b""
        self._carry_start_ms = at_ms
        self._fmt = ""
        self.speaking = False
        self.run_start_ms: float | None = None
        self._run_ms = 0.0
        self._silence_ms = 0.0
        self.idle_from_ms: float | None = None

    def arm_idle(self, from_ms: float) -> None:
        self.idle_from_ms = from_ms

    def feed(self, data: bytes, start_ms: float, fmt_type: str, p: VadParams) -> list[VadEvent]:
        bpm = bytes_per_ms(fmt_type)
        expected = self._carry_start_ms + len(self._carry) / bpm
        if fmt_type != self._fmt or abs(expected - start_ms) > 0.01:
            self._carry, self._carry_start_ms, self._fmt = b"", start_ms, fmt_type
        buf = self._carry + data
        window = bpm * self.WINDOW_MS
        powers = window_power(buf, fmt_type, window)
        events: list[VadEvent] = []
        for i, power in enumerate(powers):
            begin = self._carry_start_ms + i * self.WINDOW_MS
            events.extend(self._step(begin, power >= p.power_threshold, p))
        used = len(powers) * window
        self._carry = buf[used:]
        self._carry_start_ms += len(powers) * self.WINDOW_MS
        return events

    def _step(self, begin: float, voiced: bool, p: VadParams) -> Iterator[VadEvent]:
        end = begin + self.WINDOW_MS
        if self.speaking:
            self._silence_ms = 0.0 if voiced else self._silence_ms + self.WINDOW_MS
            if self._silence_ms >= p.silence_duration_ms:
                self.speaking, self.run_start_ms, self._run_ms = False, None, 0.0
                yield VadEvent("stop", end)
            return
        if voiced:
            self.run_start_ms = begin if self.run_start_ms is None else self.run_start_ms
            self._run_ms += self.WINDOW_MS
            if self._run_ms >= p.start_ms:
                self.speaking, self._silence_ms, self.idle_from_ms = True, 0.0, None
                yield VadEvent("start", self.run_start_ms)
            return
        self.run_start_ms, self._run_ms = None, 0.0
        idle = p.idle_timeout_ms
        since = self.idle_from_ms
        if idle is not None and since is not None and end - since >= idle:
            self.idle_from_ms = None
            yield VadEvent("idle", end, since)


def vad_params(turn_detection: dict | None, cfg: RealtimeSimConfig) -> VadParams | None:
    """Detector settings for a session's `turn_detection` (None: manual commits)."""
    if not turn_detection:
        return None
    if turn_detection["type"] == "semantic_vad":
        eagerness = turn_detection.get("eagerness") or "auto"
        threshold, prefix, idle = 0.5, 300, None
        silence = cfg.semantic_silence_ms.get(eagerness, 1000)
    else:
        threshold = turn_detection.get("threshold", 0.5)
        prefix = turn_detection.get("prefix_padding_ms", 300)
        silence = turn_detection.get("silence_duration_ms", 500)
        idle = turn_detection.get("idle_timeout_ms")
    dbfs = cfg.vad_floor_dbfs + cfg.vad_span_db * threshold
    power = (32768.0 * 10 ** (dbfs / 20)) ** 2
    return VadParams(power, prefix, silence, cfg.vad_start_ms, idle)


# ---- session configuration (pure) ------------------------------------------------------

_MERGED_PATHS = frozenset({"audio", "audio.input", "audio.output"})
_CLEARABLE = frozenset(
    {
        "audio.input.turn_detection",
        "audio.input.noise_reduction",
        "audio.input.transcription",
        "tracing",
        "prompt",
    }
)


def server_vad_defaults() -> dict:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }


def semantic_vad_defaults() -> dict:
    return {
        "type": "semantic_vad",
        "eagerness": "auto",
        "create_response": True,
        "interrupt_response": True,
    }


def default_session(model: str, cfg: RealtimeSimConfig, session_id: str) -> dict:
    """The full GA session object the real server sends in `session.created`."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": cfg.instructions,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time() + cfg.max_session_s),
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": server_vad_defaults(),
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": cfg.default_voice,
                "speed": 1.0,
            },
        },
        "include": None,
    }


def merge_session(current: dict, patch: dict, path: str = "") -> dict:
    """Partial update: only sent fields change; `audio`, `audio.input/output` merge deeply.

    null clears only the clearable fields (turn_detection, noise_reduction, transcription,
    tracing, prompt); elsewhere it leaves the value alone.
    """
    out = dict(current)
    for key, value in patch.items():
        sub = f"{path}.{key}".lstrip(".")
        if value is None and sub not in _CLEARABLE:
            continue
        if sub in _MERGED_PATHS and isinstance(out.get(key), dict):
            out[key] = merge_session(out[key], value, sub)
        else:
            out[key] = _normalized(sub, value, out.get(key))
    return out


def _normalized(path: str, value: Any, old: Any) -> Any:
    if path in ("audio.input.format", "audio.output.format"):
        kind = value.get("type") or "audio/pcm"
        return {"type": kind, "rate": 24000} if kind == "audio/pcm" else {"type": kind}
    if path == "audio.input.turn_detection" and value is not None:
        same_type = isinstance(old, dict) and old.get("type") == value["type"]
        base = old if same_type else None
        if base is None:
            base = (
                server_vad_defaults() if value["type"] == "server_vad" else semantic_vad_defaults()
            )
        return {**base, **value}
    return value


def session_rule_violation(
    old: dict, new: dict, audio_out_started: bool
) -> ClientEventError | None:
    """Semantic checks the schema can't express (ranges, frozen fields)."""
    out_old, out_new = old["audio"]["output"], new["audio"]["output"]
    if audio_out_started and out_new.get("voice") != out_old.get("voice"):
        return ClientEventError(
            "Cannot update a conversation's voice if assistant audio is present.",
            code="cannot_update_voice",
            param="session.audio.output.voice",
        )
    if audio_out_started and new.get("model") != old.get("model"):
        return ClientEventError(  # wording modelled on the voice error (unverified)
            "Cannot update a conversation's model if assistant audio is present.",
            code="cannot_update_model",
            param="session.model",
        )
    if old.get("tracing") is not None and new.get("tracing") != old.get("tracing"):
        return ClientEventError(
            "Tracing configuration cannot be modified once enabled.",
            code="invalid_value",
            param="session.tracing",
        )
    modalities = new.get("output_modalities") or ["audio"]
    if sorted(set(modalities)) not in (["audio"], ["text"]):
        return ClientEventError(
            "Invalid 'session.output_modalities': it is not possible to request both "
            "'text' and 'audio' at the same time.",
            code="invalid_value",
            param="session.output_modalities",
        )
    return _range_violation(new)


def _range_violation(new: dict) -> ClientEventError | None:
    turn = new["audio"]["input"].get("turn_detection") or {}
    checks = [
        ("session.audio.output.speed", new["audio"]["output"].get("speed"), 0.25, 1.5),
        ("session.audio.input.turn_detection.threshold", turn.get("threshold"), 0.0, 1.0),
    ]
    tokens = new.get("max_output_tokens")
    if isinstance(tokens, int):
        checks.append(("session.max_output_tokens", tokens, 1, 4096))
    for param, value, low, high in checks:
        if value is None or low <= value <= high:
            continue
        kind = "integer" if isinstance(value, int) else "decimal"
        side, bound, sign = (
            ("above", "maximum", "<=") if value > high else ("below", "minimum", ">=")
        )
        limit = high if value > high else low
        return ClientEventError(
            f"Invalid '{param}': {kind} {side} {bound} value. "
            f"Expected a value {sign} {limit}, but got {value} instead.",
            code=f"{kind}_{side}_{'max' if value > high else 'min'}_value",
            param=param,
        )
    return None


# ---- conversation (no I/O) -------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """`event_XXXXXXXXXXXXXXXXXXXXX`-style ids: prefix + 21 base62 characters."""
    n = int.from_bytes(os.urandom(16), "big")
    chars = []
    for _ in range(21):
        n, r = divmod(n, 62)
        chars.append(_ID_ALPHABET[r])
    return f"{prefix}_{''.join(chars)}"


def _is_assistant_audio(item: dict) -> bool:
    parts = item.get("content") or [] if item.get("role") == "assistant" else []
    return any(part.get("type") == "output_audio" for part in parts)


def _copy(data: Any) -> Any:
    return orjson.loads(orjson.dumps(data))  # fast deep copy of JSON data


@dataclass
class ConvItem:
    """A conversation item: its public JSON (without audio) plus the audio bytes."""

    id: str
    data: dict
    audio: bytearray = field(default_factory=bytearray)
    audio_format: str | None = None
    full_transcript: str = ""  # assistant: the whole planned transcript (for truncation)
    full_audio_ms: float = 0.0  # assistant: the whole planned audio length
    response_id: str | None = None

    @property
    def role(self) -> str | None:
        return self.data.get("role")

    @property
    def audio_ms(self) -> float:
        return len(self.audio) / bytes_per_ms(self.audio_format) if self.audio_format else 0.0

    def public(self) -> dict:
        return _copy(self.data)

    def with_audio(self) -> dict:
        data = self.public()
        for part in data.get("content", []):
            if part.get("type") in ("input_audio", "output_audio"):
                part["audio"] = base64.b64encode(self.audio).decode()
        return data

    def text(self) -> str:
        """All text/transcripts of the item, for token estimates and reply functions."""
        parts = self.data.get("content") or []
        return " ".join(str(p.get("text") or p.get("transcript") or "") for p in parts)


class Conversation:
    """Ordered items with insertion after a given item (`previous_item_id`)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.items: dict[str, ConvItem] = {}

    def __iter__(self) -> Iterator[ConvItem]:
        return (self.items[i] for i in self.order)

    def __len__(self) -> int:
        return len(self.order)

    def get(self, item_id: str) -> ConvItem | None:
        return self.items.get(item_id)

    def last_id(self) -> str | None:
        return self.order[-1] if self.order else None

    def insert(self, item: ConvItem, previous_item_id: str | None = None) -> str | None:
        """Insert; returns the id of the item now before it. KeyError if unknown."""
        if previous_item_id is None:
            previous = self.last_id()
            self.order.append(item.id)
        elif previous_item_id == "root":
            previous = None
            self.order.insert(0, item.id)
        else:
            index = self.order.index(previous_item_id) if previous_item_id in self.items else -1
            if index < 0:
                raise KeyError(previous_item_id)
            previous = previous_item_id
            self.order.insert(index + 1, item.id)
        self.items[item.id] = item
        return previous

    def remove(self, item_id: str) -> None:
        self.order.remove(item_id)
        del self.items[item_id]

    def last_user_item(self) -> ConvItem | None:
        for item_id in reversed(self.order):
            if self.items[item_id].role == "user":
                return self.items[item_id]
        return None


# ---- responses -------------------------------------------------------------------------


@dataclass
class SimResponse:
    """One model response and what it actually streamed."""

    id: str
    in_conversation: bool  # False for out-of-band (`conversation: "none"`)
    modality: str  # "audio" | "text"
    format: dict
    voice: Any
    max_output_tokens: int | str
    metadata: dict | None
    instructions: str
    created_at: float
    status: str = "in_progress"
    status_details: dict | None = None
    item: ConvItem | None = None
    stage: str = "created"  # created -> item -> part -> finished
    text: str = ""  # planned text/transcript
    sent_text: str = ""  # transcript/text streamed so far
    audio_sent: int = 0  # bytes of audio streamed
    first_audio_at: float | None = None
    first_audio_timeline_ms: float | None = None
    done_at: float | None = None
    usage: dict | None = None
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def item_id(self) -> str | None:
        return self.item.id if self.item else None

    @property
    def audio(self) -> bytes:
        """Audio bytes generated for the response's item (in `format`)."""
        return bytes(self.item.audio) if self.item else b""

    @property
    def audio_ms(self) -> float:
        return self.audio_sent / bytes_per_ms(self.format["type"])

    @property
    def active(self) -> bool:
        return self.status == "in_progress"


@dataclass
class Timed:
    """An event with the monotonic time it was received or sent."""

    at: float
    event: dict


# ---- the session (protocol core; I/O through a sink and a link) ------------------------


class Link(Protocol):
    """What a session needs from its transport (the aiohttp one is `_WsLink`)."""

    def send(self, payload: str) -> None: ...

    def close_after_pending(self, code: int, message: str) -> None: ...

    async def close_now(self, code: int, message: str) -> None: ...

    def abort(self) -> None: ...

    def pause(self) -> None: ...


class SimSession:
    """One Realtime connection: state, protocol handling and test helpers."""

    def __init__(
        self,
        cfg: RealtimeSimConfig,
        link: Link,
        *,
        model: str,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> None:
        self.sim_config = cfg
        self.link = link
        self.id = new_id("sess")
        self.model = model
        self.headers = headers or {}
        self.query = query or {}
        self.conversation_id = new_id("conv")
        self.config = default_session(model, cfg, self.id)
        self.opened_at = time.monotonic()
        self.received: list[Timed] = []
        self.sent: list[Timed] = []
        self.errors: list[dict] = []
        self.input_audio = bytearray()  # every appended byte (input format) if record_audio
        self.audio_ms = 0.0  # the audio timeline: ms appended since the first append
        self.buffer = bytearray()  # uncommitted input audio
        self.buffer_start_ms = 0.0
        self.conversation = Conversation()
        self.committed: list[ConvItem] = []  # user items made from the input buffer
        self.responses: list[SimResponse] = []
        self.audio_output_started = False
        self.closed = False
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.appends_received = 0
        self.deltas_sent = 0
        self.frozen = False
        self._vad = EnergyVad()
        self._vad_params = vad_params(self.turn_detection, cfg)
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0.0
        self._last_input_tokens = 0
        self._tasks: set[asyncio.Task] = set()
        self._changed: asyncio.Event | None = None

    # -- convenience views --

    @property
    def turn_detection(self) -> dict | None:
        return self.config["audio"]["input"].get("turn_detection")

    @property
    def input_format(self) -> str:
        return self.config["audio"]["input"]["format"]["type"]

    @property
    def output_format(self) -> str:
        return self.config["audio"]["output"]["format"]["type"]

    @property
    def active_response(self) -> SimResponse | None:
        """The in-progress response writing to the default conversation, if any."""
        for resp in reversed(self.responses):
            if resp.active and resp.in_conversation:
                return resp
        return None

    def events(self, event_type: str | None = None) -> list[dict]:
        """Sent server events (optionally of one type), in order."""
        return [t.event for t in self.sent if event_type is None or t.event["type"] == event_type]

    def sent_types(self) -> list[str]:
        return [t.event["type"] for t in self.sent]

    # -- measurement --

    def timings(self) -> dict[str, Any]:
        """When each response was created (for VAD: the stop frame's arrival) and sent its
        first audio, and the first metadata a client gave a response (who the session is)."""
        tags = next((r.metadata for r in self.responses if r.metadata), None)
        responses = [{"created_at": r.created_at, "first_audio_at": r.first_audio_at}
                     for r in self.responses]  # fmt: skip
        return {"session_id": self.id, "metadata": tags or {}, "responses": responses}

    # -- waiting helpers for tests --

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:  # noqa: ASYNC109 (a test helper: the timeout is the point)
        """Wait until `predicate()` is truthy (re-checked on every session change)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    changed = self._changed
                    result = predicate()
                    if result:
                        return result
                    if self.closed:
                        raise ConnectionError(f"session closed (code {self.close_code})")
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {timeout}s; last events sent: {self.sent_types()[-12:]}"
            ) from None

    async def wait_event(
        self,
        event_type: str,
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        match: Callable[[dict], bool] | None = None,
        start: int = 0,
    ) -> dict:
        """The first sent event of `event_type` (at index >= start) matching `match`."""

        def find() -> dict | None:
            for timed in self.sent[start:]:
                ev = timed.event
                if ev["type"] == event_type and (match is None or match(ev)):
                    return ev
            return None

        return await self.wait_for(find, timeout)

    # -- control (tests and the simulator) --

    async def drop(self, code: int = 1011, message: str = "Internal server error") -> None:
        """Simulate an upstream failure: close now with `code`, pending events discarded."""
        await self.link.close_now(code, message)

    def abort(self) -> None:
        """Simulate a network drop: kill the TCP connection without a close frame (1006)."""
        self.link.abort()

    def close(self, code: int = 1000, message: str = "") -> None:
        """Close normally once already-emitted events are written."""
        self.link.close_after_pending(code, message)

    # -- emitting --

    def _wire(self, event: dict) -> str:
        mangle = self.sim_config.mangle
        if mangle is None:
            return orjson.dumps(event).decode()
        wire = mangle(_copy(event))
        return wire if isinstance(wire, str) else orjson.dumps(wire).decode()

    def inject(self, payload: Any) -> None:
        """Fault injection: send any JSON value (or raw text) as if the server had."""
        self.link.send(payload if isinstance(payload, str) else orjson.dumps(payload).decode())

    def freeze(self) -> None:
        """Fault injection: the server stops reading and writing, and never answers a close,
        while its TCP connection stays up (a hung process behind a live load balancer)."""
        self.frozen = True
        self.link.pause()
        for resp in self.responses:
            if resp.task:
                resp.task.cancel()
        self._notify()

    def emit(self, event_type: str, **fields: Any) -> dict:
        event = {"type": event_type, "event_id": new_id("event"), **fields}
        audio_event = event_type == "response.output_audio.delta"
        if self.frozen:
            return event  # a frozen server says nothing more
        self.link.send(self._wire(event))
        if audio_event:
            self.deltas_sent += 1
            limit = self.sim_config.drop_after_deltas
            if limit is not None and self.deltas_sent == limit:
                asyncio.get_running_loop().call_soon(self.abort)
        if self.sim_config.record_audio or not audio_event:
            self.sent.append(Timed(time.monotonic(), event))
        if event_type == "error":
            self.errors.append(event)
        self._notify()
        return event

    def emit_error(self, err: ClientEventError, event_id: str | None = None) -> None:
        error = err.as_error()
        error["event_id"] = event_id if event_id is not None else err.event_id
        self.emit("error", error=error)

    def _fail(self, message: str, code: str, param: str | None, raw: dict) -> None:
        self.emit_error(ClientEventError(message, code=code, param=param), raw.get("event_id"))

    # -- lifecycle --

    def start(self) -> None:
        self.emit("session.created", session=_copy(self.config))
        if self.sim_config.send_conversation_created:
            conv = {"id": self.conversation_id, "object": "realtime.conversation"}
            self.emit("conversation.created", conversation=conv)
        self._spawn(self._expire())

    def refuse_beta(self) -> None:
        err = ClientEventError(BETA_DISABLED_MESSAGE, code="beta_api_shape_disabled")
        self.emit_error(err)
        self.link.close_after_pending(4000, "beta_api_shape_disabled")

    async def _expire(self) -> None:
        await asyncio.sleep(self.sim_config.max_session_s)
        self.link.close_after_pending(1001, MAX_DURATION_MESSAGE)

    def on_closed(self, code: int | None) -> None:
        self.closed, self.closed_at, self.close_code = True, time.monotonic(), code
        for task in list(self._tasks):
            task.cancel()
        for resp in self.responses:
            if resp.task:
                resp.task.cancel()
        self._notify()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- receiving --

    def handle_text(self, text: str) -> None:
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.received.append(Timed(time.monotonic(), {"_unparsed": text[:2000]}))
            self._notify()
            message = f"We could not parse the JSON body of your request. ({exc})"
            self.emit_error(ClientEventError(message, code="invalid_json"))
            return
        self.handle_event(raw)

    def handle_binary(self, data: bytes) -> None:
        message = "Binary WebSocket frames are not supported; send JSON text frames."
        self.emit_error(ClientEventError(message, code="invalid_value"))

    def handle_event(self, raw: Any) -> None:
        is_append = isinstance(raw, dict) and raw.get("type") == "input_audio_buffer.append"
        if self.sim_config.record_audio or not is_append:
            self.received.append(Timed(time.monotonic(), raw))
        self._notify()
        try:
            check_client_event(raw)
        except ClientEventError as err:
            self.emit_error(err)
            return
        handler = getattr(self, "_on_" + raw["type"].replace(".", "_"))
        handler(raw)

    # -- session.update --

    def _on_session_update(self, raw: dict) -> None:
        patch = raw["session"]
        if patch["type"] != "realtime":
            message = f"Invalid value: '{patch['type']}'. A realtime session cannot change type."
            return self._fail(message, "invalid_value", "session.type", raw)
        new = merge_session(self.config, patch)
        problem = session_rule_violation(self.config, new, self.audio_output_started)
        if problem:
            return self.emit_error(problem, raw.get("event_id"))
        old_turn = self.turn_detection
        self.config = new
        self.model = new["model"]
        if self.turn_detection != old_turn:
            self._vad.reset(self.audio_ms)
            self._speech_item_id = None
        self._vad_params = vad_params(self.turn_detection, self.sim_config)
        self.emit("session.updated", session=_copy(self.config))

    # -- input audio buffer --

    def _on_input_audio_buffer_append(self, raw: dict) -> None:
        self.appends_received += 1
        try:
            data = base64.b64decode(raw["audio"], validate=True)
        except (binascii.Error, ValueError):
            message = "Invalid 'audio'. Expected base64-encoded audio bytes."
            return self._fail(message, "invalid_value", "audio", raw)
        if len(data) > MAX_APPEND_BYTES:
            message = (
                f"Invalid 'audio': the decoded audio is {len(data)} bytes, above the "
                f"maximum of {MAX_APPEND_BYTES} bytes (15 MiB) per event."
            )
            return self._fail(message, "invalid_value", "audio", raw)
        self.push_audio(data)

    def push_audio(self, data: bytes) -> None:
        """Append decoded input audio: buffer, timeline and (in VAD mode) turn detection."""
        start_ms = self.audio_ms
        fmt = self.input_format
        self.audio_ms += len(data) / bytes_per_ms(fmt)
        if self.sim_config.record_audio:
            self.input_audio += data
        self.buffer += data
        if self._vad_params is None:
            return
        for event in self._vad.feed(data, start_ms, fmt, self._vad_params):
            self._on_vad(event)
        if not self._vad.speaking:
            self._trim_idle_buffer()

    def _trim_idle_buffer(self) -> None:
        # While nobody speaks only the prefix padding (and the idle window) is needed.
        p = self._vad_params
        assert p is not None
        keep_from = self.audio_ms - (p.prefix_padding_ms + p.start_ms + 2 * EnergyVad.WINDOW_MS)
        if self._vad.run_start_ms is not None:
            keep_from = min(keep_from, self._vad.run_start_ms - p.prefix_padding_ms)
        if self._vad.idle_from_ms is not None:
            keep_from = min(keep_from, self._vad.idle_from_ms)
        cut = self._buffer_offset(keep_from)
        if cut > 0:
            del self.buffer[:cut]
            self.buffer_start_ms += cut / bytes_per_ms(self.input_format)

    def _buffer_offset(self, ms: float) -> int:
        bpm = bytes_per_ms(self.input_format)
        offset = round((ms - self.buffer_start_ms) * bpm)
        offset -= offset % (2 if self.input_format == "audio/pcm" else 1)
        return max(0, min(len(self.buffer), offset))

    def _take_buffer(self, start_ms: float, end_ms: float) -> bytes:
        """Audio [start_ms, end_ms) of the timeline; the buffer then starts at end_ms."""
        begin, end = self._buffer_offset(start_ms), self._buffer_offset(end_ms)
        audio = bytes(self.buffer[begin:end])
        del self.buffer[:end]
        self.buffer_start_ms = max(self.buffer_start_ms, end_ms)
        return audio

    def _on_input_audio_buffer_commit(self, raw: dict) -> None:
        buffered_ms = len(self.buffer) / bytes_per_ms(self.input_format)
        if buffered_ms < MIN_COMMIT_MS:
            message = (
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {buffered_ms:.2f}ms of audio."
            )
            return self._fail(message, "input_audio_buffer_commit_empty", None, raw)
        audio = bytes(self.buffer)
        self.buffer.clear()
        self.buffer_start_ms = self.audio_ms
        self._vad.reset(self.audio_ms)
        self._speech_item_id = None
        self._commit(audio, new_id("item"))

    def _on_input_audio_buffer_clear(self, raw: dict) -> None:
        self.buffer.clear()
        self.buffer_start_ms = self.audio_ms
        self._vad.reset(self.audio_ms)
        self._speech_item_id = None
        self.emit("input_audio_buffer.cleared")

    def _on_output_audio_buffer_clear(self, raw: dict) -> None:
        message = "output_audio_buffer.clear is only supported for WebRTC and SIP connections."
        self._fail(message, "invalid_value", "type", raw)

    def _commit(self, audio: bytes, item_id: str) -> ConvItem:
        content = {"type": "input_audio", "transcript": None}
        data = {"id": item_id, "type": "message", "object": "realtime.item"}
        data |= {"status": "completed", "role": "user", "content": [content]}
        item = ConvItem(item_id, data, bytearray(audio), self.input_format)
        previous = self.conversation.insert(item)
        self.committed.append(item)
        self.emit("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous)
        self._announce_item(item, previous)
        if self.config["audio"]["input"].get("transcription"):
            self._spawn(self._transcribe(item))
        return item

    def _announce_item(self, item: ConvItem, previous: str | None) -> None:
        self.emit("conversation.item.added", previous_item_id=previous, item=item.public())
        if self.sim_config.send_item_created:
            self.emit("conversation.item.created", previous_item_id=previous, item=item.public())
        self.emit("conversation.item.done", previous_item_id=previous, item=item.public())

    async def _transcribe(self, item: ConvItem) -> None:
        await asyncio.sleep(self.sim_config.transcription_latency_ms / 1000)
        source = self.sim_config.input_transcript
        text = source if isinstance(source, str) else source(self, item)
        item.data["content"][0]["transcript"] = text
        ids = {"item_id": item.id, "content_index": 0}
        self.emit("conversation.item.input_audio_transcription.delta", **ids, delta=text)
        usage = {"type": "duration", "seconds": round(item.audio_ms / 1000, 3)}
        self.emit(
            "conversation.item.input_audio_transcription.completed",
            **ids,
            transcript=text,
            usage=usage,
        )

    # -- VAD --

    def _on_vad(self, event: VadEvent) -> None:
        if event.kind == "start":
            self._speech_started(event.ms)
        elif event.kind == "stop":
            self._speech_stopped(event.ms)
        else:
            self._idle_timeout(event.idle_from_ms, event.ms)

    def _speech_started(self, run_start_ms: float) -> None:
        p = self._vad_params
        assert p is not None
        start = max(self.buffer_start_ms, run_start_ms - p.prefix_padding_ms, 0.0)
        self._speech_item_id, self._speech_start_ms = new_id("item"), start
        self.emit(
            "input_audio_buffer.speech_started",
            audio_start_ms=int(start),
            item_id=self._speech_item_id,
        )
        turn = self.turn_detection or {}
        active = self.active_response
        if active and turn.get("interrupt_response", True):
            self.finish_response(active, "cancelled", "turn_detected")

    def _speech_stopped(self, end_ms: float) -> None:
        item_id = self._speech_item_id or new_id("item")
        self._speech_item_id = None
        self.emit("input_audio_buffer.speech_stopped", audio_end_ms=int(end_ms), item_id=item_id)
        item = self._commit(self._take_buffer(self._speech_start_ms, end_ms), item_id)
        turn = self.turn_detection or {}
        if turn.get("create_response", True) and self.active_response is None:
            self.start_response(None, trigger=item)

    def _idle_timeout(self, start: float, end_ms: float) -> None:
        item_id = new_id("item")
        self.emit(
            "input_audio_buffer.timeout_triggered",
            audio_start_ms=int(start),
            audio_end_ms=int(end_ms),
            item_id=item_id,
        )
        item = self._commit(self._take_buffer(start, end_ms), item_id)
        if self.active_response is None:
            self.start_response(None, trigger=item)

    def _arm_idle(self, resp: SimResponse) -> None:
        p = self._vad_params
        if p is None or p.idle_timeout_ms is None or not resp.in_conversation:
            return
        played_from = resp.first_audio_timeline_ms
        at = self.audio_ms if played_from is None else played_from + resp.audio_ms
        self._vad.arm_idle(max(at, self.buffer_start_ms))

    # -- conversation items --

    def _on_conversation_item_create(self, raw: dict) -> None:
        data = _copy(raw["item"])
        if _is_assistant_audio(data):
            message = "Assistant messages with audio content cannot be created by the client."
            return self._fail(message, "invalid_value", "item.content", raw)
        item_id = data.get("id") or new_id("item")
        if item_id in self.conversation.items:
            message = f"Item with id '{item_id}' already exists."
            return self._fail(message, "invalid_value", "item.id", raw)
        item = self._item_from_client(item_id, data, raw)
        if item is None:
            return
        try:
            previous = self.conversation.insert(item, raw.get("previous_item_id"))
        except KeyError:
            message = f"Previous item with id '{raw['previous_item_id']}' not found."
            return self._fail(message, "invalid_value", "previous_item_id", raw)
        self._announce_item(item, previous)

    def _item_from_client(self, item_id: str, data: dict, raw: dict) -> ConvItem | None:
        data |= {"id": item_id, "object": "realtime.item", "status": "completed"}
        audio = bytearray()
        for index, part in enumerate(data.get("content") or []):
            if part.get("type") != "input_audio":
                continue
            try:
                audio += base64.b64decode(part.pop("audio", "") or "", validate=True)
            except (binascii.Error, ValueError):
                message = "Invalid 'audio'. Expected base64-encoded audio bytes."
                self._fail(message, "invalid_value", f"item.content[{index}].audio", raw)
                return None
            part.setdefault("transcript", None)
        fmt = self.input_format if audio else None
        return ConvItem(item_id, data, audio, fmt)

    def _on_conversation_item_delete(self, raw: dict) -> None:
        item_id = raw["item_id"]
        if self.conversation.get(item_id) is None:
            message = f"Error deleting item: the item with id '{item_id}' does not exist."
            return self._fail(message, "invalid_value", "item_id", raw)
        self.conversation.remove(item_id)
        self.emit("conversation.item.deleted", item_id=item_id)

    def _on_conversation_item_retrieve(self, raw: dict) -> None:
        item = self.conversation.get(raw["item_id"])
        if item is None:
            message = f"Error retrieving item: the item with id '{raw['item_id']}' does not exist."
            return self._fail(message, "invalid_value", "item_id", raw)
        self.emit("conversation.item.retrieved", item=item.with_audio())

    def _on_conversation_item_truncate(self, raw: dict) -> None:
        item = self.conversation.get(raw["item_id"])
        if item is None:
            message = f"Error truncating item: the item with id '{raw['item_id']}' does not exist."
            return self._fail(message, "invalid_value", "item_id", raw)
        content = item.data.get("content") or []
        index, end_ms = raw["content_index"], raw["audio_end_ms"]
        audio_part = 0 <= index < len(content) and content[index].get("type") == "output_audio"
        if item.role != "assistant" or not audio_part or not item.audio:
            message = "Only model output audio messages can be truncated"
            return self._fail(message, "invalid_value", "item_id", raw)
        if end_ms < 0:
            return self._fail(
                f"Invalid audio_end_ms: {end_ms}.", "invalid_value", "audio_end_ms", raw
            )
        if end_ms > item.audio_ms:
            message = f"Audio content of {int(item.audio_ms)}ms is already shorter than {end_ms}ms"
            return self._fail(message, "invalid_value", "audio_end_ms", raw)
        self._truncate(item, index, end_ms)
        self.emit(
            "conversation.item.truncated", item_id=item.id, content_index=index, audio_end_ms=end_ms
        )

    def _truncate(self, item: ConvItem, index: int, end_ms: int) -> None:
        # Transcript pieces were streamed in step with the audio: cut it at the same place.
        full_ms = max(item.full_audio_ms, item.audio_ms, 1.0)
        keep = int(len(item.full_transcript) * min(1.0, end_ms / full_ms))
        part = item.data["content"][index]
        part["transcript"] = (part.get("transcript") or "")[:keep]
        bpm = bytes_per_ms(item.audio_format or "audio/pcm")
        del item.audio[end_ms * bpm :]

    # -- responses --

    def _on_response_create(self, raw: dict) -> None:
        params = raw.get("response") or {}
        out_of_band = params.get("conversation") == "none"
        active = self.active_response
        if active and not out_of_band:
            message = (
                f"Conversation already has an active response in progress: {active.id}. "
                "Wait until the response is finished before creating a new one."
            )
            return self._fail(message, "conversation_already_has_active_response", None, raw)
        for index, ref in enumerate(params.get("input") or []):
            if ref.get("type") == "item_reference" and ref["id"] not in self.conversation.items:
                message = f"Item with id '{ref['id']}' not found in the conversation."
                return self._fail(message, "invalid_value", f"response.input[{index}].id", raw)
        self.start_response(params, trigger=self.conversation.last_user_item())

    def _on_response_cancel(self, raw: dict) -> None:
        wanted = raw.get("response_id")
        active = [r for r in self.responses if r.active]
        if wanted:
            active = [r for r in active if r.id == wanted]
        else:
            active.sort(key=lambda r: not r.in_conversation)  # default conversation first
        if not active:
            message = "Cancellation failed: no active response found"
            return self._fail(message, "response_cancel_not_active", None, raw)
        self.finish_response(active[0], "cancelled", "client_cancelled")

    def start_response(self, params: dict | None, trigger: ConvItem | None) -> SimResponse:
        """Create a response (from response.create or VAD) and start streaming it."""
        params = params or {}
        out = params.get("audio", {}).get("output") or {}
        session_out = self.config["audio"]["output"]
        fmt = out.get("format") or session_out["format"]
        fmt = _normalized("audio.output.format", fmt, None)
        modalities = params.get("output_modalities") or self.config.get("output_modalities")
        resp = SimResponse(
            id=new_id("resp"),
            in_conversation=params.get("conversation") != "none",
            modality="text" if modalities == ["text"] else "audio",
            format=fmt,
            voice=out.get("voice") or session_out.get("voice"),
            max_output_tokens=params.get("max_output_tokens") or self.config["max_output_tokens"],
            metadata=params.get("metadata"),
            instructions=params.get("instructions") or self.config.get("instructions") or "",
            created_at=time.monotonic(),
        )
        self.responses.append(resp)
        self.emit("response.created", response=self._response_json(resp))
        self.emit("rate_limits.updated", rate_limits=self._rate_limits())
        resp.task = asyncio.ensure_future(self._stream(resp, trigger))
        return resp

    def _response_json(self, resp: SimResponse) -> dict:
        output = [resp.item.public()] if resp.item and resp.stage != "created" else []
        voice = resp.voice.get("id") if isinstance(resp.voice, dict) else resp.voice
        return {
            "object": "realtime.response",
            "id": resp.id,
            "status": resp.status,
            "status_details": resp.status_details,
            "output": output,
            "conversation_id": self.conversation_id if resp.in_conversation else None,
            "output_modalities": [resp.modality],
            "max_output_tokens": resp.max_output_tokens,
            "audio": {"output": {"format": resp.format, "voice": voice}},
            "usage": resp.usage,
            "metadata": resp.metadata,
        }

    def _rate_limits(self) -> list[dict]:
        used = sum(1 for _ in self.responses)
        return [
            {
                "name": "requests",
                "limit": 10_000,
                "remaining": 10_000 - used,
                "reset_seconds": 0.006,
            },
            {"name": "tokens", "limit": 2_000_000, "remaining": 1_995_000, "reset_seconds": 0.15},
        ]

    async def _reply_text(self, trigger: ConvItem | None) -> str:
        fn = self.sim_config.reply
        if fn is None:
            return self.sim_config.reply_text
        text = fn(self, trigger)
        return await text if inspect.isawaitable(text) else text

    async def _stream(self, resp: SimResponse, trigger: ConvItem | None) -> None:
        try:
            await self._stream_planned(resp, trigger)
        except Exception as exc:  # a broken reply function: fail like the server would
            log.exception("response %s failed", resp.id)
            error = {"type": "server_error", "code": None, "message": str(exc)}
            self.finish_response(resp, "failed", None, error)

    async def _stream_planned(self, resp: SimResponse, trigger: ConvItem | None) -> None:
        cfg = self.sim_config
        text = await self._reply_text(trigger)
        plan = plan_reply(resp, text, cfg)
        resp.text = plan.text
        speed = cfg.speed if cfg.speed > 0 else math.inf
        loop = asyncio.get_running_loop()
        t0 = loop.time() + cfg.first_audio_latency_ms / 1000 - (time.monotonic() - resp.created_at)
        await asyncio.sleep(max(0.0, t0 - loop.time()))
        self._open_item(resp, plan)
        for chunk in plan.chunks:
            await asyncio.sleep(max(0.0, t0 + chunk.offset_ms / 1000 / speed - loop.time()))
            self._send_chunk(resp, chunk)
        self.finish_response(resp, plan.status, plan.reason)

    def _open_item(self, resp: SimResponse, plan: _Plan) -> None:
        audio = resp.modality == "audio"
        item_id = new_id("item")
        data = {"id": item_id, "type": "message", "object": "realtime.item"}
        data |= {"status": "in_progress", "role": "assistant", "content": []}
        resp.item = ConvItem(item_id, data, bytearray(), resp.format["type"] if audio else None)
        resp.item.full_transcript, resp.item.full_audio_ms = plan.full_text, plan.duration_ms
        resp.item.response_id = resp.id
        resp.stage = "item"
        ids = {"response_id": resp.id, "output_index": 0}
        self.emit("response.output_item.added", **ids, item=resp.item.public())
        if resp.in_conversation:
            previous = self.conversation.insert(resp.item)
            self.emit("conversation.item.added", previous_item_id=previous, item=resp.item.public())
        empty = (
            {"type": "output_audio", "transcript": ""}
            if audio
            else {"type": "output_text", "text": ""}
        )
        data["content"].append(empty)
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        resp.stage = "part"
        self.emit("response.content_part.added", **ids, item_id=item_id, content_index=0, part=part)

    def _send_chunk(self, resp: SimResponse, chunk: _Chunk) -> None:
        assert resp.item is not None
        ids = {"response_id": resp.id, "item_id": resp.item.id, "output_index": 0}
        ids["content_index"] = 0
        if chunk.audio:
            if resp.first_audio_at is None:
                resp.first_audio_at = time.monotonic()
                resp.first_audio_timeline_ms = self.audio_ms
                self.audio_output_started = True
            resp.item.audio += chunk.audio
            resp.audio_sent += len(chunk.audio)
            delta = base64.b64encode(chunk.audio).decode()
            self.emit("response.output_audio.delta", **ids, delta=delta)
        if chunk.text:
            resp.sent_text += chunk.text
            kind = "output_audio_transcript" if resp.modality == "audio" else "output_text"
            self.emit(f"response.{kind}.delta", **ids, delta=chunk.text)

    def finish_response(
        self, resp: SimResponse, status: str, reason: str | None = None, error: dict | None = None
    ) -> None:
        """End a response now: close its open parts, then `response.done`."""
        if not resp.active:
            return
        if resp.task is not None and asyncio.current_task() is not resp.task:
            resp.task.cancel()
        resp.status = status
        if error is not None:
            resp.status_details = {"type": status, "error": error}
        elif status != "completed":
            resp.status_details = {"type": status, "reason": reason}
        if resp.stage == "part":
            self._close_part(resp, "completed" if status == "completed" else "incomplete")
        resp.stage = "finished"
        resp.usage = self._usage(resp)
        resp.done_at = time.monotonic()
        self.emit("response.done", response=self._response_json(resp))
        self._arm_idle(resp)

    def _close_part(self, resp: SimResponse, item_status: str) -> None:
        item = resp.item
        assert item is not None
        ids = {"response_id": resp.id, "item_id": item.id, "output_index": 0, "content_index": 0}
        if resp.modality == "audio":
            transcript = resp.sent_text
            item.data["content"][0]["transcript"] = transcript
            self.emit("response.output_audio.done", **ids)
            self.emit("response.output_audio_transcript.done", **ids, transcript=transcript)
            part = {"type": "audio", "transcript": transcript}
        else:
            item.data["content"][0]["text"] = resp.sent_text
            self.emit("response.output_text.done", **ids, text=resp.sent_text)
            part = {"type": "text", "text": resp.sent_text}
        self.emit("response.content_part.done", **ids, part=part)
        item.data["status"] = item_status
        del ids["item_id"], ids["content_index"]
        self.emit("response.output_item.done", **ids, item=item.public())
        if resp.in_conversation and self.conversation.get(item.id) is item:
            self.emit(
                "conversation.item.done",
                previous_item_id=self._previous_of(item),
                item=item.public(),
            )

    def _previous_of(self, item: ConvItem) -> str | None:
        index = self.conversation.order.index(item.id)
        return self.conversation.order[index - 1] if index > 0 else None

    def _usage(self, resp: SimResponse) -> dict:
        instructions = math.ceil(len(resp.instructions) / 4)
        text_in = audio_in = 0
        for item in self.conversation if resp.in_conversation else []:
            if item is resp.item:
                continue
            text_in += math.ceil(len(item.text()) / 4)
            audio_in += math.ceil(item.audio_ms / (50 if item.role == "assistant" else 100))
        text_out = math.ceil(len(resp.sent_text) / 4)
        audio_out = math.ceil(resp.audio_ms / 50)  # ~20 output audio tokens per second
        input_tokens = instructions + text_in + audio_in
        cached = min(self._last_input_tokens, input_tokens) // 64 * 64
        self._last_input_tokens = input_tokens
        return {
            "total_tokens": input_tokens + text_out + audio_out,
            "input_tokens": input_tokens,
            "output_tokens": text_out + audio_out,
            "input_token_details": {
                "text_tokens": instructions + text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": cached,
                    "audio_tokens": 0,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }


# ---- response planning (pure) ----------------------------------------------------------


class _Chunk(NamedTuple):
    offset_ms: float  # position in the reply's own timeline (paced by `speed`)
    audio: bytes
    text: str


class _Plan(NamedTuple):
    text: str  # what will be streamed (cut when max_output_tokens is small)
    full_text: str  # what the model "meant to say"
    duration_ms: int
    chunks: list[_Chunk]
    status: str
    reason: str | None


def reply_duration_ms(text: str, cfg: RealtimeSimConfig) -> int:
    ms = int(len(text) * cfg.ms_per_char)
    return max(cfg.min_reply_ms, min(cfg.max_reply_ms, ms))


def _split(text: str, count: int) -> list[str]:
    return [text[len(text) * i // count : len(text) * (i + 1) // count] for i in range(count)]


def plan_reply(resp: SimResponse, text: str, cfg: RealtimeSimConfig) -> _Plan:
    """The deltas of a response: audio slices (+ transcript pieces) or text pieces."""
    full, duration = text, reply_duration_ms(text, cfg)
    status, reason = "completed", None
    audio_mode = resp.modality == "audio"
    tokens = math.ceil(len(text) / 4) + (math.ceil(duration / 50) if audio_mode else 0)
    if isinstance(resp.max_output_tokens, int) and tokens > resp.max_output_tokens:
        share = resp.max_output_tokens / tokens  # cut audio and text to the token budget
        duration, text = max(1, int(duration * share)), text[: int(len(text) * share)]
        status, reason = "incomplete", "max_output_tokens"
    step = max(1.0, cfg.delta_ms)
    if not audio_mode:
        pieces = _split(text, max(1, math.ceil(duration / step)))
        chunks = [_Chunk(i * step, b"", piece) for i, piece in enumerate(pieces)]
        return _Plan(text, full, duration, chunks, status, reason)
    fmt = resp.format["type"]
    audio = reply_audio(fmt, duration)
    size = max(2, int(step * bytes_per_ms(fmt)))
    size -= size % 2 if fmt == "audio/pcm" else 0  # whole 16-bit samples
    count = math.ceil(len(audio) / size)
    pieces = _split(text, count)
    chunks = [
        _Chunk(i * size / bytes_per_ms(fmt), audio[i * size : (i + 1) * size], pieces[i])
        for i in range(count)
    ]
    return _Plan(text, full, duration, chunks, status, reason)


# ---- aiohttp transport -----------------------------------------------------------------


class _WsLink:
    """Ordered writes through one writer task; closes queue behind pending events."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self._queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()
        self.closing = False  # the writer is running the close handshake
        self.close_code: int | None = None  # set when the server closed first
        self.writer = asyncio.ensure_future(self._write())

    def send(self, payload: str) -> None:
        self._queue.put_nowait(payload)

    def close_after_pending(self, code: int, message: str) -> None:
        self._queue.put_nowait((code, message))

    async def close_now(self, code: int, message: str) -> None:
        self.writer.cancel()
        self.close_code = code
        await self.ws.close(code=code, message=message.encode())

    def pause(self) -> None:
        """Stop reading the socket: the peer's frames (a close, a ping) are never seen."""
        transport = self.request.transport
        if transport is not None:
            transport.pause_reading()

    def abort(self) -> None:
        self.writer.cancel()
        self.close_code = 1006
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                item = await self._queue.get()
                if isinstance(item, tuple):
                    self.closing, self.close_code = True, item[0]
                    await self.ws.close(code=item[0], message=item[1].encode())
                    return
                if self.ws.closed:
                    return
                await self.ws.send_str(item)


def _openai_error(message: str, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


class RealtimeSimulator:
    """The aiohttp server: `GET /v1/realtime?model=...` upgraded to a Realtime session."""

    def __init__(self, config: RealtimeSimConfig | None = None) -> None:
        self.config = config or RealtimeSimConfig()
        self.sessions: list[SimSession] = []
        self.app = web.Application()
        self.attach(self.app)
        # The sibling text API the summarizer uses, on the same base URL as the real one.
        self.responses = ResponsesSimulator()
        self.responses.attach(self.app)
        self.app.router.add_get("/sim/timings", self._timings)  # ours, not an OpenAI route
        self.port: int | None = None
        self.host = "127.0.0.1"
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()
        self._refused = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    def attach(self, app: web.Application, prefix: str = "/v1") -> None:
        """Mount the Realtime route on `app` (other simulators may add their own routes)."""
        app.router.add_get(f"{prefix}/realtime", self.handle)
        app.on_shutdown.append(self._on_shutdown)

    async def _timings(self, request: web.Request) -> web.Response:
        """Each session's responses on the simulator's own clock (time.monotonic, which the
        processes of one machine share), so a load test can subtract the simulator's real
        latency from what it measured. A session is named by a response's metadata."""
        return web.json_response([session.timings() for session in self.sessions])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> RealtimeSimulator:
        await asyncio.to_thread(warm_audio_cache)
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        await self._on_shutdown(self.app)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RealtimeSimulator:
        return await self.start() if self.port is None else self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_shutdown(self, app: web.Application) -> None:
        for session in self.sessions:
            if session.frozen and not session.closed:
                session.abort()
        live = [s for s in self.sessions if not s.closed and not s.frozen]
        with contextlib.suppress(Exception):
            await asyncio.gather(*(s.drop(1001, "Server shutting down") for s in live))

    async def wait_for_session(self, timeout: float = 5.0, count: int = 1) -> SimSession:  # noqa: ASYNC109
        """The `count`-th session (1-based) once it exists."""
        async with asyncio.timeout(timeout):
            while len(self.sessions) < count:
                changed = self._changed
                await changed.wait()
        return self.sessions[count - 1]

    def _session_added(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            body = _openai_error("Missing bearer or basic authentication in header")
            return web.json_response(body, status=401)
        model = request.query.get("model")
        if not model:
            return web.json_response(
                _openai_error("Missing required parameter: 'model'.", "missing_required_parameter"),
                status=400,
            )
        if self._refused < self.config.refuse_sessions:
            self._refused += 1
            return web.json_response(_openai_error("The server had an error."), status=500)
        if self.config.open_delay_s > 0:
            await asyncio.sleep(self.config.open_delay_s)
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client gave up waiting
        ws = web.WebSocketResponse(compress=False, max_msg_size=40 * MiB, timeout=2.0)
        if not ws.can_prepare(request).ok:
            return web.json_response(_openai_error("Expected a WebSocket upgrade."), status=400)
        await ws.prepare(request)
        link = _WsLink(ws, request)
        session = SimSession(
            self.config, link, model=model, headers=dict(request.headers), query=dict(request.query)
        )
        self.sessions.append(session)
        self._session_added()
        try:
            await self._serve(session, ws, request)
        finally:
            if link.closing:  # our close frame is out; let the handshake finish
                await asyncio.wait([link.writer], timeout=2.0)
            link.writer.cancel()
            # aiohttp reports 1000 for a close we started; keep the code we sent.
            session.on_closed(link.close_code or ws.close_code)
        return ws

    async def _serve(
        self, session: SimSession, ws: web.WebSocketResponse, request: web.Request
    ) -> None:
        if "realtime=v1" in request.headers.get("OpenAI-Beta", ""):
            session.refuse_beta()
        else:
            session.start()
        async for msg in ws:
            if session.frozen:
                continue  # read before the freeze: a hung server never handles it
            if msg.type == WSMsgType.TEXT:
                session.handle_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                session.handle_binary(msg.data)
            else:
                break


# ---- command line ----------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI Realtime API (GA) simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=300.0, help="first-audio latency")
    parser.add_argument("--speed", type=float, default=4.0, help="x real time (inf: no pacing)")
    parser.add_argument("--delta-ms", type=float, default=125.0, help="audio per delta")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="reply text")
    parser.add_argument("--max-session-s", type=float, default=3600.0)
    parser.add_argument("--no-record", action="store_true", help="don't keep audio (load tests)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    cfg = RealtimeSimConfig(
        first_audio_latency_ms=args.latency_ms,
        speed=args.speed,
        delta_ms=args.delta_ms,
        reply_text=args.reply,
        max_session_s=args.max_session_s,
        record_audio=not args.no_record,
    )
    sim = RealtimeSimulator(cfg)
    await sim.start(args.host, args.port)
    print(f"Realtime simulator listening on {sim.ws_url}?model=...", flush=True)
    print(f"  AsyncOpenAI(api_key='sk-sim', base_url='{sim.base_url}')", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.close()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args))


if __name__ == "__main__":
    main()
