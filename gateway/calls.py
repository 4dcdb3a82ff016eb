"""Phone calls: POST /webhook/voice and GET /media-stream.

The handlers only move messages between Twilio's socket, the Realtime session and
`CallState`, which decides everything. The Realtime session is opened when Twilio asks
for TwiML, so persona, memory and even the greeting are ready when the stream starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from twilio.twiml.voice_response import Connect, VoiceResponse

from gateway.bridge import (
    LinkPolicy,
    NotJson,
    RealtimeSession,
    UpstreamClosed,
    call_session,
    pump,
)
from gateway.call_state import (
    Action,
    ActOnCall,
    CallState,
    CloseUpstream,
    EndCall,
    OpenUpstream,
    Phase,
    ProtocolError,
    RecordTurn,
    RecordUsage,
    RunTool,
    SendRealtime,
    SendRealtimeRaw,
    SendTwilio,
    Upstream,
    UpstreamError,
)
from gateway.call_voice import CallVoice
from gateway.live_dialect import APPEND_HEAD as LIVE_APPEND_HEAD
from gateway.live_dialect import LiveDialect, greeting_event
from gateway.live_session import CALL_FORMAT, LiveSession, live_session
from gateway.memory import instructions_for, load_memory_marked, news_since, with_transcript
from gateway.observability import (
    ACTIVE_CALLS,
    CALLS,
    ERRORS,
    GREETING,
    RECONNECTS,
    RESPONSE_LATENCY,
    TURNS,
    UPSTREAM_FIRST_AUDIO,
    FrameTimer,
    correlated,
)
from gateway.persona import MemoryContext, greeting_instruction
from gateway.phones import normalize_number
from gateway.privacy import note_erasure_request
from gateway.runtime import RUNTIME, Runtime
from gateway.store import Erased, Person
from gateway.tool_flow import AfterPlayback
from gateway.tool_runner import ToolContext, ToolRunner
from gateway.tools import ToolCall
from gateway.twilio_api import signature_refused
from gateway.twilio_fields import BadFields, check_voice_call
from gateway.usage import token_counts

log = logging.getLogger(__name__)

# Twilio sends `connected` and `start` at once; a silent socket is not Twilio.
START_TIMEOUT_S = 10.0
OUTPUT_AUDIO = ("response.output_audio.delta", "session.output_audio.delta")  # timed per frame
TICK_S = 0.5  # the core's clock when no message arrives (stall watchdog, end deadline)
PHONE_CLOSE_TIMEOUT_S = 1.0  # Twilio answers a close at once; a dead peer is cut after this
ENDED_CALLS_KEPT = 10_000  # CallSids remembered against replays (about 1 MB)
LOGGED_PROTOCOL_ERRORS = 5  # per call; the rest are counted in /metrics only


@dataclass(frozen=True)
class LiveCallView:
    """A live call as an operator may see it, copied out so readers never touch the call.
    The number is whole: whoever shows it masks it."""

    call_sid: str
    e164: str | None
    name: str | None
    duration_s: float | None  # since the media stream started; None before
    turns: int
    last_latency_ms: float | None
    greeting_ms: float | None
    reconnects: int


class LiveCall:
    """One call: its Realtime sessions, its core state and, once connected, Twilio's socket.

    Carries out what `CallState` decides; every task it starts is kept, and every way it can
    fail goes back into the core as an event (lost upstream, lost phone), never a dead task.
    """

    def __init__(
        self,
        rt: Runtime,
        call_sid: str,
        person: Person | None,
        conversation_id: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rt = rt
        self.call_sid = call_sid
        self.person = person
        self.conversation_id = conversation_id
        self.clock = clock
        self.called: str | None = None  # our number the caller dialled (E.164)
        self.tools = ToolRunner(rt)
        self.policy = LinkPolicy.from_settings(rt.settings)
        self.state = CallState(policy=self.policy)
        self.state.call_sid = call_sid
        self.memory = MemoryContext(None, None, None, [], True)
        self.session: RealtimeSession | None = None
        self.ws: web.WebSocketResponse | None = None
        self.finished = asyncio.Event()  # the core reached ENDED and the upstream is closed
        self.log_id = f"call {call_sid}"
        self.protocol_errors = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes: set[asyncio.Task[Any]] = set()  # store writes in flight
        self._opening: asyncio.Task[None] | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._greeting_observed = False
        self._memory_loaded = False
        self._mark = 0  # the newest turn id the call's memory covers
        self._catching_up = asyncio.Lock()
        self._inbound_timer = FrameTimer("inbound")
        self._outbound_timer = FrameTimer("outbound")
        self.voice = self._elevenlabs_voice()
        # GPT-Live (VOICE_BACKEND=live): its events translated for the core, both ways.
        self.dialect = LiveDialect() if rt.settings.voice_backend == "live" else None
        if self.dialect is not None:
            self.state.append_head = LIVE_APPEND_HEAD

    def _elevenlabs_voice(self) -> CallVoice | None:
        """Endrigo's ElevenLabs voice, when chosen: the session then answers in text."""
        voice = self.rt.elevenlabs
        if voice is None:
            return None
        return CallVoice(
            voice.open_stream,
            feed=lambda event: self.perform(self.state.on_realtime(event, self.clock())),
            send=self._send_upstream,
            read_aloud=self.rt.persona.tools["results"]["read_aloud"],
            log_id=self.log_id,
            bill=self._record_voice_usage,
        )

    @property
    def reconnects(self) -> int:
        return self.state.reconnects

    def view(self) -> LiveCallView:
        state, started = self.state, self.state.started_at
        latencies = [
            t.response_latency_ms for t in state.turns if t.response_latency_ms is not None
        ]
        return LiveCallView(
            call_sid=self.call_sid,
            e164=self.person.e164 if self.person else None,
            name=self.person.name if self.person else None,
            duration_s=self.clock() - started if started is not None else None,
            turns=len(state.turns),
            last_latency_ms=latencies[-1] if latencies else None,
            greeting_ms=state.greeting_ms,
            reconnects=self.reconnects,
        )

    # upstream
    def open_upstream(self) -> None:
        self._arm_tick()
        self._open_later(OpenUpstream(0.0, "call answered"))

    def _open_later(self, action: OpenUpstream) -> None:
        self._opening = self._spawn(self._open(action))

    async def _open(self, action: OpenUpstream) -> None:
        if action.delay_s > 0:
            await asyncio.sleep(action.delay_s)
        if self.state.phase is Phase.ENDED:
            return
        first = self.state.upstream is Upstream.OPENING
        try:
            if not self._memory_loaded and self.person is not None:
                self.memory, self._mark = await load_memory_marked(self.rt.store, self.person)
                self._memory_loaded = True
            instructions = self._instructions()
            session = await self._open_session(instructions)
        except Exception as err:
            log.warning(
                "%s: could not open a Realtime session (%s): %s: %s",
                self.log_id, action.reason, type(err).__name__, err,
            )  # fmt: skip
            ERRORS.labels("session_open_failed").inc()
            await self.perform(self.state.upstream_open_failed(self.clock(), str(err)))
            return
        old, self.session = self.session, session
        if self.dialect is not None:
            self.dialect.session_replaced()
        greeting = self._greeting(instructions) if self.state.greeting_due else None
        await self.perform(self.state.upstream_opened(self.clock(), greeting))
        if old is not None and old is not session:
            self._spawn(self._close_session(old))  # rotated out, or dead: bounded either way
        if not first:
            log.info("%s: Realtime session replaced (%s)", self.log_id, action.reason)
            if action.replace:
                RECONNECTS.inc()
        if self.session is session and not session.closed:
            self._spawn(self._pump(session))

    async def _open_session(self, instructions: str) -> RealtimeSession:
        settings, tools = self.rt.settings, self.tools.definitions("call", self.person)
        if self.dialect is not None:
            live = live_session(settings, self.rt.voice, instructions, CALL_FORMAT, tools)
            return await LiveSession.start(self.rt.openai, live, self.policy)
        config = call_session(settings, self.rt.voice, instructions, tools)
        if self.voice is not None:
            config["output_modalities"] = ["text"]  # ElevenLabs speaks it
        return await RealtimeSession.open(
            self.rt.openai, settings.realtime_model, config, self.policy
        )

    def _instructions(self) -> str:
        memory = with_transcript(self.memory, self.state.transcript, "call")
        return instructions_for(self.rt.persona, "call", memory)

    def _greeting(self, instructions: str) -> dict[str, Any]:
        greeting = greeting_instruction(self.rt.persona, "call", self.memory)
        if self.dialect is not None:
            return greeting_event(greeting)
        return {
            "type": "response.create",
            "response": {
                "instructions": f"{instructions}\n\n{greeting}",
                # Names the call in OpenAI's records of the session, for support.
                "metadata": {"call_sid": self.call_sid},
            },
        }

    async def _pump(self, session: RealtimeSession) -> None:
        async def on_event(event: Any) -> None:
            if self.session is session:  # a rotated-out session's stragglers are ignored
                await self._on_upstream_event(event)

        reason = await pump(session, on_event, self.log_id)
        if self.voice is not None and self.session is session:
            self.voice.upstream_gone()
        if self.session is session and self.state.phase is not Phase.ENDED:
            log.warning("%s: %s", self.log_id, reason)
            await self.perform(self.state.upstream_lost(self.clock(), reason))

    async def _on_upstream_event(self, event: Any) -> None:
        timed = (
            isinstance(event, dict)
            and event.get("type") in OUTPUT_AUDIO
            and self._outbound_timer.due()
        )
        started = time.perf_counter() if timed else 0.0
        if self.dialect is not None:
            now = self.clock()
            for each in self.dialect.inbound(event, now, self.state.appended_ms):
                await self.perform(self.state.on_realtime(each, now))
        elif self.voice is None:
            await self.perform(self.state.on_realtime(event, self.clock()))
        else:
            for each in await self.voice.on_realtime(event):
                await self.perform(self.state.on_realtime(each, self.clock()))
            for each in self.voice.barge_in_done():
                await self._send_upstream(each)
        if timed:
            self._outbound_timer.observe_since(started)

    # twilio
    async def on_twilio(self, message: Any) -> None:
        if self.dialect is not None:  # Twilio's 50 frames a second are the dialect's clock
            await self._live_tick()
        if self._inbound_timer.due():
            started = time.perf_counter()
            await self.perform(self.state.on_twilio(message, self.clock()))
            self._inbound_timer.observe_since(started)
        else:
            await self.perform(self.state.on_twilio(message, self.clock()))

    async def _live_tick(self) -> None:
        assert self.dialect is not None
        now = self.clock()
        for event in self.dialect.tick(now):
            await self.perform(self.state.on_realtime(event, now))

    async def perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendRealtimeRaw):  # first: 50 a second per call
                await self._audio_to_realtime(action.data)
            elif isinstance(action, SendTwilio):
                await self._to_twilio(action.message)
            elif isinstance(action, SendRealtime):
                await self._to_realtime(action.event)
            elif isinstance(action, RecordTurn):
                self._record_turn(action)
            elif isinstance(action, RecordUsage):
                self._record_usage(action)
            elif isinstance(action, ProtocolError):
                self._protocol_error(action)
            elif isinstance(action, UpstreamError):
                ERRORS.labels("upstream_error").inc()
                log.warning("%s: upstream error %s: %s", self.log_id, action.code, action.message)
            elif isinstance(action, OpenUpstream):
                self._open_later(action)
            elif isinstance(action, EndCall):
                log.info("%s: ending (%s)", self.log_id, action.reason)
                self._spawn(self._close_phone())
            elif isinstance(action, CloseUpstream):
                self._close_upstream()
            elif isinstance(action, RunTool):
                self._spawn(self._run_tool(action.call))
            elif isinstance(action, ActOnCall):
                self._spawn(self._act_on_call(action.after))
        if not self._greeting_observed and self.state.greeting_ms is not None:
            self._greeting_observed = True
            GREETING.observe(self.state.greeting_ms / 1000)
            if self.conversation_id is not None:
                ms, conversation = self.state.greeting_ms, self.conversation_id
                self._write(self.rt.store.set_greeting_latency(conversation, ms))

    def _protocol_error(self, error: ProtocolError) -> None:
        ERRORS.labels(f"{error.source}_protocol").inc()
        self.protocol_errors += 1
        if self.protocol_errors <= LOGGED_PROTOCOL_ERRORS:
            log.warning("%s: unusable %s message: %s", self.log_id, error.source, error.detail)

    async def _to_twilio(self, message: dict[str, Any]) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        try:
            await ws.send_str(orjson.dumps(message).decode())
        except (ConnectionError, RuntimeError) as err:  # the phone's TCP is gone
            log.info("%s: phone socket lost while sending: %s", self.log_id, err)
            await self.perform(self.state.end(self.clock(), "phone socket lost"))

    async def _to_realtime(self, event: dict[str, Any]) -> None:
        if self.dialect is not None:
            for each in self.dialect.outbound(event):
                await self._send_upstream(each)
            return
        for each in [event] if self.voice is None else self.voice.outgoing(event):
            await self._send_upstream(each)

    async def _send_upstream(self, event: dict[str, Any]) -> None:
        session = self.session
        if session is None or self.state.upstream is not Upstream.LIVE:
            return
        # On a close the pump sees the same error and reconnects; this event is lost.
        with contextlib.suppress(UpstreamClosed):
            await session.send(event)

    async def _audio_to_realtime(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        try:  # noqa: SIM105 - a try is free per frame; suppress() is a context manager call
            await session.send_bytes(data)
        except UpstreamClosed:
            pass  # the pump sees the same close and reconnects; this frame is lost

    async def _close_phone(self) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        try:
            async with asyncio.timeout(PHONE_CLOSE_TIMEOUT_S):
                await ws.close()
        except TimeoutError:
            log.info("%s: the phone did not answer our close; socket cut", self.log_id)
        except (ConnectionError, RuntimeError) as err:
            log.debug("%s: closing the phone socket: %s", self.log_id, err)

    def _close_upstream(self) -> None:
        """The core is done with the upstream: close it, stop any open in flight, and finish."""
        if self._opening is not None and self._opening is not asyncio.current_task():
            self._opening.cancel()  # an open that completes now would bill a greeting
        if self.session is not None:
            self._spawn(self._close_session(self.session))
        if self.finished.is_set():
            return  # a session that opened after the end: closed above, nothing else to do
        if self._ticker is not None:
            self._ticker.cancel()
        if self.conversation_id is not None and self.rt.store is not None:
            self._write(self._finish_conversation(self.conversation_id))
        self.finished.set()

    # store
    def _record_turn(self, turn: RecordTurn) -> None:
        TURNS.labels("call", turn.role).inc()
        if turn.role == "user" and self.person is not None:
            self._write(note_erasure_request(self.rt.store, self.person, "call", turn.text))
        if turn.response_latency_ms is not None:
            RESPONSE_LATENCY.observe(turn.response_latency_ms / 1000)
        if turn.upstream_first_audio_ms is not None:
            UPSTREAM_FIRST_AUDIO.observe(turn.upstream_first_audio_ms / 1000)
        if self.conversation_id is None or self.rt.store is None:
            return
        self._write(
            self.rt.store.add_turn(
                self.conversation_id,
                turn.role,
                turn.text,
                audio_ms=turn.audio_ms,
                response_latency_ms=turn.response_latency_ms,
                upstream_first_audio_ms=turn.upstream_first_audio_ms,
            )
        )

    def _record_usage(self, usage: RecordUsage) -> None:
        if self.person is None or self.rt.store is None:
            return
        self._write(
            self.rt.store.add_usage(
                self.person.id,
                self.conversation_id,
                usage.response_id,
                **token_counts(usage.usage),
                audio_seconds=usage.audio_ms / 1000,
                model=self.rt.settings.realtime_model,
            )
        )

    def _record_voice_usage(self, characters: int, audio_ms: float) -> None:
        """ElevenLabs bills the characters it was sent: a row of its model per reply."""
        self._record_billed(self.rt.settings.elevenlabs_model, characters=characters,
                            audio_seconds=audio_ms / 1000)  # fmt: skip

    async def _close_session(self, session: RealtimeSession) -> None:
        await session.close()
        if isinstance(session, LiveSession):  # its final usage came with session.closed
            seconds = session.bill()
            if seconds > 0:  # GPT-Live bills seconds of session
                self._record_billed(self.rt.settings.live_model, session_seconds=seconds)

    def _record_billed(self, model: str, **amounts: float) -> None:
        """A usage row of `model` that no response id names (voice characters, seconds)."""
        if self.person is None or self.rt.store is None:
            return
        self._write(
            self.rt.store.add_usage(
                self.person.id,
                self.conversation_id,
                None,
                model=model,
                **amounts,
            )
        )

    # lifecycle
    def _arm_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        if self.state.phase is Phase.ENDED:
            return
        actions = self.state.tick(self.clock())
        if self.dialect is not None:  # no phone frames (not connected yet, or gone)
            self._spawn(self._live_tick())
        if actions:
            self._spawn(self.perform(actions))
        self._arm_tick()

    async def end(self, reason: str) -> None:
        """End the call (idempotent) and wait, bounded, until the core has finished: the
        phone closed first, the caller's last words in, the upstream closed."""
        await self.perform(self.state.end(self.clock(), reason))
        bound = self.state.transcript_grace_s + 2 * TICK_S
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await self.finished.wait()
        if not self.finished.is_set():  # the ticker should have done this; never wait longer
            await self.perform(self.state.tick(self.clock() + bound))

    async def _finish_conversation(self, conversation_id: int) -> None:
        await self.rt.store.end_conversation(conversation_id)
        if self.rt.summarizer is not None:
            self.rt.summarizer.poke()  # fold this call into the person's summary now

    def catch_up(self) -> None:
        """The caller wrote on WhatsApp meanwhile: the live session hears of it at once."""
        if self.person is not None and self._memory_loaded:
            self._write(self._catch_up(self.person.id))

    async def _catch_up(self, person_id: int) -> None:
        async with self._catching_up:  # two at once would both tell the same news
            news, self._mark = await news_since(
                self.rt.store, self.rt.persona, person_id, self._mark, self.conversation_id
            )
        if news is not None:
            await self._to_realtime(news)

    async def forget(self) -> None:
        """Erasure of the caller: the call goes on, without their memory and without writing
        another row; writes already in flight land first (the erasure then removes them).

        Going on rather than hanging up: the caller is mid-sentence, often the very person who
        asked for the erasure on this call, and the live session holds only this call."""
        self.person, self.conversation_id = None, None
        self.memory = MemoryContext(None, None, None, [], True)
        self._memory_loaded = True  # a reconnect must not load it again
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _write(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._writes.add(self._spawn(coro))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._writes.discard(task)
        if not task.cancelled() and isinstance(task.exception(), Erased):
            log.info("%s: a write after the caller's erasure was refused", self.log_id)
        elif not task.cancelled() and (err := task.exception()) is not None:
            ERRORS.labels("call_task_failed").inc()
            log.error("%s: background work failed: %s: %s", self.log_id, type(err).__name__, err)

    async def drain(self) -> None:
        """Wait for pending store writes and tools (shutdown and tests)."""
        while pending := [t for t in self._tasks if t is not asyncio.current_task()]:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.tools.close()
        if self.voice is not None:
            await self.voice.close()

    # tools
    async def _run_tool(self, call: ToolCall) -> None:
        ctx = ToolContext(
            surface="call",
            person=self.person,
            conversation_id=self.conversation_id,
            log_id=self.log_id,
            our_number=self.called,
            recent=list(self.state.transcript),
        )
        outcome = await self.tools.run(call, ctx)
        await self.perform(
            self.state.tool_finished(call.call_id, outcome.output, self.clock(), outcome.after)
        )

    async def _act_on_call(self, after: AfterPlayback) -> None:
        """The model's last sentence has played: Twilio moves the call on (REST), which ends
        this stream with a `stop`."""
        calls = self.rt.twilio.calls(self.call_sid)
        try:
            if after.kind == "transfer":
                response = VoiceResponse()
                response.dial(after.number)
                await calls.update_async(twiml=str(response))
            else:
                await calls.update_async(status="completed")
        except Exception as err:
            ERRORS.labels("call_update_failed").inc()
            log.error(
                "%s: Twilio did not take the %s: %s: %s",
                self.log_id, after.kind, type(err).__name__, err,
            )  # fmt: skip
            return
        log.info("%s: %s asked of Twilio", self.log_id, after.kind)


class CallRegistry:
    """Calls by CallSid: parked ones (pre-opened, waiting for their media stream, each with a
    one-time token) and live ones, and the caps that bound both.

    Every decision here is synchronous: the webhook checks and parks with no await between,
    so calls arriving at once cannot all pass the same check.
    """

    def __init__(
        self, claim_timeout_s: float, max_live_calls: int = 100, max_parked_calls: int = 50
    ) -> None:
        self.claim_timeout_s = claim_timeout_s
        self.max_live_calls = max_live_calls
        self.max_parked_calls = max_parked_calls
        self._waiting: dict[str, tuple[str, LiveCall]] = {}  # CallSid -> (token, call)
        self.live: dict[str, LiveCall] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # recent CallSids, oldest first

    @property
    def parked_count(self) -> int:
        return len(self._waiting)

    @property
    def live_count(self) -> int:
        return len(self.live)

    def capacity_problem(self) -> str | None:
        """Why one more call cannot be answered now, or None.

        A parked call is live within seconds, so it counts against the live cap too: calls
        arriving together cannot take the gateway past MAX_LIVE_CALLS."""
        live, parked = self.live_count, self.parked_count
        if live + parked >= self.max_live_calls:
            return f"{live} live and {parked} parked calls, live cap {self.max_live_calls}"
        if parked >= self.max_parked_calls:
            return f"{parked} parked calls, cap {self.max_parked_calls}"
        return None

    def snapshot(self) -> list[LiveCallView]:
        """The live calls (media stream claimed) as they are now."""
        return [call.view() for call in self.live.values()]

    def known(self, call_sid: str) -> bool:
        """Live, or ended lately: a webhook for it now is a replay (Twilio never reuses one)."""
        return call_sid in self.live or call_sid in self._ended

    def ended(self, call: LiveCall) -> None:
        """The call is over: it leaves the live calls and is remembered for replays."""
        if self.live.get(call.call_sid) is call:
            del self.live[call.call_sid]
        self._ended[call.call_sid] = None
        while len(self._ended) > ENDED_CALLS_KEPT:
            self._ended.popitem(last=False)

    def parked_token(self, call_sid: str) -> str | None:
        entry = self._waiting.get(call_sid)
        return entry[0] if entry is not None else None

    def _calls_of(self, person_id: int) -> list[LiveCall]:
        calls = [*(call for _, call in self._waiting.values()), *self.live.values()]
        return [c for c in calls if c.person is not None and c.person.id == person_id]

    async def forget(self, person_id: int) -> None:
        """Erasure: every call of this person, parked or live, lets go of them."""
        await asyncio.gather(*(call.forget() for call in self._calls_of(person_id)))

    def changed(self, person_id: int) -> None:
        for call in self._calls_of(person_id):
            call.catch_up()

    def park(self, call: LiveCall) -> str:
        token = secrets.token_urlsafe(24)
        self._waiting[call.call_sid] = (token, call)
        asyncio.get_running_loop().call_later(
            self.claim_timeout_s, self._expire, call.call_sid, token
        )
        return token

    def unpark(self, call: LiveCall) -> None:
        """The call could not be answered after all: its slot is free again."""
        entry = self._waiting.get(call.call_sid)
        if entry is not None and entry[1] is call:
            del self._waiting[call.call_sid]

    def claim(self, token: str, call_sid: str | None) -> LiveCall | None:
        """The one call this token was made for; a token works once, for its own CallSid."""
        entry = self._waiting.get(call_sid) if call_sid is not None else None
        if entry is None or entry[0] != token:
            return None
        call = entry[1]
        del self._waiting[call.call_sid]
        self.live[call.call_sid] = call
        return call

    def _expire(self, call_sid: str, token: str) -> None:
        entry = self._waiting.get(call_sid)
        if entry is None or entry[0] != token:
            return  # claimed, or a later call with the same CallSid parked since
        del self._waiting[call_sid]
        call = entry[1]
        self.ended(call)
        log.warning("%s: media stream never came; closing its session", call.log_id)
        call._spawn(call.end("media stream never came"))

    async def close_all(self) -> None:
        """Shutdown: every call ends at once (phones closed first, so Twilio's <Say> runs),
        each bounded, so the slowest call bounds the wait, not their sum."""
        calls = [*(call for _, call in self._waiting.values()), *self.live.values()]
        self._waiting.clear()
        await asyncio.gather(*(call.end("gateway shutting down") for call in calls))
        await asyncio.gather(*(call.drain() for call in calls))


REGISTRY = web.AppKey("calls", CallRegistry)


async def voice_webhook(request: web.Request) -> web.Response:
    """Twilio asks what to do with a ringing call. Everything that costs nothing comes first:
    signature, field formats, a repeat of a call we hold, the caps; then the store and the
    Realtime session."""
    rt = request.app[RUNTIME]
    if not await rt.signatures.form_ok(request):
        return signature_refused(request, "voice")
    form = await request.post()
    try:
        call_sid = check_voice_call(form, rt.twilio_account_sid)
    except BadFields as err:
        return _bad_fields(err)
    caller, called = str(form.get("From", "")), _number_or_none(str(form.get("To", "")))
    registry = request.app[REGISTRY]
    with correlated(f"call={call_sid}"):  # inherited by the call's upstream task
        if registry.known(call_sid):
            return _repeat_of_known_call()
        if (token := registry.parked_token(call_sid)) is not None:
            # Twilio retrying a webhook whose answer it lost: the same stream, the same
            # token, so the one parked session is claimed once, by whichever answer is used.
            log.info("call asked for again while parked: same stream")
            return _xml(_twiml(rt, caller, called, call_sid, token))
        if (problem := registry.capacity_problem()) is not None:
            return _at_capacity(rt, problem)
        call = LiveCall(rt, call_sid, None, None)
        call.called = called
        token = registry.park(call)  # before any await: a repeat now finds it parked
        if not await _answer(rt, registry, call, caller):
            return _say_and_hang_up(rt, "over_budget_say")
    return _xml(_twiml(rt, caller, called, call_sid, token))


async def _answer(rt: Runtime, registry: CallRegistry, call: LiveCall, caller: str) -> bool:
    """The parked call's person and conversation, then its Realtime session; False (and
    nothing opened or written) when the caller's daily budget is spent."""
    try:
        person = await _person(rt, caller, call.call_sid)
        if person is not None and await rt.limits.over_budget(rt, person, "call"):
            registry.unpark(call)
            log.warning("call refused: the caller's daily budget is spent")
            return False
        call.person = person
        if person is not None:
            call.conversation_id = await rt.store.start_conversation(
                person.id, "call", call.call_sid
            )
    except BaseException:
        registry.unpark(call)
        call._spawn(call.end("could not be answered"))  # a stream that claimed it is closed
        raise
    CALLS.inc()
    if call.finished.is_set():  # expired while the store was slow: end its conversation
        if call.conversation_id is not None:
            call._write(call._finish_conversation(call.conversation_id))
        return True
    call.open_upstream()
    log.info("call answered, session opening")
    return True


def _bad_fields(err: BadFields) -> web.Response:
    # The field's name only: its value may be a phone number, or whatever a forger chose.
    log.warning("voice webhook refused: %s", err)
    ERRORS.labels("voice_bad_fields").inc()
    return web.Response(status=400, text=f"bad {err.field}")


def _repeat_of_known_call() -> web.Response:
    # Twilio already has this call's stream (it connected with our TwiML), or the call is
    # over, so a webhook for it now is a replay, not Twilio: an empty <Response/> starts no
    # stream, speaks no apology for a problem that does not exist and costs nothing.
    log.warning("webhook for a call live or ended refused: no second stream")
    ERRORS.labels("voice_replay").inc()
    return _xml(str(VoiceResponse()))


def _at_capacity(rt: Runtime, problem: str) -> web.Response:
    log.warning("call refused at capacity: %s", problem)
    ERRORS.labels("call_capacity").inc()
    return _say_and_hang_up(rt, "calls_busy_say")


def _say_and_hang_up(rt: Runtime, message: str) -> web.Response:
    """A call we will not take: the persona's words in Twilio's <Say>, then the end."""
    persona = rt.persona
    response = VoiceResponse()
    response.say(persona.messages[message], language=persona.language, voice=persona.say_voice)
    response.hangup()
    return _xml(str(response))


def _xml(twiml: str) -> web.Response:
    return web.Response(text=twiml, content_type="text/xml")


def _number_or_none(number: str) -> str | None:
    try:
        return normalize_number(number)
    except ValueError:
        return None


async def _person(rt: Runtime, caller: str, call_sid: str) -> Person | None:
    number = _number_or_none(caller)
    if number is None:
        log.info("call %s: caller id withheld; no memory for this call", call_sid)
        return None
    return await rt.store.person_for(number)


def _twiml(rt: Runtime, caller: str, called: str | None, call_sid: str, token: str) -> str:
    persona = rt.persona
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=rt.signatures.stream_url("/media-stream"))
    stream.parameter(name="caller", value=caller)
    if called:  # for a stream that lands on another instance (see _adopt)
        stream.parameter(name="called", value=called)
    stream.parameter(name="callSid", value=call_sid)
    stream.parameter(name="token", value=token)
    response.append(connect)
    # Runs only if the stream ends without the call ending: our apology.
    response.say(
        persona.messages["call_failed_say"], language=persona.language, voice=persona.say_voice
    )
    return str(response)


async def media_stream(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    if not rt.signatures.ws_ok(request):
        return signature_refused(request, "media-stream")
    ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20, timeout=PHONE_CLOSE_TIMEOUT_S)
    await ws.prepare(request)
    registry = request.app[REGISTRY]
    call, start = await _wait_for_start(ws, registry)
    if call is None and start:
        call = await _adopt(request.app[RUNTIME], registry, start)
    if call is None:
        await ws.close(code=1008, message=b"unknown or used stream token")
        return ws
    with correlated(f"call={call.call_sid}"):
        call.ws = ws
        ACTIVE_CALLS.inc()
        try:
            await call.on_twilio(start)
            await _relay(ws, call)
        finally:
            ACTIVE_CALLS.dec()
            await call.end("phone stream closed")
            registry.ended(call)
            await call.drain()
    return ws


async def _wait_for_start(
    ws: web.WebSocketResponse, registry: CallRegistry
) -> tuple[LiveCall | None, dict[str, Any]]:
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = _parse(msg.data)
                if not isinstance(data, dict) or data.get("event") != "start":
                    continue
                start = data.get("start")
                params = start.get("customParameters") if isinstance(start, dict) else None
                token = params.get("token") if isinstance(params, dict) else None
                call_sid = start.get("callSid") if isinstance(start, dict) else None
                call = None
                if isinstance(token, str) and isinstance(call_sid, str):
                    call = registry.claim(token, call_sid)
                return call, data
    except TimeoutError:
        log.warning("media stream: no start within %.0f s", START_TIMEOUT_S)
    return None, {}


_CALL_SID = re.compile(r"CA[0-9a-f]{32}")


async def _adopt(rt: Runtime, registry: CallRegistry, start: dict[str, Any]) -> LiveCall | None:
    """A signed stream whose session is not parked here: with several instances, another
    one answered the webhook (a proxy routed the stream elsewhere, or that instance went
    away). The call gets a fresh session here, slower to greet, rather than failing. A call
    this instance knows (parked, live or ended) is not adopted: that is a used token."""
    body = start.get("start")
    params = body.get("customParameters") if isinstance(body, dict) else None
    call_sid = body.get("callSid") if isinstance(body, dict) else None
    if not isinstance(params, dict) or not _CALL_SID.fullmatch(str(call_sid)):
        log.warning("media stream: start without a valid callSid refused")
        return None
    if registry.known(call_sid) or registry.parked_token(call_sid) is not None:
        log.warning("media stream: start with an unknown or used token refused")
        return None
    if problem := registry.capacity_problem():
        log.warning("media stream landed here at capacity (%s): refused", problem)
        return None
    call = LiveCall(rt, call_sid, None, None)
    call.called = _number_or_none(str(params.get("called", "")))
    token = registry.park(call)
    log.warning("%s: media stream landed here, not where its session waits: a fresh one",
                call.log_id)  # fmt: skip
    ERRORS.labels("stream_elsewhere").inc()
    if not await _answer(rt, registry, call, str(params.get("caller", ""))):
        return None
    return registry.claim(token, call_sid)


async def _relay(ws: web.WebSocketResponse, call: LiveCall) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await call.on_twilio(_parse(msg.data))  # the core reports what it cannot use
            if call.state.ended:
                return
        elif msg.type == WSMsgType.BINARY:
            call._protocol_error(ProtocolError("twilio", "a binary frame"))


def _parse(text: str) -> Any:
    """Any JSON value, or `NotJson`, as the bridge gives upstream frames: the core checks."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return NotJson(text[:80].encode())


def setup(app: web.Application, claim_timeout_s: float) -> None:
    settings = app[RUNTIME].settings
    app[REGISTRY] = CallRegistry(
        claim_timeout_s, settings.max_live_calls, settings.max_parked_calls
    )
    app[RUNTIME].holders.register(app[REGISTRY])
    app.router.add_post("/webhook/voice", voice_webhook)
    app.router.add_get("/media-stream", media_stream)
