"""OpenAI Realtime API simulator (GA protocol) over a real WebSocket.

Faithful enough that passing against it means working against the real service:
every client event is validated strictly against the `openai` SDK's types (unknown
keys rejected, errors worded like the server's), the server emits only events that
validate against the SDK's server types, audio follows the session's formats, VAD runs
on the audio timeline, responses stream in the real order and faster than real time.

Layout: plain protocol classes without I/O and a thin aiohttp layer (`RealtimeSimulator`,
here). `SimSession` (here: state, emitting, dispatch, session.update, conversation items)
takes its other jobs from classes beside it: `InputAudio` (realtime_input.py: the input
buffer and server VAD), `ResponseStreaming` (realtime_streaming.py: responses and their
paced deltas) and `SessionRecord` (realtime_record.py: what was sent, read back and waited
on by tests). The pieces without I/O: realtime_config.py (knobs and limits, `SimToolCall`),
realtime_audio.py (formats, reply audio, `EnergyVad`), realtime_state.py (session
configuration rules, ids, `Conversation`, `SimResponse`, `ToolLedger`).

Function calls: a `SimToolCall` knob (`RealtimeSimConfig.tool_calls`) makes a response
call a function the session offers, as the real model does (output items of type
`function_call`, arguments streamed); the session then checks what must follow: a
`function_call_output` naming the call (an unknown `call_id` is the server's
`invalid_tool_call_id` error) and a `response.create`. What the real server would let
pass is recorded instead (`SimSession.tool_violations`).

Server VAD emulation (documented so benchmarks can subtract it):
- power is the mean square of the decoded samples over 20 ms windows of the audio
  timeline (ms since the session's first appended audio), via lookup tables for G.711;
- `threshold` t in 0..1 maps to a level of `vad_floor_dbfs + vad_span_db * t` dBFS
  (defaults -60 + 50 t: 0.5 -> -35 dBFS RMS). Speech-like audio at a normal level
  (-15..-30 dBFS) triggers; mu-law silence (0xFF) and line hiss below -35 dBFS do not;
- speech starts after `vad_start_ms` of consecutive voiced windows;
  `audio_start_ms` = start of that run - `prefix_padding_ms`;
- speech stops after `silence_duration_ms` of unvoiced windows;
  `audio_end_ms` = last voiced window end + `silence_duration_ms` (as the real server,
  whose end "includes the silence duration");
- `semantic_vad` uses the same detector, silence from `semantic_silence_ms[eagerness]`;
- `idle_timeout_ms` counts on the audio timeline from the end of the last response's
  audio playback (position of its first delta + its audio length), not wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import orjson
from aiohttp import WSMsgType, web

from simulators.live_config import LiveSimConfig

# The simulator's building blocks, each in a module named for its job; their public names
# are re-exported here (`__all__`), where tests and tools have always imported them from.
from simulators.realtime_audio import (
    ALAW_DECODE,
    ALAW_ENCODE,
    NOT_BASE64,
    EnergyVad,
    VadEvent,
    VadParams,
    bytes_per_ms,
    decoded_audio,
    reply_audio,
    vad_params,
    warm_audio_cache,
    window_power,
)
from simulators.realtime_config import (
    BETA_DISABLED_MESSAGE,
    DEFAULT_INSTRUCTIONS,
    DEFAULT_REPLY,
    MAX_APPEND_BYTES,
    MAX_DURATION_MESSAGE,
    MIN_COMMIT_MS,
    MiB,
    RealtimeSimConfig,
    SimToolCall,
)
from simulators.realtime_events import ClientEventError, check_client_event
from simulators.realtime_input import InputAudio
from simulators.realtime_record import SessionRecord
from simulators.realtime_state import (
    Conversation,
    ConvItem,
    OfferedTools,
    RefusedToolCall,
    SimResponse,
    Timed,
    ToolCallRecord,
    ToolLedger,
    ToolOutput,
    ToolViolation,
    _copy,
    _is_assistant_audio,
    default_session,
    merge_session,
    new_id,
    session_rule_violation,
)
from simulators.realtime_streaming import ResponseStreaming, plan_reply, reply_duration_ms
from simulators.responses import ResponsesSimulator
from simulators.server import SimServer, run, serve

__all__ = [
    "ALAW_DECODE",
    "ALAW_ENCODE",
    "BETA_DISABLED_MESSAGE",
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_REPLY",
    "MAX_APPEND_BYTES",
    "MAX_DURATION_MESSAGE",
    "MIN_COMMIT_MS",
    "ConvItem",
    "Conversation",
    "EnergyVad",
    "Link",
    "OfferedTools",
    "RealtimeSimConfig",
    "RealtimeSimulator",
    "RefusedToolCall",
    "SimResponse",
    "SimSession",
    "SimToolCall",
    "Timed",
    "ToolCallRecord",
    "ToolLedger",
    "ToolOutput",
    "ToolViolation",
    "VadEvent",
    "VadParams",
    "bytes_per_ms",
    "default_session",
    "main",
    "merge_session",
    "new_id",
    "plan_reply",
    "reply_audio",
    "reply_duration_ms",
    "session_rule_violation",
    "vad_params",
    "warm_audio_cache",
    "window_power",
]

# ---- the session (protocol core; I/O through a sink and a link) ------------------------


class Link(Protocol):
    """What a session needs from its transport (the aiohttp one is `_WsLink`)."""

    def send(self, payload: str) -> None: ...

    def close_after_pending(self, code: int, message: str) -> None: ...

    async def close_now(self, code: int, message: str) -> None: ...

    def abort(self) -> None: ...

    def pause(self) -> None: ...


class SimSession(ResponseStreaming, InputAudio, SessionRecord):
    """One Realtime connection: state, protocol handling and test helpers."""

    def __init__(
        self,
        cfg: RealtimeSimConfig,
        link: Link,
        *,
        model: str,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> None:
        self.sim_config = cfg
        self.link = link
        self.id = new_id("sess")
        self.model = model
        self.headers = headers or {}
        self.query = query or {}
        self.conversation_id = new_id("conv")
        self.config = default_session(model, cfg, self.id)
        self.opened_at = time.monotonic()
        self.received: list[Timed] = []
        self.sent: list[Timed] = []
        self.errors: list[dict] = []
        self.input_audio = bytearray()  # every appended byte (input format) if record_audio
        self.audio_ms = 0.0  # the audio timeline: ms appended since the first append
        self.buffer = bytearray()  # uncommitted input audio
        self.buffer_start_ms = 0.0
        self.conversation = Conversation()
        self.committed: list[ConvItem] = []  # user items made from the input buffer
        self.responses: list[SimResponse] = []
        self.ledger = ToolLedger()  # function calls and what followed them: see SessionRecord
        self.audio_output_started = False
        self.closed = False
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.appends_received = 0
        self.deltas_sent = 0
        self.frozen = False
        self._vad = EnergyVad()
        self._vad_params = vad_params(self.turn_detection, cfg)
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0.0
        self._last_input_tokens = 0
        self._tasks: set[asyncio.Task] = set()
        self._changed: asyncio.Event | None = None

    # -- convenience views --

    @property
    def turn_detection(self) -> dict | None:
        return self.config["audio"]["input"].get("turn_detection")

    @property
    def input_format(self) -> str:
        return self.config["audio"]["input"]["format"]["type"]

    @property
    def output_format(self) -> str:
        return self.config["audio"]["output"]["format"]["type"]

    @property
    def active_response(self) -> SimResponse | None:
        """The in-progress response writing to the default conversation, if any."""
        for resp in reversed(self.responses):
            if resp.active and resp.in_conversation:
                return resp
        return None

    # -- control (tests and the simulator) --

    async def drop(self, code: int = 1011, message: str = "Internal server error") -> None:
        """Simulate an upstream failure: close now with `code`, pending events discarded."""
        await self.link.close_now(code, message)

    def abort(self) -> None:
        """Simulate a network drop: kill the TCP connection without a close frame (1006)."""
        self.link.abort()

    def close(self, code: int = 1000, message: str = "") -> None:
        """Close normally once already-emitted events are written."""
        self.link.close_after_pending(code, message)

    # -- emitting --

    def _wire(self, event: dict) -> str:
        mangle = self.sim_config.mangle
        if mangle is None:
            return orjson.dumps(event).decode()
        wire = mangle(_copy(event))
        return wire if isinstance(wire, str) else orjson.dumps(wire).decode()

    def inject(self, payload: Any) -> None:
        """Fault injection: send any JSON value (or raw text) as if the server had."""
        self.link.send(payload if isinstance(payload, str) else orjson.dumps(payload).decode())

    def freeze(self) -> None:
        """Fault injection: the server stops reading and writing, and never answers a close,
        while its TCP connection stays up (a hung process behind a live load balancer)."""
        self.frozen = True
        self.link.pause()
        for resp in self.responses:
            if resp.task:
                resp.task.cancel()
        self._notify()

    def emit(self, event_type: str, **fields: Any) -> dict:
        event = {"type": event_type, "event_id": new_id("event"), **fields}
        audio_event = event_type == "response.output_audio.delta"
        if self.frozen:
            return event  # a frozen server says nothing more
        self.link.send(self._wire(event))
        if audio_event:
            self.deltas_sent += 1
            limit = self.sim_config.drop_after_deltas
            if limit is not None and self.deltas_sent == limit:
                asyncio.get_running_loop().call_soon(self.abort)
        if self.sim_config.record_audio or not audio_event:
            self.sent.append(Timed(time.monotonic(), event))
        if event_type == "error":
            self.errors.append(event)
        self._notify()
        return event

    def emit_error(self, err: ClientEventError, event_id: str | None = None) -> None:
        error = err.as_error()
        error["event_id"] = event_id if event_id is not None else err.event_id
        self.emit("error", error=error)

    def _fail(self, message: str, code: str, param: str | None, raw: dict) -> None:
        self.emit_error(ClientEventError(message, code=code, param=param), raw.get("event_id"))

    # -- lifecycle --

    def start(self) -> None:
        self.emit("session.created", session=_copy(self.config))
        if self.sim_config.send_conversation_created:
            conv = {"id": self.conversation_id, "object": "realtime.conversation"}
            self.emit("conversation.created", conversation=conv)
        self._spawn(self._expire())

    def refuse_beta(self) -> None:
        err = ClientEventError(BETA_DISABLED_MESSAGE, code="beta_api_shape_disabled")
        self.emit_error(err)
        self.link.close_after_pending(4000, "beta_api_shape_disabled")

    async def _expire(self) -> None:
        await asyncio.sleep(self.sim_config.max_session_s)
        self.link.close_after_pending(1001, MAX_DURATION_MESSAGE)

    def on_closed(self, code: int | None) -> None:
        self.closed, self.closed_at, self.close_code = True, time.monotonic(), code
        self.ledger.closed(self.closed_at)
        for task in list(self._tasks):
            task.cancel()
        for resp in self.responses:
            if resp.task:
                resp.task.cancel()
        self._notify()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- receiving --

    def handle_text(self, text: str) -> None:
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.received.append(Timed(time.monotonic(), {"_unparsed": text[:2000]}))
            self._notify()
            message = f"We could not parse the JSON body of your request. ({exc})"
            self.emit_error(ClientEventError(message, code="invalid_json"))
            return
        self.handle_event(raw)

    def handle_binary(self, data: bytes) -> None:
        message = "Binary WebSocket frames are not supported; send JSON text frames."
        self.emit_error(ClientEventError(message, code="invalid_value"))

    def handle_event(self, raw: Any) -> None:
        is_append = isinstance(raw, dict) and raw.get("type") == "input_audio_buffer.append"
        if self.sim_config.record_audio or not is_append:
            self.received.append(Timed(time.monotonic(), raw))
        self._notify()
        try:
            check_client_event(raw)
        except ClientEventError as err:
            self.emit_error(err)
            return
        handler = getattr(self, "_on_" + raw["type"].replace(".", "_"))
        handler(raw)

    # -- session.update --

    def _on_session_update(self, raw: dict) -> None:
        patch = raw["session"]
        if patch["type"] != "realtime":
            message = f"Invalid value: '{patch['type']}'. A realtime session cannot change type."
            return self._fail(message, "invalid_value", "session.type", raw)
        new = merge_session(self.config, patch)
        problem = session_rule_violation(self.config, new, self.audio_output_started)
        if problem:
            return self.emit_error(problem, raw.get("event_id"))
        old_turn = self.turn_detection
        self.config = new
        self.model = new["model"]
        if self.turn_detection != old_turn:
            self._vad.reset(self.audio_ms)
            self._speech_item_id = None
        self._vad_params = vad_params(self.turn_detection, self.sim_config)
        self.emit("session.updated", session=_copy(self.config))

    # -- conversation items --

    def _on_conversation_item_create(self, raw: dict) -> None:
        data = _copy(raw["item"])
        if _is_assistant_audio(data):
            message = "Assistant messages with audio content cannot be created by the client."
            return self._fail(message, "invalid_value", "item.content", raw)
        item_id = data.get("id") or new_id("item")
        if item_id in self.conversation.items:
            message = f"Item with id '{item_id}' already exists."
            return self._fail(message, "invalid_value", "item.id", raw)
        item = self._item_from_client(item_id, data, raw)
        if item is None:
            return
        call = None
        if item.kind == "function_call_output":
            call = self.conversation.function_call(data["call_id"])
            if call is None:
                self.ledger.unknown_output(data["call_id"], time.monotonic())
                message = f"Tool call ID '{data['call_id']}' not found in conversation."
                return self._fail(message, "invalid_tool_call_id", None, raw)
        try:
            previous = self.conversation.insert(item, raw.get("previous_item_id"))
        except KeyError:
            message = f"Previous item with id '{raw['previous_item_id']}' not found."
            return self._fail(message, "invalid_value", "previous_item_id", raw)
        if call is not None:
            self.ledger.output(data["call_id"], call.data["name"], data["output"], time.monotonic())
        elif item.role == "user":
            self.ledger.turn_started("a user item was created", time.monotonic())
        self._announce_item(item, previous)

    def _item_from_client(self, item_id: str, data: dict, raw: dict) -> ConvItem | None:
        data |= {"id": item_id, "object": "realtime.item", "status": "completed"}
        audio = bytearray()
        for index, part in enumerate(data.get("content") or []):
            if part.get("type") != "input_audio":
                continue
            decoded = decoded_audio(part.pop("audio", ""))
            if decoded is None:
                self._fail(NOT_BASE64, "invalid_value", f"item.content[{index}].audio", raw)
                return None
            audio += decoded
            part.setdefault("transcript", None)
        fmt = self.input_format if audio else None
        return ConvItem(item_id, data, audio, fmt)

    def _on_conversation_item_delete(self, raw: dict) -> None:
        item_id = raw["item_id"]
        if self.conversation.get(item_id) is None:
            message = f"Error deleting item: the item with id '{item_id}' does not exist."
            return self._fail(message, "invalid_value", "item_id", raw)
        self.conversation.remove(item_id)
        self.emit("conversation.item.deleted", item_id=item_id)

    def _on_conversation_item_retrieve(self, raw: dict) -> None:
        item = self.conversation.get(raw["item_id"])
        if item is None:
            message = f"Error retrieving item: the item with id '{raw['item_id']}' does not exist."
            return self._fail(message, "invalid_value", "item_id", raw)
        self.emit("conversation.item.retrieved", item=item.with_audio())

    def _on_conversation_item_truncate(self, raw: dict) -> None:
        item = self.conversation.get(raw["item_id"])
        if item is None:
            message = f"Error truncating item: the item with id '{raw['item_id']}' does not exist."
            return self._fail(message, "invalid_value", "item_id", raw)
        content = item.data.get("content") or []
        index, end_ms = raw["content_index"], raw["audio_end_ms"]
        audio_part = 0 <= index < len(content) and content[index].get("type") == "output_audio"
        if item.role != "assistant" or not audio_part or not item.audio:
            message = "Only model output audio messages can be truncated"
            return self._fail(message, "invalid_value", "item_id", raw)
        if end_ms < 0:
            return self._fail(
                f"Invalid audio_end_ms: {end_ms}.", "invalid_value", "audio_end_ms", raw
            )
        if end_ms > item.audio_ms:
            message = f"Audio content of {int(item.audio_ms)}ms is already shorter than {end_ms}ms"
            return self._fail(message, "invalid_value", "audio_end_ms", raw)
        self._truncate(item, index, end_ms)
        self.emit(
            "conversation.item.truncated", item_id=item.id, content_index=index, audio_end_ms=end_ms
        )

    def _truncate(self, item: ConvItem, index: int, end_ms: int) -> None:
        # Transcript pieces were streamed in step with the audio: cut it at the same place.
        full_ms = max(item.full_audio_ms, item.audio_ms, 1.0)
        keep = int(len(item.full_transcript) * min(1.0, end_ms / full_ms))
        part = item.data["content"][index]
        part["transcript"] = (part.get("transcript") or "")[:keep]
        bpm = bytes_per_ms(item.audio_format or "audio/pcm")
        del item.audio[end_ms * bpm :]


# ---- aiohttp transport -----------------------------------------------------------------


class _WsLink:
    """Ordered writes through one writer task; closes queue behind pending events."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self._queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()
        self.closing = False  # the writer is running the close handshake
        self.close_code: int | None = None  # set when the server closed first
        self.writer = asyncio.ensure_future(self._write())

    def send(self, payload: str) -> None:
        self._queue.put_nowait(payload)

    def close_after_pending(self, code: int, message: str) -> None:
        self._queue.put_nowait((code, message))

    async def close_now(self, code: int, message: str) -> None:
        self.writer.cancel()
        self.close_code = code
        await self.ws.close(code=code, message=message.encode())

    def pause(self) -> None:
        """Stop reading the socket: the peer's frames (a close, a ping) are never seen."""
        transport = self.request.transport
        if transport is not None:
            transport.pause_reading()

    def abort(self) -> None:
        self.writer.cancel()
        self.close_code = 1006
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                item = await self._queue.get()
                if isinstance(item, tuple):
                    self.closing, self.close_code = True, item[0]
                    await self.ws.close(code=item[0], message=item[1].encode())
                    return
                if self.ws.closed:
                    return
                await self.ws.send_str(item)


