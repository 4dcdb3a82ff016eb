"""The GPT-Live link (VOICE_BACKEND=live): a call's session config and one Live websocket
through the official SDK (`client.live.connect()`, `/v1/live/sessions`).

The socket is the same kind as Realtime's (the SDK's websocket connection base), so
`RealtimeSession`'s bounded send, hot-path `send_bytes` and receive are reused. Live differs
at both ends: it wants `session.start` first and its `session.started` before any audio, so
`start` waits for that answer (bounded by the open timeout) and hands it to the first
`recv`; and its final usage comes only in `session.closed`, the answer to `session.close`,
so `close` asks for it and waits (bounded by the close timeout) before the socket goes.
Usage is cumulative seconds of session, kept here from every event that passes (`bill`).
Mapping Live's events onto the call core is `live_dialect.py`'s job; docs/gpt-live.md says
why each choice was made.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from openai import AsyncOpenAI

from gateway.bridge import LinkPolicy, NotJson, RealtimeSession, UpstreamClosed, voice_param
from gateway.settings import Settings

CALL_FORMAT = {"type": "audio/pcmu", "rate": 8000}  # Twilio's frames pass through untouched
NOTE_FORMAT = {"type": "audio/pcm", "rate": 24000}  # WhatsApp voice notes' encoder rate


class LiveRefused(Exception):
    """The Live service answered `session.start` with an error, or with anything else."""


def live_session(
    settings: Settings,
    voice: str,
    instructions: str,
    audio_format: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A session's start: one audio format both ways (`CALL_FORMAT` for a phone call,
    `NOTE_FORMAT` for WhatsApp). The memory stays in the instructions, as on Realtime: they
    fit Live's 16,384 tokens with room to spare, and its seeded `input` (128 messages) adds
    nothing the instructions do not already carry. Live's voice model has no tools: they go
    to its Responses backend, which the model delegates to (`FunctionTool` takes our
    definitions' shape as they are)."""
    session: dict[str, Any] = {
        "model": settings.live_model,
        "instructions": instructions,
        "audio": {"format": audio_format, "output": {"voice": voice_param(voice)}},
    }
    if tools:
        backend = {"model": settings.live_tools_model, "tools": tools, "tool_choice": "auto"}
        session["delegation"] = {"type": "responses", "responses": backend}
    return session


class LiveSession(RealtimeSession):
    """One GPT-Live websocket session, opened and started."""

    def __init__(self, manager: Any, connection: Any, policy: LinkPolicy) -> None:
        super().__init__(manager, connection, policy)
        self._started: Any = None  # session.started, for the first recv
        self.usage_seconds = 0.0  # cumulative, as Live reports it (never summed)
        self._billed_seconds = 0.0
        self._reading = False  # a recv is in progress (the owner's pump)
        self._finalized = asyncio.Event()  # session.closed came

    @classmethod
    async def start(
        cls, client: AsyncOpenAI, session: dict[str, Any], policy: LinkPolicy | None = None
    ) -> LiveSession:
        """Connect, send `session.start` and wait for `session.started`, all within
        `open_timeout_s`; a refusal is `LiveRefused`, and a half-open socket is cut."""
        policy = policy or LinkPolicy()
        manager = client.live.connect(websocket_connection_options=policy.connection_options())
        async with asyncio.timeout(policy.open_timeout_s):
            connection = await manager.enter()
            opened = cls(manager, connection, policy)
            try:
                await opened.send({"type": "session.start", "session": session})
                opened._started = await opened._answer()
            except BaseException:
                await opened.abort()
                raise
        return opened

    async def _answer(self) -> Any:
        event = await super().recv()
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "session.started":
            return event
        if kind == "error":
            error = event.get("error") or {}
            raise LiveRefused(f"{error.get('code')}: {error.get('message')}")
        shown = event.preview if isinstance(event, NotJson) else kind
        raise LiveRefused(f"expected session.started, got {shown!r}")

    async def recv(self) -> Any:
        if self._started is not None:
            started, self._started = self._started, None
            return started
        self._reading = True
        try:
            event = await super().recv()
        finally:
            self._reading = False
        self._note(event)
        return event

    def _note(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind not in ("session.usage.updated", "session.closed"):
            return
        usage = event.get("usage")
        seconds = usage.get("seconds") if isinstance(usage, dict) else None
        if isinstance(seconds, int | float):
            self.usage_seconds = max(self.usage_seconds, float(seconds))
        if kind == "session.closed":
            self._finalized.set()

    def bill(self) -> float:
        """The seconds reported since the last bill."""
        unbilled = max(0.0, self.usage_seconds - self._billed_seconds)
        self._billed_seconds = max(self._billed_seconds, self.usage_seconds)
        return unbilled

    async def close(self) -> None:
        """`session.close`, then `session.closed` (its final usage) awaited within the close
        timeout, read here unless the owner's pump is reading; then the socket closes."""
        if self.closed:
            return
        with contextlib.suppress(UpstreamClosed):
            await self.send({"type": "session.close"})
        with contextlib.suppress(TimeoutError, UpstreamClosed):
            async with asyncio.timeout(self.policy.close_timeout_s):
                if self._reading:
                    await self._finalized.wait()
                while not self._finalized.is_set() and not self.closed:
                    await self.recv()
        await super().close()
