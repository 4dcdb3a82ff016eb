"""Audio for the ElevenLabs simulator: its voice, output formats, timing, and a detector.

The voice is told apart from the Realtime simulator's by its pitch: the Realtime voice
(simulators/speech.py) draws each syllable's fundamental from 100-160 Hz with an 8 %
vibrato (at most ~173 Hz); this one holds `ELEVENLABS_PITCH_HZ` (240 Hz, +-2 % vibrato)
under the same kind of vowel formants and 4-5 syllables a second, so an energy VAD still
hears speech. `estimate_pitch_hz()` and `sounds_like_elevenlabs()` read that back from
PCM16 or mu-law bytes at any rate, so a test can say whose voice reached the phone.

Timing: every character of the text lasts the same whole number of milliseconds
(`ms_per_char`), so alignment times, audio length and billing agree exactly; a chunk of
audio covers whole characters, and its samples are cut on the request's sample clock
(`sample_at(ms)`), so chunks concatenate into exactly `chars x ms_per_char` of audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from gateway.transcode import MULAW_DECODE, MULAW_ENCODE
from simulators.realtime_audio import ALAW_DECODE, ALAW_ENCODE
from simulators.speech import VOWELS  # the same vowels, at another pitch

ELEVENLABS_PITCH_HZ = 240.0  # the simulated voice's fundamental; the Realtime voice's <= 173 Hz
PITCH_TOLERANCE = 0.06  # sounds_like_elevenlabs: median pitch within 6 % of the above

# Every output format the SDK names (TextToSpeechStreamRequestOutputFormat), and the ones
# the simulator can produce: PCM16 little-endian mono at the rate, or G.711 at 8 kHz.
KNOWN_OUTPUT_FORMATS = (
    "mp3_22050_32",
    "mp3_24000_48",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
    "pcm_8000",
    "pcm_16000",
    "pcm_22050",
    "pcm_24000",
    "pcm_32000",
    "pcm_44100",
    "pcm_48000",
    "ulaw_8000",
    "alaw_8000",
    "opus_48000_32",
    "opus_48000_64",
    "opus_48000_96",
    "opus_48000_128",
    "opus_48000_192",
)
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"  # the API's default when output_format is omitted

_MASTER_S = 12  # the voice is synthesised once per rate and read cyclically
_SYLLABLE_S = 0.22  # syllable period: ~4.5 syllables a second, with a dip between each


@dataclass(frozen=True)
class OutputFormat:
    """A simulated output format: its codec and sample rate."""

    name: str
    codec: str  # "pcm" (PCM16 LE) | "ulaw" | "alaw"
    rate: int

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.codec == "pcm" else 1

    @property
    def content_type(self) -> str:
        return {"pcm": "audio/pcm", "ulaw": "audio/basic", "alaw": "audio/x-alaw-basic"}[self.codec]

    def sample_at(self, ms: float) -> int:
        """The sample index at `ms` on this format's clock."""
        return round(ms * self.rate / 1000)

    def encode(self, samples: np.ndarray) -> bytes:
        if self.codec == "pcm":
            return samples.astype("<i2").tobytes()
        table = MULAW_ENCODE if self.codec == "ulaw" else ALAW_ENCODE
        return table[samples.astype(np.int16).view(np.uint16)].tobytes()


def simulated_format(name: str) -> OutputFormat | None:
    """The format for `name` if the simulator produces it (pcm_*, ulaw_8000, alaw_8000)."""
    codec, _, rate = name.partition("_")
    if name not in KNOWN_OUTPUT_FORMATS or codec not in ("pcm", "ulaw", "alaw"):
        return None
    return OutputFormat(name, codec, int(rate))


