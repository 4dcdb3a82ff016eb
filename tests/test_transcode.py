"""Transcoding on real audio bytes: fixtures are encoded in-test with PyAV, nothing is mocked."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from fractions import Fraction
from math import gcd

import av
import numpy as np
import pytest
from scipy.signal import correlate, resample_poly

from gateway.transcode import (
    FRAME_BYTES,
    AudioDecodeError,
    DecodedAudio,
    FrameChunker,
    OpusEncoder,
    decode_to_pcm24k,
    duration_ms_pcm24k,
    encode_ogg_opus,
    mulaw8k_to_pcm24k,
    mulaw_to_pcm16,
    pcm16_to_mulaw,
    pcm24k_to_mulaw8k,
)
from simulators.speech import synth_speech

SOURCE_MS = 3000
VOICE_NOTE_LIMIT = 512 * 1024


# --- fixture builders -------------------------------------------------------------------------


def encode_audio(
    samples: np.ndarray, rate: int, fmt: str, codec: str, *, bit_rate: int | None = None
) -> bytes:
    """Mono int16 samples -> an audio file, the way a phone app would produce it."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        if bit_rate:
            stream.bit_rate = bit_rate
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(
                samples[start : start + 1024].reshape(1, -1), format="s16", layout="mono"
            )
            # Timestamps let the MP4 muxer write the edit list that hides AAC priming.
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def video_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * i, np.uint8), "rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def tiny_png() -> bytes:
    """A valid 2x2 RGB PNG, written by hand."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xc0\x40\x20" * 2 for _ in range(2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def pcm_array(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def aligned_correlation(
    decoded: np.ndarray, reference: np.ndarray, max_lag: int = 240
) -> tuple[float, int]:
    """Best Pearson correlation over lags within ±max_lag samples (10 ms at 24 kHz)."""
    n = min(len(decoded), len(reference))
    a, b = decoded[:n], reference[:n]
    full = correlate(a, b, mode="full", method="fft")
    window = full[n - 1 - max_lag : n + max_lag]
    lag = int(np.argmax(window)) - max_lag
    a, b = (a[lag:], b[: n - lag]) if lag >= 0 else (a[: n + lag], b[-lag:])
    return float(np.corrcoef(a, b)[0, 1]), lag


def to_24k(samples: np.ndarray, rate: int) -> np.ndarray:
    g = gcd(rate, 24000)
    return resample_poly(samples.astype(np.float64), 24000 // g, rate // g)


@pytest.fixture(scope="module")
def ogg_3s() -> bytes:
    return encode_audio(synth_speech(SOURCE_MS, 48000, seed=7), 48000, "ogg", "libopus")


# --- decode: every format WhatsApp may send ---------------------------------------------------

FORMATS = {
    # name: (source rate, container, encoder, bit_rate, canonical codec, min correlation)
    "ogg_opus_48k": (48000, "ogg", "libopus", None, "opus", 0.98),
    "ogg_opus_16k": (16000, "ogg", "libopus", None, "opus", 0.98),
    "mp3_44k1": (44100, "mp3", "libmp3lame", None, "mp3", 0.98),
    "m4a_aac_48k": (48000, "ipod", "aac", None, "aac", 0.98),
    "mp4_aac_22k05": (22050, "mp4", "aac", None, "aac", 0.98),
    # AMR-NB is a speech codec at 8 kHz: it keeps the sound, not the exact waveform.
    "amr_nb": (8000, "amr", "libopencore_amrnb", 12200, "amr_nb", 0.75),
    "3gp_amr_nb": (8000, "3gp", "libopencore_amrnb", 12200, "amr_nb", 0.75),
    "wav_16k": (16000, "wav", "pcm_s16le", None, "pcm_s16le", 0.999),
}


@pytest.mark.parametrize("name", FORMATS)
def test_decode_formats_to_24k_mono(name: str) -> None:
    rate, fmt, codec, bit_rate, codec_name, min_corr = FORMATS[name]
    source = synth_speech(SOURCE_MS, rate, seed=3)
    data = encode_audio(source, rate, fmt, codec, bit_rate=bit_rate)

    decoded = decode_to_pcm24k(data, expected_length=len(data))

    assert isinstance(decoded, DecodedAudio)
    assert decoded.source_codec == codec_name
    # Opus always decodes at 48 kHz, whatever rate went into the encoder.
    assert decoded.source_rate == (48000 if codec == "libopus" else rate)
    assert len(decoded.pcm) % 2 == 0
    assert decoded.duration_ms == duration_ms_pcm24k(decoded.pcm)
    assert abs(decoded.duration_ms - SOURCE_MS) <= 30
    corr, lag = aligned_correlation(pcm_array(decoded.pcm), to_24k(source, rate))
    assert corr >= min_corr, f"{name}: correlation {corr:.3f} at lag {lag}"
    assert abs(lag) <= 240  # within 10 ms: priming and codec delay are compensated


def test_decode_24k_mono_wav_is_bit_exact() -> None:
    source = synth_speech(500, 24000, seed=5)
    decoded = decode_to_pcm24k(encode_audio(source, 24000, "wav", "pcm_s16le"))
    assert decoded.pcm == source.astype("<i2").tobytes()
    assert decoded.duration_ms == 500


def test_sample_rate_change_mid_stream() -> None:
    # Two MP3s glued together (44.1 then 22.05 kHz): PyAV's own resampler would raise
    # ValueError on the first 22.05 kHz frame.
    def bare_mp3(rate: int, seed: int) -> bytes:
        options = {"write_xing": "0", "id3v2_version": "0"}  # no headers between the halves
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp3", container_options=options) as container:
            stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
            frame = av.AudioFrame.from_ndarray(
                synth_speech(1000, rate, seed=seed).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), 0
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                container.mux(packet)
        return buf.getvalue()

    decoded = decode_to_pcm24k(bare_mp3(44100, 1) + bare_mp3(22050, 2))
    assert decoded.source_codec == "mp3"
    assert 1950 <= decoded.duration_ms <= 2200  # codec padding of both halves included


def test_decode_repr_leaves_out_pcm(ogg_3s: bytes) -> None:
    text = repr(decode_to_pcm24k(ogg_3s))
    assert "pcm=" not in text and "duration_ms=3000" in text


# --- decode errors ----------------------------------------------------------------------------


def decode_reason(data: bytes, **kw: object) -> AudioDecodeError:
    with pytest.raises(AudioDecodeError) as info:
        decode_to_pcm24k(data, **kw)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert info.value.message and str(info.value) == info.value.message
    return info.value


def test_empty_bytes() -> None:
    assert decode_reason(b"").reason == "empty"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).bytes(4000),
        b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>\n" * 4,
        b"hello",
    ],
    ids=["random", "html", "text"],
)
def test_garbage_is_undecodable(data: bytes) -> None:
    err = decode_reason(data)
    assert err.reason == "undecodable"
    assert isinstance(err.__cause__, av.error.InvalidDataError)


def test_header_only_ogg_is_undecodable(ogg_3s: bytes) -> None:
    # The other FFmpegError branch: av.error.EOFError is a builtin EOFError, not a ValueError.
    err = decode_reason(ogg_3s[:200])
    assert err.reason == "undecodable"
    assert isinstance(err.__cause__, EOFError)


def test_ogg_with_damaged_header_is_undecodable(ogg_3s: bytes) -> None:
    assert decode_reason(ogg_3s[:60] + bytes(len(ogg_3s) - 60)).reason == "undecodable"


def test_m4a_without_moov_is_undecodable() -> None:
    m4a = encode_audio(synth_speech(SOURCE_MS, 48000, seed=2), 48000, "ipod", "aac")
    assert decode_reason(m4a[: len(m4a) // 2]).reason == "undecodable"  # moov is at the end


def test_png_has_no_audio() -> None:
    png = tiny_png()
    with av.open(io.BytesIO(png)) as container:  # it is a real PNG
        assert next(container.decode(video=0)).width == 2
    assert decode_reason(png).reason == "no_audio"


def test_video_only_mp4_has_no_audio() -> None:
    assert decode_reason(video_only_mp4()).reason == "no_audio"


def test_too_long(ogg_3s: bytes) -> None:
    err = decode_reason(ogg_3s, max_duration_s=1)
    assert err.reason == "too_long"


def test_limit_is_inclusive() -> None:
    wav = encode_audio(synth_speech(SOURCE_MS, 8000, seed=1), 8000, "wav", "pcm_s16le")
    assert decode_to_pcm24k(wav, max_duration_s=3.0).duration_ms == SOURCE_MS


def test_too_long_by_default_on_a_long_file() -> None:
    # 6.4 MB of 8 kHz WAV lasting 400 s: above the 300 s default, refused mid-decode.
    clip = synth_speech(4000, 8000, seed=6)
    wav = encode_audio(np.tile(clip, 100), 8000, "wav", "pcm_s16le")
    assert decode_reason(wav).reason == "too_long"


def test_truncated_download(ogg_3s: bytes) -> None:
    half = ogg_3s[: len(ogg_3s) // 2]
    # Why expected_length exists: a truncated OGG decodes without any error...
    assert decode_to_pcm24k(half).duration_ms < SOURCE_MS - 1000
    # ...so only the Content-Length comparison catches it.
    assert decode_reason(half, expected_length=len(ogg_3s)).reason == "truncated"
    assert decode_to_pcm24k(ogg_3s, expected_length=len(ogg_3s)).duration_ms == SOURCE_MS


# --- OGG/Opus voice-note encoder --------------------------------------------------------------


def ragged_chunks(data: bytes, seed: int = 0) -> list[bytes]:
    """Odd and uneven sizes, like Realtime deltas cut anywhere (including mid-sample)."""
    rng = np.random.default_rng(seed)
    chunks, pos = [], 0
    while pos < len(data):
        size = int(rng.choice([1, 3, 7, 481, 960, 4801, 9999]))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def opus_head(ogg: bytes) -> tuple[int, int, int]:
    """(channels, pre_skip, input rate) from the OpusHead packet of the first page."""
    at = ogg.index(b"OpusHead")
    _, channels, pre_skip, rate = struct.unpack_from("<BBHI", ogg, at + 8)
    return channels, pre_skip, rate


def test_opus_encoder_incremental_matches_one_shot_and_decodes() -> None:
    source = synth_speech(5000, 24000, seed=11)
    pcm = source.astype("<i2").tobytes()

    encoder = OpusEncoder()
    for chunk in ragged_chunks(pcm):
        encoder.push(chunk)
    incremental = encoder.finish()

    assert incremental == encode_ogg_opus(pcm)  # same packets, same (bitexact) OGG pages
    assert encoder.duration_ms == 5000
    assert incremental[:4] == b"OggS"
    assert opus_head(incremental) == (1, 312, 24000)
    with av.open(io.BytesIO(incremental)) as container:
        assert container.format.name == "ogg"
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus"
        assert stream.codec_context.layout.nb_channels == 1
    decoded = decode_to_pcm24k(incremental)
    assert abs(decoded.duration_ms - 5000) <= 40
    corr, _ = aligned_correlation(pcm_array(decoded.pcm), source.astype(np.float64))
    assert corr > 0.9


def test_opus_encoder_finish_is_final() -> None:
    encoder = OpusEncoder()
    encoder.push(b"\x00\x00" * 2400)
    first = encoder.finish()
    assert encoder.finish() is first
    with pytest.raises(RuntimeError):
        encoder.push(b"\x00\x00")
    assert OpusEncoder().finish() == b""  # nothing pushed: no pages at all


def test_two_minute_voice_note_fits_whatsapp_limit() -> None:
    clip = synth_speech(10_000, 24000, seed=12)
    pcm = np.tile(clip, 12).astype("<i2").tobytes()
    ogg = encode_ogg_opus(pcm)
    assert len(ogg) <= VOICE_NOTE_LIMIT
    assert decode_to_pcm24k(ogg).duration_ms == pytest.approx(120_000, abs=40)


# --- whole-buffer 8 kHz mu-law <-> 24 kHz PCM -------------------------------------------------


def test_pcm24k_to_mulaw8k_matches_reference() -> None:
    source = synth_speech(2000, 24000, seed=21)
    mulaw = pcm24k_to_mulaw8k(source.astype("<i2").tobytes())
    assert len(mulaw) == len(source) // 3
    reference = resample_poly(source.astype(np.float64), 1, 3)
    decoded = mulaw_to_pcm16(mulaw).astype(np.float64)
    corr, lag = aligned_correlation(decoded, reference, max_lag=4)
    assert lag == 0 and corr > 0.99


def test_mulaw8k_to_pcm24k_matches_reference() -> None:
    mulaw = pcm16_to_mulaw(synth_speech(2000, 8000, seed=22))
    pcm = mulaw8k_to_pcm24k(mulaw)
    assert len(pcm) == 3 * 2 * len(mulaw)
    reference = resample_poly(mulaw_to_pcm16(mulaw).astype(np.float64), 3, 1)
    corr, lag = aligned_correlation(pcm_array(pcm), reference, max_lag=12)
    assert lag == 0 and corr > 0.999


def test_whole_buffer_edge_sizes() -> None:
    assert pcm24k_to_mulaw8k(b"") == b"" and mulaw8k_to_pcm24k(b"") == b""
    assert len(pcm24k_to_mulaw8k(b"\x10\x00" * 480 + b"\x01")) == 160  # odd byte ignored
    assert len(pcm24k_to_mulaw8k(b"\x10\x00" * 2)) == 1  # swr alone would return nothing
    assert len(mulaw8k_to_pcm24k(b"\xff")) == 6


def test_duration_ms_pcm24k() -> None:
    assert duration_ms_pcm24k(b"") == 0
    assert duration_ms_pcm24k(b"\x00" * 47) == 0
    assert duration_ms_pcm24k(b"\x00" * 48_000) == 1000


# --- mu-law tables and frame chunking (unchanged code, pinned) --------------------------------


def _audioop():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")  # gone in Python 3.13


def test_mulaw_decode_table_equals_audioop() -> None:
    audioop = _audioop()
    codes = bytes(range(256))
    ours = mulaw_to_pcm16(codes).astype("<i2").tobytes()
    assert ours == audioop.ulaw2lin(codes, 2)


def test_mulaw_encode_table_equals_audioop() -> None:
    audioop = _audioop()
    every_sample = np.arange(65536, dtype=np.uint16).view(np.int16)
    assert pcm16_to_mulaw(every_sample) == audioop.lin2ulaw(every_sample.tobytes(), 2)


def test_frame_chunker_carries_remainders() -> None:
    data = bytes(range(256)) * 3  # 768 bytes: 4 frames and 128 left over
    chunker = FrameChunker()
    frames = chunker.push(data[:100])
    assert frames == [] and chunker.pending == 100
    frames += chunker.push(data[100:250])
    assert len(frames) == 1 and chunker.pending == 90
    frames += chunker.push(data[250:])
    assert all(len(f) == FRAME_BYTES for f in frames) and len(frames) == 4
    assert b"".join(frames) == data[:640] and chunker.pending == 128
    tail = chunker.flush()
    assert tail == data[640:] + b"\xff" * 32
    assert chunker.flush() is None and chunker.pending == 0
