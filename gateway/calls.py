"""Phone calls: POST /webhook/voice and GET /media-stream.

The handlers only move messages between Twilio's socket, the Realtime session and
`CallState`, which decides everything. The Realtime session is opened when Twilio asks
for TwiML, so persona, memory and even the greeting are ready when the stream starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from twilio.twiml.voice_response import Connect, VoiceResponse

from gateway.bridge import RealtimeSession, UpstreamClosed, call_session
from gateway.call_state import (
    Action,
    CallState,
    EndCall,
    RecordTurn,
    RecordUsage,
    SendRealtime,
    SendRealtimeRaw,
    SendTwilio,
    UpstreamError,
)
from gateway.memory import instructions_for, load_memory, with_transcript
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
from gateway.privacy import note_erasure_request
from gateway.runtime import RUNTIME, Runtime
from gateway.store import Person, normalize_number
from gateway.twilio_api import signature_refused
from gateway.usage import token_counts

log = logging.getLogger(__name__)

START_TIMEOUT_S = (
    10.0  # Twilio sends `connected` and `start` at once; a silent socket is not Twilio
)
RECONNECT_ATTEMPTS = 2


class LiveCall:
    """One call: its Realtime session, its core state and, once connected, Twilio's socket."""

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
        self.state = CallState()
        self.memory = MemoryContext(None, None, None, [], True)
        self.session: RealtimeSession | None = None
        self.ws: web.WebSocketResponse | None = None
        self.upstream_ready = asyncio.Event()
        self.reconnects = 0
        self._ending = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._greeting_observed = False
        self.session_opened_at = clock()
        self.rotations = 0
        self._rotating = False
        self._inbound_timer = FrameTimer("inbound")
        self._outbound_timer = FrameTimer("outbound")

    # upstream
    def open_upstream(self) -> None:
        self._spawn(self._open_and_pump())

    async def _open_and_pump(self) -> None:
        try:
            if self.person is not None:
                self.memory = await load_memory(self.rt.store, self.person)
            instructions = instructions_for(self.rt.persona, "call", self.memory)
            self.session = await self._open_session(instructions)
            self.session_opened_at = self.clock()
            greeting = greeting_instruction(self.rt.persona, "call", self.memory)
            await self.session.send(
                {
                    "type": "response.create",
                    "response": {
                        "instructions": f"{instructions}\n\n{greeting}",
                        # Names the call in OpenAI's records of the session, for support.
                        "metadata": {"call_sid": self.call_sid},
                    },
                }
            )
        except Exception:
            log.exception("call %s: could not open the Realtime session", self.call_sid)
            ERRORS.labels("session_open_failed").inc()
            self.upstream_ready.set()
            await self.end()
            return
        self.upstream_ready.set()
        self._pump = asyncio.current_task()  # type: ignore[assignment]
        await self._pump_events()

    async def _open_session(self, instructions: str) -> RealtimeSession:
        settings = self.rt.settings
        return await RealtimeSession.open(
            self.rt.openai,
            settings.realtime_model,
            call_session(settings, self.rt.voice, instructions),
        )

    async def _pump_events(self) -> None:
        while not self._ending:
            session = self.session
            assert session is not None
            try:
                event = await session.recv()
            except UpstreamClosed as err:
                if self._ending:
                    return
                if self.session is not session:
                    continue  # a planned rotation replaced it
                log.warning("call %s: upstream closed (%s); reconnecting", self.call_sid, err)
                if not await self._reconnect():
                    await self.end(apologise=True)
                    return
                continue
            timed = (
                event.get("type") == "response.output_audio.delta" and self._outbound_timer.due()
            )
            started = time.perf_counter() if timed else 0.0
            await self.perform(self.state.on_realtime(event, self.clock()))
            if timed:
                self._outbound_timer.observe_since(started)

    def _instructions_with_transcript(self) -> str:
        memory = with_transcript(self.memory, self.state.transcript, "call")
        return instructions_for(self.rt.persona, "call", memory)

    async def _reconnect(self) -> bool:
        """A new session with persona, memory and this call's transcript; the call goes on."""
        instructions = self._instructions_with_transcript()
        for attempt in range(1, RECONNECT_ATTEMPTS + 1):
            try:
                self.session = await self._open_session(instructions)
                self.session_opened_at = self.clock()
            except Exception as err:
                log.warning("call %s: reconnect %d failed: %s", self.call_sid, attempt, err)
                await asyncio.sleep(0.2 * attempt)
                continue
            self.state.upstream_replaced()
            self.reconnects += 1
            RECONNECTS.inc()
            return True
        return False

    def _maybe_rotate(self, now: float) -> None:
        """Before the API's 60-minute cap, swap sessions while nobody talks, so the cap
        never cuts a reply or the caller mid-sentence."""
        if (
            not self._rotating
            and now - self.session_opened_at > self.rt.settings.call_session_rotate_s
            and self.state.quiet
            and self.session is not None
        ):
            self._rotating = True
            self._spawn(self._rotate())

    async def _rotate(self) -> None:
        old = self.session
        try:
            new = await self._open_session(self._instructions_with_transcript())
        except Exception as err:
            log.warning("call %s: session rotation failed (%s); will retry", self.call_sid, err)
            self.session_opened_at = self.clock() - self.rt.settings.call_session_rotate_s + 30
            self._rotating = False
            return
        if self._ending:
            await new.close()
            return
        self.session, self.session_opened_at = new, self.clock()
        self.state.upstream_replaced()
        self.rotations += 1
        self._rotating = False
        log.info("call %s: Realtime session rotated before its time cap", self.call_sid)
        if old is not None:
            await old.close()

    # twilio
    async def on_twilio(self, message: dict[str, Any]) -> None:
        now = self.clock()
        self._maybe_rotate(now)
        if self._inbound_timer.due():
            started = time.perf_counter()
            await self.perform(self.state.on_twilio(message, now))
            self._inbound_timer.observe_since(started)
        else:
            await self.perform(self.state.on_twilio(message, now))

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
            elif isinstance(action, UpstreamError):
                ERRORS.labels("upstream_error").inc()
                log.warning(
                    "call %s: upstream error %s: %s", self.call_sid, action.code, action.message
                )
            elif isinstance(action, EndCall):
                log.info("call %s: ending (%s)", self.call_sid, action.reason)
                await self.end()
        if not self._greeting_observed and self.state.greeting_ms is not None:
            self._greeting_observed = True
            GREETING.observe(self.state.greeting_ms / 1000)

    async def _to_twilio(self, message: dict[str, Any]) -> None:
        ws = self.ws
        if ws is not None and not ws.closed:
            await ws.send_str(orjson.dumps(message).decode())

    async def _to_realtime(self, event: dict[str, Any]) -> None:
        if self.session is None:
            return
        # On a close the pump sees the same error and reconnects; this frame is lost.
        with contextlib.suppress(UpstreamClosed):
            await self.session.send(event)

    async def _audio_to_realtime(self, data: bytes) -> None:
        if self.session is None:
            return
        try:  # noqa: SIM105 - a try is free per frame; suppress() is a context manager call
            await self.session.send_bytes(data)
        except UpstreamClosed:
            pass  # the pump sees the same close and reconnects; this frame is lost

    # store
    def _record_turn(self, turn: RecordTurn) -> None:
        TURNS.labels("call", turn.role).inc()
        if turn.role == "user" and self.person is not None:
            self._spawn(note_erasure_request(self.rt.store, self.person, "call", turn.text))
        if turn.response_latency_ms is not None:
            RESPONSE_LATENCY.observe(turn.response_latency_ms / 1000)
        if turn.upstream_first_audio_ms is not None:
            UPSTREAM_FIRST_AUDIO.observe(turn.upstream_first_audio_ms / 1000)
        if self.conversation_id is None or self.rt.store is None:
            return
        latency = turn.response_latency_ms
        if turn.role == "assistant" and latency is None and not self._greeted():
            latency = self.state.greeting_ms  # the greeting's latency is from stream start
        self._spawn(
            self.rt.store.add_turn(
                self.conversation_id,
                turn.role,
                turn.text,
                audio_ms=turn.audio_ms,
                response_latency_ms=latency,
                upstream_first_audio_ms=turn.upstream_first_audio_ms,
            )
        )

    def _greeted(self) -> bool:
        return sum(1 for role, _ in self.state.transcript if role == "assistant") > 1

    def _record_usage(self, usage: RecordUsage) -> None:
        if self.person is None or self.rt.store is None:
            return
        self._spawn(
            self.rt.store.add_usage(
                self.person.id,
                self.conversation_id,
                usage.response_id,
                **token_counts(usage.usage),
                audio_seconds=usage.audio_ms / 1000,
                model=self.rt.settings.realtime_model,
            )
        )

    # lifecycle
    @property
    def ended(self) -> bool:
        return self._ending

    async def end(self, apologise: bool = False) -> None:
        """Close everything once; closing Twilio's socket lets the TwiML <Say> apologise."""
        if self._ending:
            return
        self._ending = True
        if self.session is not None:
            await self.session.close()
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
        if self.conversation_id is not None and self.rt.store is not None:
            self._spawn(self._finish_conversation(self.conversation_id))
        if apologise:
            log.warning("call %s: upstream lost for good; call ended", self.call_sid)

    async def _finish_conversation(self, conversation_id: int) -> None:
        await self.rt.store.end_conversation(conversation_id)
        if self.rt.summarizer is not None:
            self.rt.summarizer.poke()  # fold this call into the person's summary now

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for pending store writes (shutdown and tests)."""
        while pending := [t for t in self._tasks if t is not asyncio.current_task()]:
            await asyncio.gather(*pending, return_exceptions=True)


class CallRegistry:
    """Pre-opened calls waiting for their media stream, keyed by a one-time token."""

    def __init__(self, claim_timeout_s: float) -> None:
        self.claim_timeout_s = claim_timeout_s
        self._waiting: dict[str, LiveCall] = {}
        self.live: dict[str, LiveCall] = {}

    def park(self, call: LiveCall) -> str:
        token = secrets.token_urlsafe(24)
        self._waiting[token] = call
        asyncio.get_running_loop().call_later(self.claim_timeout_s, self._expire, token)
        return token

    def claim(self, token: str, call_sid: str | None) -> LiveCall | None:
        """The one call this token was made for; a token works once, for its own CallSid."""
        call = self._waiting.get(token)
        if call is None or call.call_sid != call_sid:
            return None
        del self._waiting[token]
        self.live[call.call_sid] = call
        return call

    def _expire(self, token: str) -> None:
        call = self._waiting.pop(token, None)
        if call is not None:
            log.warning("call %s: media stream never came; closing its session", call.call_sid)
            call._spawn(call.end())

    async def close_all(self) -> None:
        calls = [*self._waiting.values(), *self.live.values()]
        self._waiting.clear()
        for call in calls:
            await call.end()
            await call.drain()


REGISTRY = web.AppKey("calls", CallRegistry)


async def voice_webhook(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if not await rt.signatures.form_ok(request):
        return signature_refused(request, "voice")
    form = await request.post()
    call_sid = str(form.get("CallSid", ""))
    if not call_sid.startswith("CA"):
        return web.Response(status=400, text="missing CallSid")
    caller = str(form.get("From", ""))
    CALLS.inc()
    with correlated(f"call={call_sid}"):  # inherited by the call's upstream task
        person, conversation_id = await _person_and_conversation(rt, caller, call_sid)
        call = LiveCall(rt, call_sid, person, conversation_id)
        token = request.app[REGISTRY].park(call)
        call.open_upstream()
        log.info("call answered, session opening")
    return web.Response(text=_twiml(rt, caller, call_sid, token), content_type="text/xml")


async def _person_and_conversation(
    rt: Runtime, caller: str, call_sid: str
) -> tuple[Person | None, int | None]:
    try:
        number = normalize_number(caller)
    except ValueError:
        log.info("call %s: caller id withheld; no memory for this call", call_sid)
        return None, None
    person = await rt.store.person_for(number)
    return person, await rt.store.start_conversation(person.id, "call", call_sid)


def _twiml(rt: Runtime, caller: str, call_sid: str, token: str) -> str:
    persona = rt.persona
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=rt.signatures.stream_url("/media-stream"))
    stream.parameter(name="caller", value=caller)
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
    ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20)
    await ws.prepare(request)
    call, start = await _wait_for_start(ws, request.app[REGISTRY])
    if call is None:
        await ws.close(code=1008, message=b"unknown or used stream token")
        return ws
    with correlated(f"call={call.call_sid}"):
        call.ws = ws
        ACTIVE_CALLS.inc()
        try:
            await call.upstream_ready.wait()
            if call.ended:  # OpenAI could not be reached: the TwiML's <Say> apologises
                await ws.close()
                return ws
            await call.on_twilio(start)
            await _relay(ws, call)
        finally:
            ACTIVE_CALLS.dec()
            await call.end()
            request.app[REGISTRY].live.pop(call.call_sid, None)
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
                if data.get("event") != "start":
                    continue
                start = data.get("start") or {}
                params = start.get("customParameters") or {}
                call = registry.claim(str(params.get("token", "")), start.get("callSid"))
                if call is None:
                    log.warning("media stream: start with an unknown or used token refused")
                return call, data
    except TimeoutError:
        log.warning("media stream: no start within %.0f s", START_TIMEOUT_S)
    return None, {}


async def _relay(ws: web.WebSocketResponse, call: LiveCall) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            data = _parse(msg.data)
            if data:
                await call.on_twilio(data)
            if call.state.ended:
                return
        elif msg.type == WSMsgType.BINARY:
            log.warning("call %s: binary frame from Twilio ignored", call.call_sid)


def _parse(text: str) -> dict[str, Any]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        log.warning("media stream: a frame that is not JSON was ignored")
        return {}
    return data if isinstance(data, dict) else {}


def setup(app: web.Application, claim_timeout_s: float) -> None:
    app[REGISTRY] = CallRegistry(claim_timeout_s)
    app.router.add_post("/webhook/voice", voice_webhook)
    app.router.add_get("/media-stream", media_stream)

    async def close_calls(app: web.Application) -> None:
        await app[REGISTRY].close_all()

    app.on_shutdown.append(close_calls)
