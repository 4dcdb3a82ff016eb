"""WhatsApp's side of the Realtime API: one warm session per person, one turn per message.

A person's session stays open for `WHATSAPP_SESSION_IDLE_S` after their last message, so
consecutive messages share the model's context and skip the connect time. A dropped session is
reopened with persona and memory (which by then holds every earlier reply), and the turn is
tried once more. One response at a time per person.

A turn: a voice note (PCM16 24 kHz) is appended in 1 s chunks, committed and answered
(`turn_detection` is null: each message is a whole turn); a text message becomes a user
`input_text` item. Both ask for audio output, which carries its transcript. The reply's audio
is encoded to OGG/Opus as its deltas arrive, so the voice note is ready when the response is.

`ReplyCollector` and `NoteEncoder` are plain classes without I/O; `WarmSessions` moves events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from gateway.bridge import (
    LinkPolicy,
    RealtimeSession,
    UpstreamClosed,
    voice_note_session,
)
from gateway.elevenlabs import VoiceUnavailable
from gateway.live_dialect import LiveDialect, silent_context
from gateway.live_session import NOTE_FORMAT, LiveSession, live_session
from gateway.memory import instructions_for, load_memory_marked, news_since
from gateway.observability import ERRORS
from gateway.persona import Channel, MemoryContext, channel_section, greeting_instruction
from gateway.runtime import Runtime
from gateway.store import Erased, Person
from gateway.tool_flow import MAX_ROUNDS, ToolFlow
from gateway.tool_runner import ToolContext, ToolRunner
from gateway.tools import ToolCall
from gateway.transcode import PCM24K_BYTES_PER_MS, OpusEncoder
from gateway.usage import token_counts
from gateway.whatsapp_live import (
    TRAILING_SILENCE_MS,
    DelegatedCalls,
    LiveInput,
    collect_live,
    note_dialect,
)

log = logging.getLogger(__name__)

APPEND_BYTES = 1000 * PCM24K_BYTES_PER_MS  # 1 s per append; the API takes up to 15 MiB
MIN_COMMIT_BYTES = 150 * PCM24K_BYTES_PER_MS  # the API refuses commits under 100 ms
# WhatsApp shows a play button only up to 512 KB; at 24 kbps 150 s is ~450 KB with OGG framing.
MAX_NOTE_MS = 150_000
VOICE_NOTE_LIMIT_BYTES = 512 * 1024
TURN_TIMEOUT_S = 120.0
TRANSCRIPT_GRACE_S = 2.0  # the voice note's own transcript may trail the response a little
GREET_AFTER = timedelta(hours=6)  # a person back after this long is greeted again


@dataclass(frozen=True)
class TextInput:
    text: str


@dataclass(frozen=True)
class AudioInput:
    pcm: bytes = field(repr=False)  # PCM16 little-endian, mono, 24 kHz
    duration_ms: int


TurnInput = TextInput | AudioInput


@dataclass(frozen=True)
class VoiceReply:
    text: str  # the reply's transcript
    notes: list[bytes] = field(repr=False)  # OGG/Opus voice notes, each a playable size
    audio_ms: int
    user_text: str  # what the person wrote, or the transcript of their voice note ("" if none)
    user_audio_ms: int | None  # the voice note's length; None for text
    conversation_id: int | None
    response_id: str | None


class RealtimeUnavailable(Exception):
    """The turn could not be answered now (connect failure, drop, error, timeout)."""


class TurnFailed(Exception):
    """The Realtime API refused or failed this turn."""


class PersonErased(Exception):
    """The person was erased while their turn waited or ran: nothing of it is kept."""


def channel_of(turn: TurnInput) -> Channel:
    return "whatsapp_voice" if isinstance(turn, AudioInput) else "whatsapp_text"


class NoteEncoder:
    """PCM16 24 kHz deltas -> OGG/Opus voice notes, split so each stays playable."""

    def __init__(self, max_note_ms: int = MAX_NOTE_MS) -> None:
        self._max_bytes = max_note_ms * PCM24K_BYTES_PER_MS
        self._notes: list[bytes] = []
        self._current: OpusEncoder | None = None
        self._current_bytes = 0
        self.pcm_bytes = 0

    @property
    def duration_ms(self) -> int:
        return self.pcm_bytes // PCM24K_BYTES_PER_MS

    def push(self, pcm: bytes) -> None:
        self.pcm_bytes += len(pcm)
        while pcm:
            if self._current is None:
                self._current, self._current_bytes = OpusEncoder(), 0
            room = self._max_bytes - self._current_bytes
            piece, pcm = pcm[:room], pcm[room:]
            self._current.push(piece)
            self._current_bytes += len(piece)
            if self._current_bytes >= self._max_bytes:
                self._close_note()

    def finish(self) -> list[bytes]:
        if self._current is not None:
            self._close_note()
        return self._notes

    def _close_note(self) -> None:
        assert self._current is not None
        note = self._current.finish()
        self._current = None
        if note:
            self._notes.append(note)


class BackgroundEncoder:
    """A NoteEncoder fed from the event loop but run in a worker thread.

    Opus encoding is CPU work (~1 ms per delta) that would otherwise delay every webhook
    answered meanwhile; PyAV releases the GIL while it encodes. Chunks that arrive while the
    thread is busy are joined into one push, so the order is kept and thread hops stay few.
    """

    def __init__(self, encoder: NoteEncoder | None = None) -> None:
        self._encoder = encoder or NoteEncoder()
        self._pending = bytearray()
        self._drain: asyncio.Task[None] | None = None

    @property
    def duration_ms(self) -> int:
        return (self._encoder.pcm_bytes + len(self._pending)) // PCM24K_BYTES_PER_MS

    def push(self, pcm: bytes) -> None:
        self._pending += pcm
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._encode_pending())

    async def finish(self) -> list[bytes]:
        if self._drain is not None:
            await self._drain
        await self._encode_pending()
        return await asyncio.to_thread(self._encoder.finish)

    def cancel(self) -> None:
        if self._drain is not None:
            self._drain.cancel()

    async def _encode_pending(self) -> None:
        while self._pending:
            chunk = bytes(self._pending)
            self._pending.clear()
            await asyncio.to_thread(self._encoder.push, chunk)


class ReplyCollector:
    """One turn's server events -> the reply. No I/O; audio is handed on as it comes."""

    def __init__(self, on_audio: Callable[[bytes], None], *, wants_user_transcript: bool) -> None:
        self.on_audio = on_audio
        self.user_item_id: str | None = None
        self.user_transcript = ""
        self.user_transcript_settled = not wants_user_transcript
        self.response_id: str | None = None
        self._transcript_parts: list[str] = []
        self.transcript: str | None = None
        self.status: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.protocol_errors = 0
        self._created_unusable = False  # response.created came without a usable id
        self.tools: ToolFlow | None = None  # set when the session offers tools
        self.tool_calls: list[ToolCall] = []

    @property
    def finished(self) -> bool:
        return self.status is not None or self.error is not None

    @property
    def reply_text(self) -> str:
        text = self.transcript if self.transcript is not None else "".join(self._transcript_parts)
        return text.strip()

    def on_event(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        if not isinstance(kind, str):
            self.protocol_errors += 1
            return
        handler = getattr(self, "_on_" + kind.replace(".", "_"), None)
        if handler is None:
            return
        try:
            handler(event)
        except (TypeError, ValueError, AttributeError) as err:  # a field of the wrong shape
            self.protocol_errors += 1
            log.warning("unusable %s from upstream skipped: %s", kind[:60], err)

    def _on_input_audio_buffer_committed(self, event: dict[str, Any]) -> None:
        self.user_item_id = event.get("item_id")

    def _on_conversation_item_input_audio_transcription_completed(
        self, event: dict[str, Any]
    ) -> None:
        if self.user_item_id is not None and event.get("item_id") == self.user_item_id:
            self.user_transcript = str(event.get("transcript") or "").strip()
            self.user_transcript_settled = True

    def _on_conversation_item_input_audio_transcription_failed(self, event: dict[str, Any]) -> None:
        if event.get("item_id") == self.user_item_id:
            self.user_transcript_settled = True

    def _on_response_created(self, event: dict[str, Any]) -> None:
        if self.response_id is None:  # one response at a time: the first one is ours
            response = event.get("response")
            rid = response.get("id") if isinstance(response, dict) else None
            self.response_id = rid if isinstance(rid, str) else None
            self._created_unusable = self.response_id is None

    def _ours(self, event: dict[str, Any]) -> bool:
        rid = event.get("response_id")
        if self.response_id is None and self._created_unusable and isinstance(rid, str):
            self.response_id = rid  # its response.created was unusable; one runs at a time
        return self.response_id is not None and rid == self.response_id

    def _on_response_output_audio_delta(self, event: dict[str, Any]) -> None:
        if self._ours(event):
            self.on_audio(base64.b64decode(event.get("delta") or "", validate=True))

    def _on_response_output_audio_transcript_delta(self, event: dict[str, Any]) -> None:
        if self._ours(event):
            self._transcript_parts.append(str(event.get("delta") or ""))

    def _on_response_output_audio_transcript_done(self, event: dict[str, Any]) -> None:
        if self._ours(event):
            self.transcript = str(event.get("transcript") or "")

    # A text-only reply (another voice speaks it): its words come as output_text.
    def _on_response_output_text_delta(self, event: dict[str, Any]) -> None:
        if self._ours(event):
            self._transcript_parts.append(str(event.get("delta") or ""))

    def _on_response_output_text_done(self, event: dict[str, Any]) -> None:
        if self._ours(event):
            self.transcript = str(event.get("text") or "")

    def _on_response_done(self, event: dict[str, Any]) -> None:
        response = event.get("response") or {}
        if (
            self.response_id is None
            and self._created_unusable
            and isinstance(response.get("id"), str)
        ):
            self.response_id = response["id"]
        if response.get("id") != self.response_id:
            return
        if self.tools is not None:
            self.tools.on_response_done(self.response_id)  # its calls may now be answered
        self.status = str(response.get("status") or "failed")
        usage = response.get("usage")
        self.usage = usage if isinstance(usage, dict) else None
        if self.status in ("failed", "cancelled"):
            details = response.get("status_details") or {}
            problem = details.get("error") or {}
            self.error = f"response {self.status}: {problem.get('message') or details}"

    def next_response(self) -> ReplyCollector:
        """A collector for the response that answers this one's tool calls: same audio sink,
        same tools, and the person's own words (their transcript may still be on its way)."""
        following = ReplyCollector(self.on_audio, wants_user_transcript=False)
        following.tools = self.tools
        following.user_item_id = self.user_item_id
        following.user_transcript = self.user_transcript
        following.user_transcript_settled = self.user_transcript_settled
        return following

    def _on_response_function_call_arguments_done(self, event: dict[str, Any]) -> None:
        if self.tools is not None and self._ours(event):
            call = self.tools.on_arguments_done(event)
            if call is not None:
                self.tool_calls.append(call)

    def _on_error(self, event: dict[str, Any]) -> None:
        err = event.get("error") or {}
        self.error = f"{err.get('code') or err.get('type')}: {err.get('message')}"


@dataclass
class _Warm:
    """One person's session, between and during turns."""

    person: Person
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: RealtimeSession | None = None
    memory: MemoryContext | None = None
    channel: Channel | None = None
    conversation_id: int | None = None
    responses: int = 0
    users: int = 0  # turns waiting or running: the idle timer leaves a busy session alone
    idle_timer: asyncio.TimerHandle | None = None
    forgotten: bool = False  # the person was erased: never reopened, nothing written
    mark: int = 0  # the newest turn id the session knows of; later ones elsewhere are news
    our_number: str | None = None  # the number the person wrote to ("whatsapp:+55...")
    live: LiveInput | None = None  # on GPT-Live (VOICE_BACKEND=live): what it has heard
    dialect: LiveDialect | None = None

    @property
    def usable(self) -> bool:
        # An aged session is replaced before the API's 60-minute cap can cut a reply.
        session = self.session
        return session is not None and not session.closed and not session.expired


class WarmSessions:
    def __init__(self, rt: Runtime, idle_s: float) -> None:
        self.rt = rt
        self.idle_s = idle_s
        self.policy = LinkPolicy.from_settings(rt.settings)
        self._warm: dict[int, _Warm] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.tools = ToolRunner(rt)

    async def reply(
        self, person: Person, turn: TurnInput, log_id: str, our_number: str | None = None
    ) -> VoiceReply:
        """Answer one message in the person's warm session (opened or reopened as needed);
        `our_number` is the WhatsApp number the person wrote to (a hand-off writes from it)."""
        if self.rt.holders.erased(person.id):
            raise PersonErased(f"person {person.id} was erased")
        warm = self._warm.setdefault(person.id, _Warm(person))
        warm.users += 1
        if warm.idle_timer is not None:
            warm.idle_timer.cancel()
        try:
            async with warm.lock:
                warm.person, warm.our_number = person, our_number
                return await self._reply_with_reconnect(warm, turn, log_id)
        finally:
            warm.users -= 1
            self._arm_idle(warm)

    async def forget(self, person_id: int) -> None:
        """Erasure: the person's session closes now (a turn in it fails as PersonErased) and
        is never reopened; its conversation is left to the erasure."""
        warm = self._warm.pop(person_id, None)
        if warm is None:
            return
        warm.forgotten = True
        warm.conversation_id = None
        await self._close(warm)

    async def close_all(self) -> None:
        """Shutdown: every warm session closes at once, each close bounded by the policy."""
        warms = list(self._warm.values())
        self._warm.clear()
        await asyncio.gather(*(self._close(w) for w in warms), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self.tools.close()

    # turns
    async def _reply_with_reconnect(self, warm: _Warm, turn: TurnInput, log_id: str) -> VoiceReply:
        for attempt in (1, 2):
            if attempt > 1:
                await asyncio.sleep(self.policy.reconnect_delay(attempt - 1) or 0.0)
            if warm.forgotten:
                raise PersonErased(f"person {warm.person.id} was erased mid-turn")
            try:
                if not warm.usable:
                    await self._close(warm)
                    await self._open(warm, channel_of(turn))
                return await self._turn(warm, turn, log_id)
            except UpstreamClosed as err:
                await self._close(warm)
                if warm.forgotten:
                    raise PersonErased(f"person {warm.person.id} was erased mid-turn") from err
                if attempt == 2:
                    raise RealtimeUnavailable(f"session dropped twice: {err}") from err
                log.warning("whatsapp %s: Realtime session dropped (%s); reopening", log_id, err)
            except (TurnFailed, TimeoutError) as err:
                await self._close(warm)  # its state is unknown now; the next turn starts clean
                raise RealtimeUnavailable(str(err) or type(err).__name__) from err
            except asyncio.CancelledError:
                await self._close(warm)
                raise
            except Exception as err:  # connect refused, TLS, DNS...: transient for the queue
                await self._close(warm)
                raise RealtimeUnavailable(f"{type(err).__name__}: {err}") from err
        raise AssertionError("unreachable")

    async def _open(self, warm: _Warm, channel: Channel) -> None:
        rt, settings = self.rt, self.rt.settings
        warm.memory, warm.mark = await load_memory_marked(rt.store, warm.person)
        instructions = instructions_for(rt.persona, channel, warm.memory)
        tools = self.tools.definitions("whatsapp", warm.person)
        if settings.voice_backend == "live":
            live = live_session(settings, rt.voice, instructions, NOTE_FORMAT, tools)
            warm.session = session = await LiveSession.start(rt.openai, live, self.policy)
            warm.live, warm.dialect = LiveInput(session), note_dialect()
        else:
            config = voice_note_session(settings, rt.voice, instructions, tools)
            warm.session = await RealtimeSession.open(
                rt.openai, settings.realtime_model, config, self.policy
            )
        warm.channel, warm.responses = channel, 0
        warm.conversation_id = await rt.store.start_conversation(warm.person.id, "whatsapp")

    async def _turn(self, warm: _Warm, turn: TurnInput, log_id: str) -> VoiceReply:
        if warm.live is not None:
            return await self._live_turn(warm, turn, log_id)
        session = warm.session
        assert session is not None
        started = time.monotonic()
        await self._catch_up(warm, session)
        await send_input(session, turn)
        params = self._response_params(warm, turn)
        await session.send({"type": "response.create", "response": params})
        encoder = BackgroundEncoder()
        is_audio = isinstance(turn, AudioInput)
        collector = ReplyCollector(encoder.push, wants_user_transcript=is_audio)
        collector.tools = ToolFlow()
        try:
            await collect(session, collector)
            collector = await self._tool_rounds(warm, session, collector, turn, log_id)
        except BaseException:
            encoder.cancel()
            raise
        warm.responses += 1
        notes, audio_ms = await encoder.finish(), encoder.duration_ms
        if self.rt.elevenlabs is not None and collector.reply_text:
            instruction = self.rt.persona.tools["results"]["read_aloud"]
            notes, audio_ms = await speak(self.rt, warm.person, collector.reply_text, instruction)
        reply = self._reply(warm, turn, collector, notes, audio_ms)
        log.info(
            "whatsapp %s: reply of %d ms audio, %d chars in %.0f ms",
            log_id,
            reply.audio_ms,
            len(reply.text),
            (time.monotonic() - started) * 1000,
        )
        await self._record_usage(warm, collector, reply.audio_ms)
        return reply

    async def _live_turn(self, warm: _Warm, turn: TurnInput, log_id: str) -> VoiceReply:
        """The message put to GPT-Live as its protocol allows (whatsapp_live.py); tools run
        on its Responses backend."""
        heard, dialect = warm.live, warm.dialect
        assert heard is not None and dialect is not None
        started = time.monotonic()
        for context in await self._live_context(warm, turn):
            await heard.session.send(context)
        if isinstance(turn, TextInput):
            await heard.text(self.rt.persona, turn.text)
        else:
            await heard.audio(turn.pcm)
            await heard.silence(TRAILING_SILENCE_MS)
        encoder = BackgroundEncoder()
        is_audio = isinstance(turn, AudioInput)
        collector = ReplyCollector(encoder.push, wants_user_transcript=is_audio)
        try:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                await self._live_rounds(warm, turn, collector, log_id)
        except BaseException:
            encoder.cancel()
            raise
        if collector.error is not None:
            encoder.cancel()
            raise TurnFailed(collector.error)
        warm.responses += 1
        notes, audio_ms = await encoder.finish(), encoder.duration_ms
        await heard.silence(audio_ms)  # the reply "played" on Live's clock: it keeps it all
        reply = self._reply(warm, turn, collector, notes, audio_ms)
        await self._record_live_usage(warm, heard.session.bill(), warm.conversation_id)
        log.info("whatsapp %s: GPT-Live reply of %d ms audio, %d chars in %.0f ms", log_id,
                 reply.audio_ms, len(reply.text), (time.monotonic() - started) * 1000)  # fmt: skip
        return reply

    async def _live_rounds(
        self, warm: _Warm, turn: TurnInput, collector: ReplyCollector, log_id: str
    ) -> None:
        """Collect the spoken reply; a function the backend calls on the way is run and its
        output sent back (the backend then answers, and the voice speaks that)."""
        heard, dialect = warm.live, warm.dialect
        assert heard is not None and dialect is not None
        calls, owed = DelegatedCalls(), []

        def on_event(event: dict[str, Any]) -> None:
            owed.extend(calls.on_event(event))
            collector.on_event(event)

        def settled() -> bool:  # the reply is whole, or the backend waits for outputs
            return _whole(collector) or calls.runnable

        while True:
            await collect_live(heard, dialect, on_event, settled)
            if not calls.runnable:
                return
            ctx = self._tool_context(warm, turn, collector, log_id)
            for call in calls.take():
                outcome = await self.tools.run(call, ctx)
                owed.extend(calls.flow.finished(call.call_id, outcome.output))
            for event in owed:
                for each in dialect.outbound(event):
                    await heard.session.send(each)
            owed.clear()

    async def _record_live_usage(
        self, warm: _Warm, seconds: float, conversation_id: int | None
    ) -> None:
        """GPT-Live bills seconds of session: what it reported since the last turn."""
        if warm.forgotten or seconds <= 0:
            return
        await _keep_usage(self.rt, warm.person.id, conversation_id, None, "GPT-Live",
                          session_seconds=seconds, model=self.rt.settings.live_model)  # fmt: skip

    async def _live_context(self, warm: _Warm, turn: TurnInput) -> list[dict[str, Any]]:
        """News from other channels, the channel when it changed (a voice note after text),
        and a greeting when due, as silent context: Live's instructions are fixed at start,
        and an appended instruction would be answered."""
        news, warm.mark = await news_since(
            self.rt.store, self.rt.persona, warm.person.id, warm.mark, warm.conversation_id
        )
        assert warm.dialect is not None
        contexts = [] if news is None else warm.dialect.outbound(news)
        channel = channel_of(turn)
        if channel != warm.channel:
            contexts.append(silent_context(channel_section(self.rt.persona, channel)))
            warm.channel = channel
        if warm.responses == 0 and _should_greet(warm.memory):
            greeting = greeting_instruction(self.rt.persona, channel_of(turn), warm.memory)
            contexts.append(silent_context(greeting))
        return contexts

    async def _tool_rounds(
        self,
        warm: _Warm,
        session: RealtimeSession,
        collector: ReplyCollector,
        turn: TurnInput,
        log_id: str,
    ) -> ReplyCollector:
        """The model called tools: carry them out, hand back their outputs, and collect the
        reply that follows (its audio joins the same voice note, its words the same text)."""
        flow, spoken = collector.tools, [collector.reply_text]
        for _ in range(MAX_ROUNDS):
            if flow is None or not collector.tool_calls:
                break
            ctx = self._tool_context(warm, turn, collector, log_id)
            for call in collector.tool_calls:
                outcome = await self.tools.run(call, ctx)
                for event in flow.finished(call.call_id, outcome.output):
                    await session.send(event)
            await self._record_usage(warm, collector, 0)
            collector = collector.next_response()
            await collect(session, collector)
            spoken.append(collector.reply_text)
        collector.transcript = " ".join(t for t in spoken if t)
        return collector

    def _tool_context(
        self, warm: _Warm, turn: TurnInput, collector: ReplyCollector, log_id: str
    ) -> ToolContext:
        recent = [(t.role, t.text) for t in (warm.memory.turns if warm.memory else [])]
        said = turn.text if isinstance(turn, TextInput) else collector.user_transcript
        if said:
            recent.append(("user", said))
        return ToolContext(
            surface="whatsapp",
            person=warm.person,
            conversation_id=warm.conversation_id,
            log_id=f"whatsapp {log_id}",
            our_number=(warm.our_number or "").removeprefix("whatsapp:") or None,
            recent=recent,
        )

    async def _catch_up(self, warm: _Warm, session: RealtimeSession) -> None:
        """A call (or anything else) since the session opened: the model hears of it first."""
        news, warm.mark = await news_since(
            self.rt.store, self.rt.persona, warm.person.id, warm.mark, warm.conversation_id
        )
        if news is not None:
            await session.send(news)

    def _response_params(self, warm: _Warm, turn: TurnInput) -> dict[str, Any]:
        """Audio out (with its transcript); the channel's instructions when they differ."""
        modality = "text" if self.rt.elevenlabs is not None else "audio"
        params: dict[str, Any] = {"output_modalities": [modality]}
        channel, persona = channel_of(turn), self.rt.persona
        greet = warm.responses == 0 and _should_greet(warm.memory)
        if channel != warm.channel or greet:
            instructions = instructions_for(persona, channel, warm.memory)
            if greet:
                greeting = greeting_instruction(persona, channel, warm.memory)
                instructions = f"{instructions}\n\n{greeting}"
            params["instructions"] = instructions
        return params

    def _reply(
        self,
        warm: _Warm,
        turn: TurnInput,
        collector: ReplyCollector,
        notes: list[bytes],
        audio_ms: int,
    ) -> VoiceReply:
        text = collector.reply_text
        if not notes and not text:
            raise TurnFailed(f"empty reply (status {collector.status})")
        for note in notes:
            if len(note) > VOICE_NOTE_LIMIT_BYTES:
                log.warning("voice note of %d bytes will not show as playable", len(note))
        is_text = isinstance(turn, TextInput)
        return VoiceReply(
            text=text,
            notes=notes,
            audio_ms=audio_ms,
            user_text=turn.text if is_text else collector.user_transcript,
            user_audio_ms=None if is_text else turn.duration_ms,
            conversation_id=warm.conversation_id,
            response_id=collector.response_id,
        )

    async def _record_usage(self, warm: _Warm, collector: ReplyCollector, audio_ms: int) -> None:
        if warm.forgotten:
            return
        rid = collector.response_id
        await _keep_usage(self.rt, warm.person.id, warm.conversation_id, rid, f"response {rid}",
                          **token_counts(collector.usage or {}), audio_seconds=audio_ms / 1000,
                          model=self.rt.settings.realtime_model)  # fmt: skip

    # lifecycle
    def _arm_idle(self, warm: _Warm) -> None:
        if warm.users:
            return
        if warm.session is None:  # failed and closed: nothing to keep warm
            if self._warm.get(warm.person.id) is warm:
                del self._warm[warm.person.id]
            return
        loop = asyncio.get_running_loop()
        warm.idle_timer = loop.call_later(self.idle_s, self._expire, warm)

    def _expire(self, warm: _Warm) -> None:
        if warm.users:
            return
        if self._warm.get(warm.person.id) is warm:
            del self._warm[warm.person.id]
        task = asyncio.ensure_future(self._close(warm))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, warm: _Warm) -> None:
        """Close the session and end its conversation (the summarizer picks it up)."""
        if warm.idle_timer is not None:
            warm.idle_timer.cancel()
            warm.idle_timer = None
        session, warm.session = warm.session, None
        conversation_id, warm.conversation_id = warm.conversation_id, None
        if session is not None:
            await session.close()
            if isinstance(session, LiveSession):  # its final usage came with session.closed
                await self._record_live_usage(warm, session.bill(), conversation_id)
        if conversation_id is not None:
            with contextlib.suppress(Exception):  # the store may already be closing
                await self.rt.store.end_conversation(conversation_id)


def _whole(collector: ReplyCollector) -> bool:
    return collector.finished and collector.user_transcript_settled


def _should_greet(memory: MemoryContext | None) -> bool:
    if memory is None or not memory.turns:
        return True
    last = max(turn.at for turn in memory.turns)
    now = datetime.now(last.tzinfo) if last.tzinfo else datetime.now()
    return now - last > GREET_AFTER


async def send_input(session: RealtimeSession, turn: TurnInput) -> None:
    """A message as the model hears it: a user text item, or the voice note committed."""
    if isinstance(turn, TextInput):
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": turn.text}],
        }
        await session.send({"type": "conversation.item.create", "item": item})
        return
    pcm = turn.pcm
    if len(pcm) < MIN_COMMIT_BYTES:
        pcm += bytes(MIN_COMMIT_BYTES - len(pcm))  # silence, so the commit is accepted
    for start in range(0, len(pcm), APPEND_BYTES):
        chunk = base64.b64encode(pcm[start : start + APPEND_BYTES]).decode()
        await session.send({"type": "input_audio_buffer.append", "audio": chunk})
    await session.send({"type": "input_audio_buffer.commit"})


