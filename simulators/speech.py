"""Speech-like test audio: voiced syllables with a moving pitch and vowel formants.

Not a tone and not silence: energy comes in 120-260 ms syllables separated by short
dips, so an energy VAD sees one utterance, and spectra vary like real speech.
"""

from __future__ import annotations

import numpy as np

from gateway.transcode import pcm16_to_mulaw

# (F1, F2, F3) in Hz for a few Portuguese-ish vowels: a, e, i, o, u
VOWELS = (
    (730, 1090, 2440),
    (530, 1840, 2480),
    (270, 2290, 3010),
    (570, 840, 2410),
    (300, 870, 2240),
)


def _syllable(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / rate
    f0 = rng.uniform(100, 160) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = VOWELS[rng.integers(len(VOWELS))]
    nyquist = rate / 2
    out = np.zeros(n)
    for k in range(1, 40):
        freq = k * f0.mean()
        if freq >= nyquist * 0.95:
            break
        gain = sum(1.0 / (1.0 + ((freq - f) / 90.0) ** 2) for f in formants) / k**0.5
        out += gain * np.sin(k * phase)
    out += 0.02 * rng.standard_normal(n)  # breath noise
    envelope = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.6
    return out * envelope


def synth_speech(
    duration_ms: int, rate: int = 8000, seed: int = 0, level: float = 0.35
) -> np.ndarray:
    """int16 samples of speech-like audio lasting exactly `duration_ms`."""
    rng = np.random.default_rng(seed)
    total = rate * duration_ms // 1000
    out = np.zeros(total)
    pos = 0
    while pos < total:
        length = int(rate * rng.uniform(0.12, 0.26))
        chunk = _syllable(min(length, total - pos), rate, rng)
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk) + int(rate * rng.uniform(0.02, 0.06))  # short inter-syllable dip
    peak = np.max(np.abs(out)) or 1.0
    return (out / peak * level * 32767).astype(np.int16)


def speech_mulaw(duration_ms: int, seed: int = 0) -> bytes:
    """Speech-like mu-law 8 kHz bytes (8 bytes per ms)."""
    return pcm16_to_mulaw(synth_speech(duration_ms, 8000, seed))


def speech_pcm24k(duration_ms: int, seed: int = 0) -> bytes:
    """Speech-like PCM16 little-endian 24 kHz bytes (48 bytes per ms)."""
    return synth_speech(duration_ms, 24000, seed).astype("<i2").tobytes()


def silence_mulaw(duration_ms: int) -> bytes:
    return b"\xff" * (8 * duration_ms)
