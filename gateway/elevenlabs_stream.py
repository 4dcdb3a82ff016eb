"""ElevenLabs' streaming text-to-speech for calls: the model's text deltas go in as they come,
mu-law 8 kHz comes out (`ulaw_8000`: Twilio's own format, no transcoding), with the
character alignment that maps what the phone played back to the words said.

`SpokenText` is the core without I/O: audio chunks with their alignment in, "which words
had been played after N ms" out. `ElevenLabsStream` is the websocket around it, speaking
`stream-input` as the SDK's `realtime_tts.py` does (its URL builder, its message types);
the SDK's own helper is synchronous, so the socket is the `websockets` library's asyncio one.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from elevenlabs.types import GenerationConfig, InitializeConnection, SendText
from elevenlabs.url_utils import build_ws_url
from websockets.asyncio.client import ClientConnection, connect

from gateway.elevenlabs import VoiceUnavailable

CALL_FORMAT = "ulaw_8000"
ULAW_BYTES_PER_MS = 8
# Generation starts once this many characters wait (ElevenLabs' default starts at 120): a
# call's first words must not wait for a long sentence to fill.
FIRST_CHUNK_CHARS = 50
# A phrase ends at a sentence's end, or at a clause's once it is this long: shorter clauses
# would each pay the model's first-audio latency and lose their prosody.
MIN_CLAUSE_CHARS = 24
_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:—]\s")
OPEN_TIMEOUT_S = 5.0


@dataclass
class Chunk:
    """One audio message: mu-law bytes and the characters they say."""

    audio: bytes
    chars: list[str] = field(default_factory=list)
    starts_ms: list[int] = field(default_factory=list)  # relative to this chunk
    durations_ms: list[int] = field(default_factory=list)


@dataclass
class SpokenText:
    """The reply's audio so far and, per character, when it ends in that audio."""

    audio_ms: float = 0.0
    _chars: list[str] = field(default_factory=list)
    _ends_ms: list[float] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        for char, start, duration in zip(
            chunk.chars, chunk.starts_ms, chunk.durations_ms, strict=False
        ):
            self._chars.append(char)
            self._ends_ms.append(self.audio_ms + start + duration)
        self.audio_ms += len(chunk.audio) / ULAW_BYTES_PER_MS

    @property
    def text(self) -> str:
        return "".join(self._chars)

    def heard(self, played_ms: float) -> str:
        """The characters whose sound had ended when `played_ms` of the audio had played."""
        count = sum(1 for end in self._ends_ms if end <= played_ms)
        return "".join(self._chars[:count])


@dataclass
class Phrases:
    """The model's text deltas cut into phrases: each is sent with `flush` the moment it is
    whole, so the first words are spoken without waiting for a chunk schedule to fill."""

    _pending: str = ""

    def add(self, delta: str) -> list[str]:
        self._pending += delta
        phrases = []
        while (end := self._boundary()) is not None:
            phrases.append(self._pending[:end])
            self._pending = self._pending[end:]
        return phrases

    def rest(self) -> str:
        rest, self._pending = self._pending, ""
        return rest

    def _boundary(self) -> int | None:
        if match := _SENTENCE_END.search(self._pending):
            return match.end()
        for match in _CLAUSE_END.finditer(self._pending):
            if match.end() >= MIN_CLAUSE_CHARS:
                return match.end()
        return None


def chunk_of(message: dict[str, Any]) -> Chunk | None:
    """An audio message of stream-input as a `Chunk`; None for any other message."""
    audio = message.get("audio")
    if not isinstance(audio, str) or not audio:
        return None
    alignment = message.get("alignment") or {}
    return Chunk(
        audio=base64.b64decode(audio, validate=True),
        chars=list(alignment.get("chars") or []),
        starts_ms=list(alignment.get("charStartTimesMs") or []),
        durations_ms=list(alignment.get("charDurationsMs") or []),
    )


class ElevenLabsStream:
    """One reply's stream-input websocket: `send_phrase` as phrases come, `finish`, then read
    `chunks()` until the end. Any failure is `VoiceUnavailable`."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self.characters = 0  # sent to be spoken: what ElevenLabs bills

    @classmethod
    async def open(
        cls, base_url: str, api_key: str, voice_id: str, model_id: str
    ) -> ElevenLabsStream:
        url = build_ws_url(
            base_url,
            ["v1", "text-to-speech", voice_id, "stream-input"],
            {"model_id": model_id, "output_format": CALL_FORMAT},
        )
        try:
            socket = await connect(
                url, additional_headers={"xi-api-key": api_key}, open_timeout=OPEN_TIMEOUT_S
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake) as err:
            raise VoiceUnavailable(f"ElevenLabs stream not opened: {err}") from err
        stream = cls(socket)
        first = InitializeConnection(
            generation_config=GenerationConfig(chunk_length_schedule=[FIRST_CHUNK_CHARS])
        )
        await stream._send(first.dict(by_alias=True, exclude_none=True))
        return stream

    async def send_phrase(self, text: str) -> None:
        """A whole phrase, spoken now (`flush`); ElevenLabs wants text to end in a space."""
        if text.strip():
            message = SendText(text=text.rstrip() + " ", flush=True)
            await self._send(message.dict(exclude_none=True))
            self.characters += len(message.text)

    async def finish(self) -> None:
        """No more text: the rest is spoken, then the server ends the stream."""
        await self._send({"text": ""})

    async def chunks(self) -> AsyncIterator[Chunk]:
        last: dict[str, Any] = {}
        try:
            async for raw in self._socket:
                last = orjson.loads(raw)
                if not isinstance(last, dict):
                    raise VoiceUnavailable("ElevenLabs sent a message that is not an object")
                chunk = chunk_of(last)
                if chunk is not None:
                    yield chunk
                if last.get("isFinal") is True:
                    return
        except (websockets.ConnectionClosed, orjson.JSONDecodeError, ValueError) as err:
            raise VoiceUnavailable(f"ElevenLabs stream broken: {err}") from err
        if "message" in last or self._socket.close_code not in (1000, None):
            raise VoiceUnavailable(
                f"ElevenLabs ended the stream: {last.get('message') or self._socket.close_code}"
            )

    async def close(self) -> None:
        await self._socket.close()

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self._socket.send(orjson.dumps(message).decode())
        except websockets.ConnectionClosed as err:
            raise VoiceUnavailable(f"ElevenLabs stream closed: {err}") from err