async def collect(session: RealtimeSession, collector: ReplyCollector) -> None:
    """One response's events into `collector`, bounded; TurnFailed if it failed."""
    async with asyncio.timeout(TURN_TIMEOUT_S):
        while not collector.finished:
            collector.on_event(await session.recv())
    if collector.error is not None:
        raise TurnFailed(collector.error)
    # The reply is whole; the voice note's transcript may still be on its way.
    with contextlib.suppress(TimeoutError, UpstreamClosed):
        async with asyncio.timeout(TRANSCRIPT_GRACE_S):
            while not collector.user_transcript_settled:
                collector.on_event(await session.recv())


async def read_aloud(
    rt: Runtime, person: Person | None, text: str, instruction: str
) -> list[bytes]:
    """`text` in the clone's voice, as voice notes."""
    notes, _ = await speak(rt, person, text, instruction)
    return notes


async def speak(
    rt: Runtime, person: Person | None, text: str, instruction: str
) -> tuple[list[bytes], int]:
    """`text` as voice notes and their length in ms: Endrigo's ElevenLabs voice when chosen,
    else (or when ElevenLabs fails) the Realtime voice."""
    if rt.elevenlabs is not None:
        encoder = BackgroundEncoder()
        try:
            spoken = await rt.elevenlabs.speak_pcm24k(text, encoder.push)
            notes = await encoder.finish()
        except VoiceUnavailable as err:
            encoder.cancel()
            log.warning("ElevenLabs could not speak a reply (%s): the Realtime voice reads it", err)
            ERRORS.labels("elevenlabs").inc()
        except BaseException:
            encoder.cancel()
            raise
        else:
            await _record_voice_usage(rt, person, spoken.characters, encoder.duration_ms)
            return notes, encoder.duration_ms
    return await _realtime_reads(rt, person, text, instruction)


