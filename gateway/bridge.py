"""The Realtime side, shared by every channel: session configs, and one session's
websocket through the official SDK (GA protocol). Knows nothing of Twilio or WhatsApp.

JSON goes through orjson and the SDK's `send_raw`/`recv_bytes`: the SDK's typed
`send(dict)` runs a pydantic transform per event, too costly for 50 audio frames a second.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import orjson
from openai import AsyncOpenAI

from gateway.settings import CUSTOM_VOICE, Settings

log = logging.getLogger(__name__)

TRANSCRIPTION = {"model": "gpt-transcribe", "language": "pt"}


def call_session(settings: Settings, voice: str, instructions: str) -> dict[str, Any]:
    """Phone calls: mu-law both ways (no transcoding), server VAD, far-field noise reduction."""
    return _session(settings, voice, instructions, {"type": "audio/pcmu"}, "far_field",
                    turn_detection(settings))  # fmt: skip


def voice_note_session(settings: Settings, voice: str, instructions: str) -> dict[str, Any]:
    """WhatsApp: PCM16 24 kHz both ways, manual turns (each message is one whole turn)."""
    return _session(settings, voice, instructions, {"type": "audio/pcm", "rate": 24000},
                    "near_field", None)  # fmt: skip


def _session(settings: Settings, voice: str, instructions: str, audio_format: dict[str, Any],
             noise: str, turns: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "type": "realtime",
        "model": settings.realtime_model,
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": audio_format,
                "noise_reduction": {"type": noise},
                "transcription": TRANSCRIPTION,
                "turn_detection": turns,
            },
            "output": {"format": audio_format, "voice": voice_param(voice)},
        },
    }


def voice_param(voice: str) -> str | dict[str, str]:
    """A built-in voice goes by name; a custom one (voice_...) as {"id": ...}."""
    return {"id": voice} if CUSTOM_VOICE.fullmatch(voice) else voice


def turn_detection(settings: Settings) -> dict[str, Any]:
    if settings.vad_type == "semantic_vad":
        return {
            "type": "semantic_vad",
            "eagerness": "auto",
            "create_response": True,
            "interrupt_response": True,
        }
    return {
        "type": "server_vad",
        "threshold": settings.vad_threshold,
        "prefix_padding_ms": settings.vad_prefix_ms,
        "silence_duration_ms": settings.vad_silence_ms,
        "create_response": True,
        "interrupt_response": True,
    }


class UpstreamClosed(Exception):
    """The Realtime websocket ended (drop, 60-minute cap, or our own close)."""


class RealtimeSession:
    """One Realtime websocket session."""

    _ids = itertools.count(1)

    def __init__(self, manager: Any, connection: Any) -> None:
        self._manager = manager
        self._conn = connection
        ws = getattr(connection, "_connection", None)  # websockets' ClientConnection
        self._ws = ws if callable(getattr(ws, "send", None)) else None
        self.closed = False

    @classmethod
    async def open(
        cls, client: AsyncOpenAI, model: str, session: dict[str, Any]
    ) -> RealtimeSession:
        """Connect and send `session.update` at once (the server applies events in order)."""
        manager = client.realtime.connect(model=model)
        connection = await manager.enter()
        opened = cls(manager, connection)
        await opened.send({"type": "session.update", "session": session})
        return opened

    async def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        if event["type"] != "input_audio_buffer.append" and "event_id" not in event:
            # Errors echo the event_id, so every event but the per-frame ones carries one.
            event = {**event, "event_id": f"gw_{next(self._ids)}"}
        try:
            await self._conn.send_raw(orjson.dumps(event).decode())
        except Exception as err:
            raise UpstreamClosed(str(err)) from err

    async def send_bytes(self, data: bytes) -> None:
        """Hot path: a pre-serialized event straight onto the SDK's own websocket.

        The SDK's `send_raw` adds a send queue, receipts and a task lookup per event, about
        5 µs of the 12 µs an audio append costs; its connection is the same socket, so the
        frame is identical. Falls back to `send_raw` if the SDK ever renames it.
        """
        if self.closed:
            return
        try:
            if self._ws is not None:
                await self._ws.send(data, text=True)
            else:
                await self._conn.send_raw(data.decode())
        except Exception as err:
            raise UpstreamClosed(str(err)) from err

    async def recv(self) -> dict[str, Any]:
        try:
            return orjson.loads(await self._conn.recv_bytes())
        except orjson.JSONDecodeError:
            log.warning("upstream sent a frame that is not JSON; skipped")
            return {"type": "gateway.invalid_json"}
        except Exception as err:
            self.closed = True
            raise UpstreamClosed(str(err)) from err

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._conn.close()
        except Exception as err:  # already gone: nothing left to release
            log.debug("closing upstream: %s", err)
