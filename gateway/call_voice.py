"""A call in Endrigo's ElevenLabs voice (VOICE_PROVIDER=elevenlabs).

The Realtime session answers in text; each reply's text deltas stream into an ElevenLabs
stream-input socket as they come, and its mu-law audio goes to the call's core as the audio
deltas of that reply, so the core's pacing, marks and barge-in stay as they are. Two things
differ from the Realtime voice, and this module does them:

* Barge-in: a text reply has no audio to truncate, so the core's `conversation.item.truncate`
  becomes a delete and an assistant message of the characters the phone had played (by
  ElevenLabs' alignment), so the model knows what the caller heard.
* Failure: an ElevenLabs stream that fails mid-reply is logged, and the rest of that reply is
  read in the Realtime voice by an out-of-band response; the next reply tries ElevenLabs again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.elevenlabs import VoiceUnavailable
from gateway.elevenlabs_stream import ElevenLabsStream, Phrases, SpokenText
from gateway.observability import ERRORS

log = logging.getLogger(__name__)

Feed = Callable[[dict[str, Any]], Awaitable[None]]  # an event into the call's core
Send = Callable[[dict[str, Any]], Awaitable[None]]  # an event to the Realtime session
Opener = Callable[[], Awaitable[ElevenLabsStream]]
Bill = Callable[[int, float], None]  # characters sent to ElevenLabs, ms of audio it made


@dataclass
class _Reply:
    response_id: str
    item_id: str
    opening: asyncio.Task[ElevenLabsStream]
    spoken: SpokenText = field(default_factory=SpokenText)
    text: asyncio.Future[str] = field(default_factory=asyncio.Future)
    parts: list[str] = field(default_factory=list)  # the deltas so far
    phrases: Phrases = field(default_factory=Phrases)
    reader: asyncio.Task[None] | None = None
    dropped: bool = False


class CallVoice:
    def __init__(
        self,
        open_stream: Opener,
        feed: Feed,
        send: Send,
        read_aloud: str,
        log_id: str,
        bill: Bill | None = None,
    ) -> None:
        self._open_stream = open_stream
        self._bill = bill
        self._feed = feed
        self._send = send
        self._read_aloud = read_aloud  # the persona's "read this exactly" instruction
        self._log_id = log_id
        self._replies: dict[str, _Reply] = {}  # by item id
        # Streams opened when a text response is created, before its first word: the
        # handshake (TLS to ElevenLabs) is paid while the model thinks, not after.
        self._early: dict[str, asyncio.Task[ElevenLabsStream]] = {}  # by response id
        self._stopping: set[asyncio.Future[None]] = set()
        # Replies ElevenLabs was still speaking when the caller began to talk (barge_in_done).
        self._interrupted: list[_Reply] = []

    # upstream -> core
    async def on_realtime(self, event: Any) -> list[dict[str, Any]]:
        """The events the core should see for `event` (it, or what stands for it)."""
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "response.output_text.delta":
            return await self._on_text_delta(event)
        if kind == "response.output_text.done":
            return self._on_text_done(event)
        if kind == "input_audio_buffer.speech_started":
            self._interrupted = [r for r in self._replies.values() if self._speaking(r)]
        elif kind == "response.created":
            self._open_early(event.get("response"))
        elif kind == "response.done":
            self._close_early(event.get("response"))
        return [event]

    @staticmethod
    def _speaking(reply: _Reply) -> bool:
        return not reply.dropped and reply.reader is not None and not reply.reader.done()

    def barge_in_done(self) -> list[dict[str, Any]]:
        """After the core took the caller's speech: a reply ElevenLabs is still speaking that
        the core did not cut (none of it was on the phone: its text was whole before its
        first audio, or all it had sent was played) is dropped here, and the model told the
        words heard. Its later audio would otherwise play over the caller."""
        interrupted, self._interrupted = self._interrupted, []
        events: list[dict[str, Any]] = []
        for reply in interrupted:
            if not reply.dropped:
                events += self._drop(reply, reply.spoken.heard(reply.spoken.audio_ms))
        return events

    def _open_early(self, response: Any) -> None:
        if not isinstance(response, dict) or response.get("output_modalities") != ["text"]:
            return
        response_id = response.get("id")
        if isinstance(response_id, str) and response_id not in self._early:
            self._early[response_id] = asyncio.ensure_future(self._open_stream())

    def _close_early(self, response: Any) -> None:
        """A response that ended without a word: its early stream is not needed."""
        response_id = response.get("id") if isinstance(response, dict) else None
        opening = self._early.pop(str(response_id), None)
        if opening is not None:
            self._stopping.add(asyncio.ensure_future(self._discard(opening)))

    async def _discard(self, opening: asyncio.Task[ElevenLabsStream]) -> None:
        with contextlib.suppress(VoiceUnavailable, asyncio.CancelledError):
            await (await opening).close()

    async def _on_text_delta(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        reply = self._reply_for(event)
        if reply is None:
            return []
        delta = str(event.get("delta") or "")
        reply.parts.append(delta)
        phrases = reply.phrases.add(delta)
        if phrases and self._speaking(reply):
            with contextlib.suppress(VoiceUnavailable):  # the reader sees it and falls back
                stream = await reply.opening
                for phrase in phrases:
                    await stream.send_phrase(phrase)
        return [{**event, "type": "response.output_audio_transcript.delta"}]

    def _on_text_done(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        reply = self._replies.get(str(event.get("item_id")))
        text = str(event.get("text") or "")
        if reply is not None and not reply.text.done():
            reply.text.set_result(text)
        done = {key: event.get(key) for key in ("event_id", "response_id", "item_id")}
        return [
            {**done, "type": "response.output_audio_transcript.done", "transcript": text,
             "output_index": 0, "content_index": 0}
        ]  # fmt: skip

    def _reply_for(self, event: dict[str, Any]) -> _Reply | None:
        item_id, response_id = event.get("item_id"), event.get("response_id")
        if not isinstance(item_id, str) or not isinstance(response_id, str):
            return None
        reply = self._replies.get(item_id)
        if reply is None:
            opening = self._early.pop(response_id, None)
            opening = opening or asyncio.ensure_future(self._open_stream())
            reply = _Reply(response_id, item_id, opening)
            reply.reader = asyncio.ensure_future(self._speak(reply))
            self._replies[item_id] = reply
        return reply

    async def _speak(self, reply: _Reply) -> None:
        """Audio as it comes, as the reply's audio deltas; a failure falls back."""
        ids = {"response_id": reply.response_id, "item_id": reply.item_id,
               "output_index": 0, "content_index": 0}  # fmt: skip
        try:
            stream = await reply.opening
            finishing = asyncio.ensure_future(self._finish_when_whole(reply, stream))
            try:
                async for chunk in stream.chunks():
                    if reply.dropped:
                        break
                    reply.spoken.add(chunk)
                    audio = base64.b64encode(chunk.audio).decode()
                    await self._feed({"type": "response.output_audio.delta", **ids, "delta": audio})
            finally:
                finishing.cancel()
                with contextlib.suppress(asyncio.CancelledError, VoiceUnavailable):
                    await finishing
                await stream.close()
                if self._bill is not None and stream.characters:
                    self._bill(stream.characters, reply.spoken.audio_ms)
        except VoiceUnavailable as err:
            if not reply.dropped:
                await self._fall_back(reply, err)
            return
        if not reply.dropped:
            await self._feed({"type": "response.output_audio.done", **ids})

    async def _finish_when_whole(self, reply: _Reply, stream: ElevenLabsStream) -> None:
        await asyncio.shield(reply.text)
        await stream.send_phrase(reply.phrases.rest())
        await stream.finish()

    async def _fall_back(self, reply: _Reply, err: VoiceUnavailable) -> None:
        log.warning("%s: ElevenLabs failed mid-reply (%s); the Realtime voice reads the rest",
                    self._log_id, err)  # fmt: skip
        ERRORS.labels("elevenlabs").inc()
        ids = {"response_id": reply.response_id, "item_id": reply.item_id,
               "output_index": 0, "content_index": 0}  # fmt: skip
        await self._feed({"type": "response.output_audio.done", **ids})
        text = await asyncio.shield(reply.text)
        rest = text[len(reply.spoken.text) :].strip()
        if not rest:
            return
        await self._send(
            {
                "type": "response.create",
                "response": {
                    "conversation": "none",  # the words are already the model's, in memory
                    "output_modalities": ["audio"],
                    "instructions": self._read_aloud,
                    "input": [
                        {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": rest}],
                        }
                    ],
                },
            }
        )

    def upstream_gone(self) -> None:
        """The session ended mid-reply: what it had said is the whole of it, so its stream
        is finished (else it would wait for a text that never comes)."""
        for reply in self._replies.values():
            if not reply.text.done():
                reply.text.set_result("".join(reply.parts))

    # core -> upstream
    def outgoing(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """What to send for the core's `event`: a truncate of a reply ElevenLabs spoke is a
        delete and the words the phone had played."""
        kind = event.get("type")
        reply = self._replies.get(str(event.get("item_id")))
        if reply is None or kind not in ("conversation.item.truncate", "conversation.item.delete"):
            return [event]
        played_ms = int(event.get("audio_end_ms") or 0)
        heard = reply.spoken.heard(played_ms) if kind.endswith("truncate") else ""
        return self._drop(reply, heard)

    def _drop(self, reply: _Reply, heard: str) -> list[dict[str, Any]]:
        """Stop speaking `reply` and tell the model the words the caller had heard."""
        if not reply.dropped:
            reply.dropped = True  # the reader stops feeding at its next chunk
            self._stopping.add(asyncio.ensure_future(self._stop(reply)))
        delete = {"type": "conversation.item.delete", "item_id": reply.item_id}
        if not heard.strip():
            return [delete]
        said = {"type": "output_text", "text": heard.strip()}
        item = {"type": "message", "role": "assistant", "content": [said]}
        return [delete, {"type": "conversation.item.create", "item": item}]

    async def _stop(self, reply: _Reply) -> None:
        """A dropped reply's stream is closed (no more characters billed); its reader ends."""
        with contextlib.suppress(VoiceUnavailable, asyncio.CancelledError):
            await (await reply.opening).close()

    async def close(self) -> None:
        """The call ended: every stream closed, every task ended and retrieved."""
        tasks = [t for r in self._replies.values() for t in (r.reader, r.opening) if t]
        tasks += [*self._stopping, *self._early.values()]
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, ElevenLabsStream):
                await result.close()
        self._replies.clear()
        self._early.clear()
