"""Audio conversions: G.711 mu-law tables, 160-byte frame chunking, voice notes.

The live call path never transcodes (mu-law passes through to `audio/pcmu`); these
tables serve the simulators, metrics and voice notes. Tables are bit-identical to
the stdlib `audioop` (gone in Python 3.13), built once with numpy.

Voice notes (WhatsApp OGG/Opus in, OGG/Opus out) and whole-buffer rate conversion go
through PyAV, in process: no ffmpeg subprocess, no temp files.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import av
import numpy as np

FRAME_BYTES = 160  # 20 ms of mu-law at 8 kHz: what Twilio sends and expects
MULAW_BYTES_PER_MS = 8
PCM24K_BYTES_PER_MS = 48

_BIAS = 0x84


def _build_decode_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _build_encode_table() -> np.ndarray:
    # Same arithmetic as CPython's audioop (14-bit, floor shift) so results are bit-identical.
    samples = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 2
    mask = np.where(samples < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(samples), 8159) + 0x21
    seg_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    seg = np.searchsorted(seg_ends, magnitude, side="left")
    uval = np.where(seg >= 8, 0x7F, (seg << 4) | ((magnitude >> (seg + 1)) & 0x0F))
    return (uval ^ mask).astype(np.uint8)


MULAW_DECODE = _build_decode_table()
MULAW_ENCODE = _build_encode_table()


def mulaw_to_pcm16(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 samples (same rate)."""
    return MULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def pcm16_to_mulaw(samples: np.ndarray) -> bytes:
    """int16 samples -> mu-law bytes (same rate)."""
    return MULAW_ENCODE[np.asarray(samples, dtype=np.int16).view(np.uint16)].tobytes()


