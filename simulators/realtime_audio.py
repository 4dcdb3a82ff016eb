"""Audio for the Realtime simulator: formats, G.711 tables, reply audio, the energy VAD."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import NamedTuple

import numpy as np

from gateway.transcode import MULAW_DECODE, MULAW_ENCODE
from simulators.realtime_config import RealtimeSimConfig
from simulators.speech import synth_speech

# ---- audio formats and tables ----------------------------------------------------------


NOT_BASE64 = "Invalid 'audio'. Expected base64-encoded audio bytes."


def decoded_audio(value: object) -> bytes | None:
    """Base64 audio decoded as the server checks it (strictly); None if it is not base64."""
    try:
        return base64.b64decode(value or "", validate=True)  # type: ignore[arg-type]
    except (binascii.Error, ValueError, TypeError):
        return None


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