def _openai_error(message: str, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


class RealtimeSimulator(SimServer):
    """The aiohttp server: `GET /v1/realtime?model=...` upgraded to a Realtime session."""

    def __init__(
        self, config: RealtimeSimConfig | None = None, live_config: LiveSimConfig | None = None
    ) -> None:
        from simulators.live import LiveSimulator  # it borrows this module's websocket link

        super().__init__()
        self.config = config or RealtimeSimConfig()
        self.sessions: list[SimSession] = []
        self.attach(self.app)
        # The sibling APIs on the same base URL as the real ones: the text API the summarizer
        # uses, and GPT-Live (VOICE_BACKEND=live).
        self.responses = ResponsesSimulator()
        self.responses.attach(self.app)
        self.live = LiveSimulator(live_config)
        self.live.attach(self.app)
        self.app.router.add_get("/sim/timings", self._timings)  # ours, not an OpenAI route
        self._changed = asyncio.Event()
        self._refused = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    def attach(self, app: web.Application, prefix: str = "/v1") -> None:
        """Mount the Realtime route on `app` (other simulators may add their own routes)."""
        app.router.add_get(f"{prefix}/realtime", self.handle)
        app.on_shutdown.append(self._on_shutdown)

    async def _timings(self, request: web.Request) -> web.Response:
        """Each session's responses on the simulator's own clock (time.monotonic, which the
        processes of one machine share), so a load test can subtract the simulator's real
        latency from what it measured. A session is named by a response's metadata."""
        return web.json_response([session.timings() for session in self.sessions])

    def warm(self) -> None:
        warm_audio_cache()

    async def _on_shutdown(self, app: web.Application) -> None:
        for session in self.sessions:
            if session.frozen and not session.closed:
                session.abort()
        live = [s for s in self.sessions if not s.closed and not s.frozen]
        with contextlib.suppress(Exception):
            await asyncio.gather(*(s.drop(1001, "Server shutting down") for s in live))

    async def wait_for_session(self, timeout: float = 5.0, count: int = 1) -> SimSession:  # noqa: ASYNC109
        """The `count`-th session (1-based) once it exists."""
        async with asyncio.timeout(timeout):
            while len(self.sessions) < count:
                changed = self._changed
                await changed.wait()
        return self.sessions[count - 1]

    def _session_added(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            body = _openai_error("Missing bearer or basic authentication in header")
            return web.json_response(body, status=401)
        model = request.query.get("model")
        if not model:
            return web.json_response(
                _openai_error("Missing required parameter: 'model'.", "missing_required_parameter"),
                status=400,
            )
        if self._refused < self.config.refuse_sessions:
            self._refused += 1
            return web.json_response(_openai_error("The server had an error."), status=500)
        if self.config.open_delay_s > 0:
            await asyncio.sleep(self.config.open_delay_s)
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the client gave up waiting
        ws = web.WebSocketResponse(compress=False, max_msg_size=40 * MiB, timeout=2.0)
        if not ws.can_prepare(request).ok:
            return web.json_response(_openai_error("Expected a WebSocket upgrade."), status=400)
        await ws.prepare(request)
        link = _WsLink(ws, request)
        session = SimSession(
            self.config, link, model=model, headers=dict(request.headers), query=dict(request.query)
        )
        self.sessions.append(session)
        self._session_added()
        try:
            await self._serve(session, ws, request)
        finally:
            if link.closing:  # our close frame is out; let the handshake finish
                await asyncio.wait([link.writer], timeout=2.0)
            link.writer.cancel()
            # aiohttp reports 1000 for a close we started; keep the code we sent.
            session.on_closed(link.close_code or ws.close_code)
        return ws

    async def _serve(
        self, session: SimSession, ws: web.WebSocketResponse, request: web.Request
    ) -> None:
        if "realtime=v1" in request.headers.get("OpenAI-Beta", ""):
            session.refuse_beta()
        else:
            session.start()
        async for msg in ws:
            if session.frozen:
                continue  # read before the freeze: a hung server never handles it
            if msg.type == WSMsgType.TEXT:
                session.handle_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                session.handle_binary(msg.data)
            else:
                break


# ---- command line ----------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI Realtime API (GA) simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=300.0, help="first-audio latency")
    parser.add_argument("--speed", type=float, default=4.0, help="x real time (inf: no pacing)")
    parser.add_argument("--delta-ms", type=float, default=125.0, help="audio per delta")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="reply text")
    parser.add_argument("--max-session-s", type=float, default=3600.0)
    parser.add_argument("--no-record", action="store_true", help="don't keep audio (load tests)")
    # GPT-Live has no VAD settings (its model ends the turn): the hosted simulator's own.
    parser.add_argument(
        "--live-vad-silence-ms",
        type=int,
        default=LiveSimConfig.vad_silence_ms,
        help="GPT-Live: silence that ends the caller's turn",
    )
    parser.add_argument(
        "--live-vad-threshold-dbfs",
        type=float,
        default=LiveSimConfig.vad_threshold_dbfs,
        help="GPT-Live: RMS level of a voiced 20 ms window",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    cfg = RealtimeSimConfig(
        first_audio_latency_ms=args.latency_ms,
        speed=args.speed,
        delta_ms=args.delta_ms,
        reply_text=args.reply,
        max_session_s=args.max_session_s,
        record_audio=not args.no_record,
    )
    # GPT-Live on the same base URL, paced alike: a load test on either backend has one F.
    live = LiveSimConfig(
        first_audio_latency_ms=args.latency_ms,
        speed=args.speed,
        delta_ms=args.delta_ms,
        reply_text=args.reply,
        record_audio=not args.no_record,
        vad_silence_ms=args.live_vad_silence_ms,
        vad_threshold_dbfs=args.live_vad_threshold_dbfs,
    )
    sim = RealtimeSimulator(cfg, live)
    await serve(sim, args.host, args.port, lambda: [
        f"Realtime simulator listening on {sim.ws_url}?model=...",
        f"  AsyncOpenAI(api_key='sk-sim', base_url='{sim.base_url}')",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    run(_serve_forever(args), args.log_level)


if __name__ == "__main__":
    main()
