"""Audio conversions: G.711 mu-law tables and 160-byte frame chunking.

The live call path never transcodes (mu-law passes through to `audio/pcmu`); these
tables serve the simulators, metrics and voice notes. Tables are bit-identical to
the stdlib `audioop` (gone in Python 3.13), built once with numpy.
"""

from __future__ import annotations

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
