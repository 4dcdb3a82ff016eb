"""The one Realtime link, shared by every channel: session configs, the policy every session
lives by (open and close timeouts, age, reconnect backoff), one session's websocket through the
official SDK (GA protocol), and the supervised receive loop. Knows nothing of Twilio or WhatsApp.

JSON goes through orjson and the SDK's `send_raw`/`recv_bytes`: the SDK's typed
`send(dict)` runs a pydantic transform per event, too costly for 50 audio frames a second.

Every wait on the network is bounded: an upstream that stops answering costs at most
`open_timeout_s` to open and `close_timeout_s` to close, never the websockets defaults (10 s
each), so a call or a shutdown is never held hostage by a frozen peer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from openai import AsyncOpenAI

from gateway.settings import CUSTOM_VOICE, Settings

log = logging.getLogger(__name__)

TRANSCRIPTION = {"model": "gpt-transcribe", "language": "pt"}


def call_session(
    settings: Settings, voice: str, instructions: str, tools: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Phone calls: mu-law both ways (no transcoding), server VAD, far-field noise reduction."""
    return _session(settings, voice, instructions, {"type": "audio/pcmu"}, "far_field",
                    turn_detection(settings), tools)  # fmt: skip


def voice_note_session(
    settings: Settings, voice: str, instructions: str, tools: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """WhatsApp: PCM16 24 kHz both ways, manual turns (each message is one whole turn)."""
    return _session(settings, voice, instructions, {"type": "audio/pcm", "rate": 24000},
                    "near_field", None, tools)  # fmt: skip


def _session(settings: Settings, voice: str, instructions: str, audio_format: dict[str, Any],
             noise: str, turns: dict[str, Any] | None,
             tools: list[dict[str, Any]] | None) -> dict[str, Any]:  # fmt: skip
    session: dict[str, Any] = {
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
    if tools:
        session["tools"] = tools
        session["tool_choice"] = "auto"
    return session


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


@dataclass(frozen=True)
class LinkPolicy:
    """How every Realtime session is opened, aged, watched, reconnected and closed."""

    open_timeout_s: float = 10.0
    close_timeout_s: float = 1.0
    max_age_s: float = 3300.0  # swap sessions before the API's 60-minute cap
    stall_s: float = 8.0  # an answer owed for this long with no event at all: the link is dead
    reconnect_delays_s: tuple[float, ...] = (0.0, 0.5, 1.5)  # then give up

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkPolicy:
        return cls(
            open_timeout_s=settings.realtime_open_timeout_s,
            close_timeout_s=settings.realtime_close_timeout_s,
            max_age_s=settings.realtime_session_max_s,
            stall_s=settings.realtime_stall_s,
        )

    def reconnect_delay(self, attempt: int) -> float | None:
        """Seconds to wait before reconnect `attempt` (1-based); None: stop trying."""
        if attempt < 1 or attempt > len(self.reconnect_delays_s):
            return None
        return self.reconnect_delays_s[attempt - 1]

    def connection_options(self) -> dict[str, Any]:
        """websockets' own bounds: even the SDK's internal closes cannot wait 10 s, and a peer
        that stops answering pings is dropped within 2 x stall_s, whether or not an answer is
        owed (the core's watchdog covers the owed case within stall_s)."""
        return {
            "open_timeout": self.open_timeout_s,
            "close_timeout": self.close_timeout_s,
            "ping_interval": self.stall_s,
            "ping_timeout": self.stall_s,
        }


@dataclass(frozen=True)
class NotJson:
    """A frame from upstream that does not parse; its start, for the log."""

    preview: bytes


class UpstreamClosed(Exception):
    """The Realtime websocket ended (drop, 60-minute cap, or our own close)."""


def sdk_socket_available() -> bool:
    """Whether the SDK's connection still keeps its websocket at `_connection`.

    `send_bytes` writes audio straight to it; checked once at start so a renamed attribute is
    an error in the log on day one, not a silent 40 % slower hot path.
    """
    from openai.resources.realtime.realtime import AsyncRealtimeConnection

    names = AsyncRealtimeConnection.__init__.__code__.co_names
    base_init = AsyncRealtimeConnection.__mro__[1].__init__
    names += getattr(getattr(base_init, "__code__", None), "co_names", ())
    return "_connection" in names


def check_sdk_socket() -> bool:
    ok = sdk_socket_available()
    if not ok:
        log.error(
            "openai SDK no longer keeps its websocket at AsyncRealtimeConnection._connection: "
            "call audio goes through the slower send_raw path; update gateway/bridge.py"
        )
    return ok


class RealtimeSession:
    """One Realtime websocket session."""

    _ids = itertools.count(1)

    def __init__(self, manager: Any, connection: Any, policy: LinkPolicy) -> None:
        self._manager = manager
        self._conn = connection
        self.policy = policy
        ws = getattr(connection, "_connection", None)  # websockets' ClientConnection
        self._ws = ws if callable(getattr(ws, "send", None)) else None
        self.opened_at = time.monotonic()
        self.closed = False

    @classmethod
    async def open(
        cls,
        client: AsyncOpenAI,
        model: str,
        session: dict[str, Any],
        policy: LinkPolicy | None = None,
    ) -> RealtimeSession:
        """Connect and send `session.update` at once (the server applies events in order).

        Bounded by `open_timeout_s`; a failure or cancellation after the socket opened closes
        it, so an abandoned open never leaves a paid session behind.
        """
        policy = policy or LinkPolicy()
        manager = client.realtime.connect(
            model=model, websocket_connection_options=policy.connection_options()
        )
        async with asyncio.timeout(policy.open_timeout_s):
            connection = await manager.enter()
        opened = cls(manager, connection, policy)
        try:
            await opened.send({"type": "session.update", "session": session})
        except BaseException:
            await opened.abort()
            raise
        return opened

    @property
    def expired(self) -> bool:
        return time.monotonic() - self.opened_at >= self.policy.max_age_s

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
        frame is identical. `check_sdk_socket` says at start whether this path is available.
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

    async def recv(self) -> Any:
        """The next event, parsed: any JSON value, or `NotJson` (callers check the shape and
        log with their own id)."""
        try:
            frame = await self._conn.recv_bytes()
        except Exception as err:
            self.closed = True
            raise UpstreamClosed(f"{type(err).__name__}: {err}") from err
        try:
            return orjson.loads(frame)
        except orjson.JSONDecodeError:
            return NotJson(bytes(frame[:80]))

    async def close(self) -> None:
        """Close handshake bounded by `close_timeout_s`; past it the socket is cut."""
        if self.closed:
            return
        self.closed = True
        try:
            async with asyncio.timeout(self.policy.close_timeout_s + 0.5):
                await self._conn.close()
        except TimeoutError:
            log.info("upstream did not finish its close handshake; connection cut")
            self._cut()
        except Exception as err:  # already gone: nothing left to release
            log.debug("closing upstream: %s", err)

    async def abort(self) -> None:
        """Drop the connection without waiting for the peer (open failed half-way)."""
        self.closed = True
        self._cut()

    def _cut(self) -> None:
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()


async def pump(
    session: RealtimeSession,
    on_event: Callable[[Any], Awaitable[None]],
    log_id: str,
) -> str:
    """Feed every event of `session` to `on_event` until the link ends; returns why.

    Never raises (but CancelledError): a drop, a broken frame or a failing handler all come
    back as a reason, so the owner decides to reconnect or to end, and no task dies unseen.
    """
    while True:
        try:
            event = await session.recv()
        except UpstreamClosed as err:
            return f"upstream closed ({err})"
        except Exception as err:  # not seen in practice: the socket is in an unknown state
            log.warning("%s: upstream receive failed: %s: %s", log_id, type(err).__name__, err)
            await session.abort()
            return f"receive failed ({type(err).__name__})"
        try:
            await on_event(event)
        except Exception:
            kind = event.get("type") if isinstance(event, dict) else type(event).__name__
            log.exception("%s: handling upstream event %r failed", log_id, kind)
            return f"handling {kind!r} failed"
