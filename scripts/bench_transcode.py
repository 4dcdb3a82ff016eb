"""Voice-note and mu-law throughput, for BENCHMARKS.md.

Run: .venv/bin/python scripts/bench_transcode.py
Times are medians of a few runs on whatever machine runs this; speeds are x real time.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np

from gateway.transcode import (
    FRAME_BYTES,
    OpusEncoder,
    decode_to_pcm24k,
    encode_ogg_opus,
    mulaw_to_pcm16,
    pcm16_to_mulaw,
    pcm24k_to_mulaw8k,
)
from simulators.speech import synth_speech

NOTE_S = 30
CALLS = 200
FRAMES_PER_S = 50  # 20 ms frames, per direction


def median_s(fn: Callable[[], object], runs: int = 5) -> float:
    fn()  # warm-up: codec and table initialisation
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def whatsapp_like_note(seconds: int) -> bytes:
    """48 kHz mono OGG/Opus at 24 kbps, the shape of a WhatsApp voice note."""
    samples = synth_speech(seconds * 1000, 48000, seed=1)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        stream.bit_rate = 24000
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.time_base, frame.pts = 48000, Fraction(1, 48000), 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


def incremental_encode(pcm: bytes, chunk: int) -> bytes:
    encoder = OpusEncoder()
    for i in range(0, len(pcm), chunk):
        encoder.push(pcm[i : i + chunk])
    return encoder.finish()


def bench_decode() -> None:
    note = whatsapp_like_note(NOTE_S)
    t = median_s(lambda: decode_to_pcm24k(note))
    out = decode_to_pcm24k(note)
    print(
        f"decode {NOTE_S} s OGG/Opus 48k ({len(note) / 1024:.1f} KB) -> PCM16 24k "
        f"({len(out.pcm) / 1024:.0f} KB): {t * 1000:.1f} ms, {NOTE_S / t:.0f}x real time"
    )


def bench_encode() -> None:
    pcm = synth_speech(NOTE_S * 1000, 24000, seed=2).astype("<i2").tobytes()
    for level in (5, 10):
        t = median_s(lambda level=level: encode_ogg_opus(pcm, compression_level=level))
        size = len(encode_ogg_opus(pcm, compression_level=level))
        print(
            f"encode {NOTE_S} s PCM16 24k -> OGG/Opus 24 kbps, compression_level={level}: "
            f"{t * 1000:.0f} ms, {NOTE_S / t:.0f}x real time, {size / 1024:.1f} KB"
        )
    delta = 4800  # 100 ms Realtime deltas
    t = median_s(lambda: incremental_encode(pcm, delta))
    same = incremental_encode(pcm, delta) == encode_ogg_opus(pcm)
    print(
        f"encode {NOTE_S} s incrementally in {delta // 48} ms pushes: {t * 1000:.0f} ms, "
        f"{NOTE_S / t:.0f}x real time, identical to one-shot: {same}"
    )
    note_120 = encode_ogg_opus(np.tile(np.frombuffer(pcm, "<i2"), 4).tobytes())
    print(f"encode 120 s -> {len(note_120) / 1024:.1f} KB (WhatsApp voice-note limit 512 KB)")


def bench_mulaw() -> None:
    frame = pcm16_to_mulaw(synth_speech(20, 8000, seed=3))
    assert len(frame) == FRAME_BYTES
    samples = mulaw_to_pcm16(frame)
    n = 20000
    dec = median_s(lambda: [mulaw_to_pcm16(frame) for _ in range(n)], runs=3) / n
    enc = median_s(lambda: [pcm16_to_mulaw(samples) for _ in range(n)], runs=3) / n
    # Full transcoding of a call: every inbound frame decoded, every outbound frame encoded.
    per_second = CALLS * FRAMES_PER_S * (dec + enc)
    print(f"mu-law tables per 160-byte frame: decode {dec * 1e6:.2f} us, encode {enc * 1e6:.2f} us")
    print(
        f"mu-law {CALLS} calls, {FRAMES_PER_S} frames/s decoded in + {FRAMES_PER_S} encoded out: "
        f"{per_second * 1000:.1f} ms CPU per second ({per_second * 100:.1f} % of a core)"
    )
    big = pcm16_to_mulaw(synth_speech(60_000, 8000, seed=4))
    t = median_s(lambda: pcm16_to_mulaw(mulaw_to_pcm16(big)))
    print(f"mu-law bulk round trip, 60 s buffer: {t * 1000:.2f} ms, {60 / t:.0f}x real time")
    pcm = synth_speech(NOTE_S * 1000, 24000, seed=5).astype("<i2").tobytes()
    t = median_s(lambda: pcm24k_to_mulaw8k(pcm))
    print(f"pcm24k_to_mulaw8k whole {NOTE_S} s buffer: {t * 1000:.1f} ms, {NOTE_S / t:.0f}x")


def main() -> None:
    print(
        f"python {platform.python_version()}, av {av.__version__}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    bench_decode()
    bench_encode()
    bench_mulaw()


if __name__ == "__main__":
    main()