async def _record_voice_usage(
    rt: Runtime, person: Person | None, characters: int, audio_ms: int
) -> None:
    """ElevenLabs bills characters: a usage row of its model (None: the persona's own fixed
    messages, spoken once for everyone, only logged)."""
    if person is None:
        log.info("ElevenLabs spoke %d characters for everyone", characters)
        return
    model = rt.settings.elevenlabs_model
    await _keep_usage(rt, person.id, None, None, "ElevenLabs", characters=characters,
                      audio_seconds=audio_ms / 1000, model=model)  # fmt: skip


async def _keep_usage(
    rt: Runtime,
    person_id: int,
    conversation_id: int | None,
    response_id: str | None,
    what: str,
    **row: Any,
) -> None:
    """One usage row; accounting must never cost the person their reply, so an erased
    person's row or a failed write is logged, not raised."""
    try:
        await rt.store.add_usage(person_id, conversation_id, response_id, **row)
    except Erased:
        log.info("usage of %s not kept: the person was erased", what)
    except Exception:
        log.exception("could not record usage of %s", what)


async def _realtime_reads(
    rt: Runtime, person: Person | None, text: str, instruction: str
) -> tuple[list[bytes], int]:
    """A short session of its own that only reads (no memory, no conversation, no tools),
    closed at once; its cost is the person's (None: the persona's own fixed messages, read
    once for everyone, and only logged)."""
    settings = rt.settings
    session = await RealtimeSession.open(
        rt.openai,
        settings.realtime_model,
        voice_note_session(settings, rt.voice, instruction),
        LinkPolicy.from_settings(settings),
    )
    encoder = BackgroundEncoder()
    try:
        await send_input(session, TextInput(text))
        await session.send(
            {"type": "response.create", "response": {"output_modalities": ["audio"]}}
        )
        collector = ReplyCollector(encoder.push, wants_user_transcript=False)
        await collect(session, collector)
        notes = await encoder.finish()
    except BaseException:
        encoder.cancel()
        raise
    finally:
        await session.close()
    if person is None:
        log.info("read aloud for everyone: %s", token_counts(collector.usage or {}))
        return notes, encoder.duration_ms
    with contextlib.suppress(Erased):
        await rt.store.add_usage(
            person.id,
            None,
            collector.response_id,
            **token_counts(collector.usage or {}),
            audio_seconds=encoder.duration_ms / 1000,
            model=settings.realtime_model,
        )
    return notes, encoder.duration_ms