class FrameChunker:
    """Re-cuts arbitrary byte chunks into fixed frames, carrying the remainder."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        self.frame_bytes = frame_bytes
        self._pending = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self.frame_bytes
        if whole == 0:
            return []
        out = bytes(self._pending[:whole])
        del self._pending[:whole]
        return [out[i : i + self.frame_bytes] for i in range(0, whole, self.frame_bytes)]

    def take(self, data: bytes) -> bytes:
        """Like push, but the whole frames come back joined, ready to send as one payload."""
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self.frame_bytes
        if whole == 0:
            return b""
        out = bytes(self._pending[:whole])
        del self._pending[:whole]
        return out

    def flush(self, pad: int = 0xFF) -> bytes | None:
        """The last partial frame padded with mu-law silence, or None when empty."""
        if not self._pending:
            return None
        out = bytes(self._pending) + bytes([pad]) * (self.frame_bytes - len(self._pending))
        self._pending.clear()
        return out

    def reset(self) -> None:
        self._pending.clear()

    @property
    def pending(self) -> int:
        return len(self._pending)


# --- Voice notes: decode anything WhatsApp may send, encode OGG/Opus replies -----------------

PCM_RATE = 24000  # the Realtime API's pcm16 rate
_PCM_TIME_BASE = Fraction(1, PCM_RATE)

DecodeReason = Literal["empty", "undecodable", "no_audio", "too_long", "truncated"]


class AudioDecodeError(ValueError):
    """A voice note we cannot use; `reason` is stable (metrics, replies), the message is not."""

    def __init__(self, reason: DecodeReason, message: str) -> None:
        super().__init__(message)
        self.reason: DecodeReason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    pcm: bytes = field(repr=False)  # PCM16 little-endian, mono, 24 kHz; kept out of logs
    duration_ms: int
    source_codec: str  # canonical FFmpeg name: "opus", "mp3", "aac", "amr_nb", "pcm_s16le"...
    source_rate: int  # decoder output rate (Opus always reports 48000)


def duration_ms_pcm24k(pcm: bytes) -> int:
    return len(pcm) // PCM24K_BYTES_PER_MS


def decode_to_pcm24k(
    data: bytes, *, max_duration_s: float = 300.0, expected_length: int | None = None
) -> DecodedAudio:
    """Any audio file (OGG/Opus, MP3, AAC/M4A, AMR, WAV, 3GP) -> PCM16 mono 24 kHz.

    `expected_length` is the download's Content-Length: a truncated OGG decodes without
    any error to partial audio, so the length check is the only way to notice.
    """
    if not data:
        raise AudioDecodeError("empty", "the audio file is empty")
    if expected_length is not None and expected_length != len(data):
        raise AudioDecodeError(
            "truncated", f"got {len(data)} bytes of an audio file of {expected_length} bytes"
        )
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("no_audio", "the file has no audio track")
            stream = container.streams.audio[0]
            pcm = _decode_stream(container, stream, max_duration_s)
            codec = stream.codec_context.codec.canonical_name
            rate = stream.codec_context.sample_rate
    except av.FFmpegError as exc:
        # Two branches: InvalidDataError (a ValueError) and av.error.EOFError (a builtin
        # EOFError, e.g. header-only OGG); FFmpegError covers both.
        raise AudioDecodeError("undecodable", "the file is not audio we can decode") from exc
    if not pcm:
        raise AudioDecodeError("no_audio", "the audio track holds no sound")
    return DecodedAudio(pcm, duration_ms_pcm24k(pcm), codec, rate)


def _decode_stream(
    container: av.container.InputContainer, stream: av.AudioStream, max_duration_s: float
) -> bytes:
    resampler = _Resampler(PCM_RATE)
    chunks: list[bytes] = []
    decoded_s = 0.0
    for frame in container.decode(stream):
        # Counted on the source side, before resampling, so a 2 h file stops at the limit.
        # The microsecond of slack absorbs float sums: exactly max_duration_s is accepted.
        decoded_s += frame.samples / frame.sample_rate
        if decoded_s > max_duration_s + 1e-6:
            raise AudioDecodeError("too_long", f"the audio is longer than {max_duration_s:g} s")
        chunks += resampler.push(frame)
    chunks += resampler.flush()
    return b"".join(chunks)


class _Resampler:
    """PyAV AudioResampler to s16 mono that survives mid-stream format changes.

    PyAV's resampler raises ValueError when a frame's rate/layout/format differs from the
    first one (chained OGG, MP3 switching rate); we flush and start a new one instead.
    """

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._resampler: av.AudioResampler | None = None
        self._key: tuple[str, str, int] | None = None

    def push(self, frame: av.AudioFrame) -> list[bytes]:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        out: list[bytes] = []
        resampler = self._resampler
        if resampler is None or key != self._key:
            out = self.flush()
            resampler = av.AudioResampler(format="s16", layout="mono", rate=self._rate)
            self._resampler, self._key = resampler, key
        return out + _frames_to_bytes(resampler.resample(frame))

    def flush(self) -> list[bytes]:
        if self._resampler is None:
            return []
        out = _frames_to_bytes(self._resampler.resample(None))
        self._resampler, self._key = None, None
        return out


def _frames_to_bytes(frames: list[av.AudioFrame]) -> list[bytes]:
    # to_ndarray trims the plane's alignment padding; "<i2" pins little-endian.
    return [f.to_ndarray().astype("<i2", copy=False).tobytes() for f in frames]


class OpusEncoder:
    """Incremental PCM16 24 kHz mono -> OGG/Opus voice note, in memory.

    Push Realtime audio deltas as they arrive; PyAV re-frames them into 20 ms Opus frames
    itself, and the packets come out the same as a one-shot encode. `voip` tunes libopus
    for speech; compression level 5 spends 20-50 % less CPU than the default 10 at about
    the same size. At 24 kbps the 512 KB WhatsApp voice-note limit is reached after ~177 s.
    """

    def __init__(
        self, *, bit_rate: int = 24000, compression_level: int = 5, application: str = "voip"
    ) -> None:
        self._buffer = io.BytesIO()
        # bitexact: no random OGG serial or version string, so the same audio gives the same
        # file (cacheable, testable).
        self._container = av.open(
            self._buffer, mode="w", format="ogg", container_options={"fflags": "+bitexact"}
        )
        self._stream = self._container.add_stream("libopus", rate=PCM_RATE, layout="mono")
        self._stream.bit_rate = bit_rate
        self._stream.codec_context.options = {
            "application": application,
            "compression_level": str(compression_level),
        }
        self._pending = bytearray()  # an odd byte left over: half a sample
        self._samples = 0
        self._result: bytes | None = None

    @property
    def duration_ms(self) -> int:
        return self._samples * 1000 // PCM_RATE

    def push(self, pcm: bytes) -> None:
        if self._result is not None:
            raise RuntimeError("OpusEncoder.push after finish")
        self._pending += pcm
        usable = len(self._pending) & ~1
        if not usable:
            return
        samples = np.frombuffer(bytes(self._pending[:usable]), dtype="<i2")
        del self._pending[:usable]
        self._encode(samples)

    def finish(self) -> bytes:
        """Flush the encoder and close the OGG stream; returns the file (idempotent).

        Returns b"" when no audio was pushed: the OGG headers are written with the first packet.
        """
        if self._result is None:
            self._mux(self._stream.encode(None))
            self._container.close()
            self._result = self._buffer.getvalue()
        return self._result

    def _encode(self, samples: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(
            samples.astype(np.int16, copy=False).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = PCM_RATE
        frame.time_base = _PCM_TIME_BASE
        frame.pts = self._samples
        self._samples += len(samples)
        self._mux(self._stream.encode(frame))

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)


def encode_ogg_opus(
    pcm: bytes, *, bit_rate: int = 24000, compression_level: int = 5, application: str = "voip"
) -> bytes:
    """One-shot PCM16 24 kHz mono -> OGG/Opus; same options as OpusEncoder."""
    encoder = OpusEncoder(
        bit_rate=bit_rate, compression_level=compression_level, application=application
    )
    encoder.push(pcm)
    return encoder.finish()


# --- Whole-buffer 8 kHz mu-law <-> 24 kHz PCM16 (off the hot path) ---------------------------
# One resampler call over the whole buffer: no chunk edges to zero-pad, and no scipy import.


def pcm24k_to_mulaw8k(pcm: bytes) -> bytes:
    samples = np.frombuffer(pcm, dtype="<i2", count=len(pcm) // 2)
    return pcm16_to_mulaw(_resample_whole(samples, PCM_RATE, 8000))


def mulaw8k_to_pcm24k(mulaw: bytes) -> bytes:
    return _resample_whole(mulaw_to_pcm16(mulaw), 8000, PCM_RATE).astype("<i2").tobytes()


def _resample_whole(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample a complete int16 mono buffer, output length exactly round(n * dst / src).

    swr is aligned (no delay once flushed) but returns nothing for a few-sample input and
    may be off by one at the end, so the length is pinned here.
    """
    want = round(len(samples) * dst_rate / src_rate)
    out = np.zeros(want, dtype=np.int16)
    if len(samples) == 0:
        return out
    frame = av.AudioFrame.from_ndarray(
        samples.astype(np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = src_rate
    resampler = av.AudioResampler(format="s16", layout="mono", rate=dst_rate)
    frames = resampler.resample(frame) + resampler.resample(None)
    got = np.concatenate([f.to_ndarray().ravel() for f in frames]) if frames else out[:0]
    out[: min(want, len(got))] = got[:want]
    return out