@cache
def _master_voice(rate: int) -> np.ndarray:
    """`_MASTER_S` seconds of the voice at `rate`, float32 in int16 units."""
    n = rate * _MASTER_S
    t = np.arange(n) / rate
    f0 = ELEVENLABS_PITCH_HZ * (1 + 0.02 * np.sin(2 * np.pi * 2.3 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    syllable = (t // _SYLLABLE_S).astype(np.int64)
    formants = np.array(VOWELS)[(syllable * 7 + syllable // 3) % len(VOWELS)]
    out = np.zeros(n)
    for k in range(1, 31):
        freq = k * ELEVENLABS_PITCH_HZ
        if freq >= rate * 0.45:
            break
        gain = sum(1.0 / (1.0 + ((freq - formants[:, i]) / 90.0) ** 2) for i in range(3))
        out += (gain / k**0.5) * np.sin(k * phase)
    within = (t % _SYLLABLE_S) / _SYLLABLE_S
    envelope = np.clip(np.sin(np.pi * within / 0.85), 0.0, None) ** 0.6  # 15 % dip
    out *= np.where(within < 0.85, envelope, 0.0)
    out += 0.01 * np.random.default_rng(11).standard_normal(n)  # breath noise, fixed seed
    return (out / np.max(np.abs(out)) * 0.35 * 32767).astype(np.float32)


def voice_samples(rate: int, start: int, count: int) -> np.ndarray:
    """int16 samples `start` to `start + count` of the voice at `rate` (read cyclically)."""
    master = _master_voice(rate)
    index = (np.arange(start, start + count) % len(master)).astype(np.int64)
    return master[index].astype(np.int16)


def voice_audio(fmt: OutputFormat, start_ms: float, end_ms: float) -> bytes:
    """The voice from `start_ms` to `end_ms` of a request's audio, encoded in `fmt`."""
    first, last = fmt.sample_at(start_ms), fmt.sample_at(end_ms)
    return fmt.encode(voice_samples(fmt.rate, first, last - first))


def warm_voice_cache(rates: tuple[int, ...] = (8000, 16000, 24000)) -> None:
    """Synthesise the common rates up front, so no request pays for it."""
    for rate in rates:
        _master_voice(rate)


# ---- reading a voice back ----------------------------------------------------------------


def decode(data: bytes, codec: str = "pcm") -> np.ndarray:
    """int16 samples from PCM16 LE, mu-law or A-law bytes."""
    if codec == "pcm":
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")
    table = MULAW_DECODE if codec == "ulaw" else ALAW_DECODE
    return table[np.frombuffer(data, dtype=np.uint8)]


def estimate_pitch_hz(samples: np.ndarray | bytes, rate: int, codec: str = "pcm") -> float | None:
    """The median fundamental of the voiced 40 ms frames (autocorrelation), None if none.

    Per frame: the shortest lag between 2.5 ms and 16 ms (400-60 Hz) whose normalised
    autocorrelation is a local peak within 10 % of the frame's best, so a voice is not
    read an octave low."""
    x = decode(samples, codec) if isinstance(samples, bytes) else np.asarray(samples)
    x = x.astype(np.float64)
    frame = rate * 40 // 1000
    if len(x) < frame:
        return None
    frames = x[: len(x) // frame * frame].reshape(-1, frame)
    energy = np.sqrt((frames**2).mean(axis=1))
    lo, hi = max(2, rate // 400), rate // 60
    voiced = frames[energy >= 0.3 * energy.max()]
    voiced = voiced - voiced.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(voiced, 2 * frame, axis=1)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, axis=1)
    lags = acf[:, lo - 1 : hi + 2] / np.maximum(acf[:, :1], 1e-9)  # one lag of margin each side
    pitches = []
    for r in lags:
        best = r[1:-1].max()
        if best < 0.3:
            continue  # not voiced
        inner = r[1:-1]
        peak = (inner >= 0.9 * best) & (inner >= r[:-2]) & (inner >= r[2:])
        if not peak.any():
            continue  # the best lag sits on the search's edge: no pitch in range
        i = int(np.argmax(peak)) + 1  # the shortest such lag, in r's indices
        a, b, c = r[i - 1], r[i], r[i + 1]  # parabolic interpolation: a sub-sample lag
        shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0
        pitches.append(rate / (lo - 1 + i + shift))
    return float(np.median(pitches)) if pitches else None


def sounds_like_elevenlabs(samples: np.ndarray | bytes, rate: int, codec: str = "pcm") -> bool:
    """Whether the audio is the ElevenLabs simulator's voice (its pitch, within 6 %)."""
    pitch = estimate_pitch_hz(samples, rate, codec)
    return pitch is not None and abs(pitch - ELEVENLABS_PITCH_HZ) <= PITCH_TOLERANCE * (
        ELEVENLABS_PITCH_HZ
    )
