"""OpenAI GPT-Live (`client.live.connect()`: `GET /v1/live/sessions`) over a real WebSocket.

Protocol as the openai SDK 3.63.0 models it (`openai.types.live`, `resources/live/live.py`):
no query parameters, `Authorization: Bearer <key>`; the client sends `session.start` (model,
instructions, audio format and voice, seeded `input`, delegation) and waits for
`session.started`; every client event is validated strictly (live_events.py); every server
event validates against the SDK's `ServerEvent` (the tests check each one sent).

The model owns turn-taking. An energy detector (realtime_audio.EnergyVad over the decoded
input, 20 ms windows) finds the caller's speech in `session.input_audio.append`; when it
ends the model answers after `first_audio_latency_ms`: `session.output_audio.delta` (the
session's format, the Realtime simulator's synthetic voice, `speed` x real time) with
`session.output_transcript.delta` beside each chunk. The caller's words come as
`session.input_transcript.delta`: the first word soon after the speech starts, the rest
after it ends (`transcription_latency_ms`).

The session timeline (`start_ms`/`end_ms` of transcripts and appended context) is the input
audio's: milliseconds appended since the session started, as the Realtime simulator's VAD.
A reply is placed on it where its first chunk is sent (after any earlier output). So a
client that stops appending while a reply plays has not let it play: speech appended later
but before the reply's end on the timeline cuts it; append silence to let a reply play out
(the real model "speaks only while its input clock runs", reported in livekit/agents#7239).

Barge-in: the Live protocol has no interruption event (no speech_started, no response
done/cancelled, no truncate). The caller speaking during a reply ends it the way the wire
shows it: its `session.output_audio.delta` and `session.output_transcript.delta` stop, and
the barge-in's `session.input_transcript.delta` follows. The model's context keeps what was
played, by the session timeline: the reply's text up to where the caller started speaking
(and no further than what was sent); `LiveSession.history` shows it. A reply already sent
in full but still playing on the timeline is cut the same way.

Manual turns (voice notes): the voice model has no user-text input or commit. What the SDK
offers is Responses delegation: `response.item.create` (any Responses input item) and
`response.create` ("Requires Responses delegation"). The backend's answer streams as
`response.event` (nested Responses events: created ... output_text.delta ... completed) and
is then spoken by the voice model (an assumption: the SDK does not say). Audio turns also
work without delegation: append the note (faster than real time is fine) and some silence.
`session.commentary.append` and `session.instructions.append` make the model speak when it
is silent (the `reply` knob sees the appended item); `session.thinking.append` never does.

Also: `session.update` (delegation settings, triggers), mute/unmute, instructions/thinking/
commentary appends (acknowledged with their timeline position), audio fixtures
(`session.output_audio.fixture.play`: PCM16 24 kHz played in the session format, input
dropped meanwhile), `session.usage.updated` after each reply (and every `usage_interval_s`),
`session.close` -> `session.closed` (`close_requested`; `expired` at `max_session_s`).
Not simulated (an `error` with code `not_simulated`): Decisions (`decision.*`). Never emitted:
model-initiated delegations, sideband reflections, transport/DTMF events, `info`.
Error codes the SDK does not name (`session_not_started`, `delegation_required`, ...) are
the simulator's own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple, get_args

import numpy as np
import orjson
from aiohttp import WSMsgType, web

from gateway.transcode import MULAW_ENCODE
from simulators.live_config import (
    DEFAULT_VOICE,
    MAX_APPEND_TOKENS,
    MAX_FIXTURE_MS,
    MAX_INITIAL_ITEMS,
    MAX_INSTRUCTIONS_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    LiveSimConfig,
    estimate_tokens,
)
from simulators.live_events import (
    ClientEventError,
    check_client_event,
    client_event_adapter,
    live_error,
)
from simulators.live_tools import (
    DelegatedCall,
    DelegatedTools,
    function_call_stream,
    offered_tools,
    snapshot,
)
from simulators.realtime import Link, _openai_error, _WsLink  # the same transport and bodies
from simulators.realtime_audio import (
    ALAW_ENCODE,
    NOT_BASE64,
    EnergyVad,
    VadEvent,
    VadParams,
    decoded_audio,
    reply_audio,
    warm_audio_cache,
)
from simulators.realtime_config import MiB
from simulators.realtime_state import Timed, _copy, new_id
from simulators.server import SimServer, run, serve
from simulators.waits import Waits

__all__ = [
    "LiveItem",
    "LiveReply",
    "LiveSession",
    "LiveSimConfig",
    "LiveSimulator",
    "backend_stream",
    "bytes_per_ms",
    "from_pcm24k",
    "main",
    "start_problem",
    "voice_audio",
]

log = logging.getLogger("simulators.live")

NOT_STARTED = "The session has not started: send session.start and wait for session.started."
SERVER_ERROR = "The server had an error while processing your request."
BACKEND_DELTA_CHARS = 24  # backend text per nested response.output_text.delta
# session.start fields the snapshot repeats as given (the SDK lists no defaults for them)
_ECHOED = ("instructions", "input", "delegation", "safety_identifier", "triggers", "client")


# ---- records ---------------------------------------------------------------------------


@dataclass
class LiveItem:
    """One entry of the voice model's context, as the simulator keeps it."""

    role: str  # "developer" | "user" | "assistant"
    text: str
    # "input" (session.input), "speech" (a caller's turn), "instructions", "thinking",
    # "commentary", "reply" (the model's speech), "backend" (a Responses user item)
    source: str
    status: str = "completed"  # an interrupted reply: "incomplete", its text what was played
    start_ms: float = 0.0  # on the session timeline
    end_ms: float = 0.0


@dataclass(eq=False)
class LiveReply:
    """One spoken answer of the model."""

    cause: str  # "speech" | "commentary" | "backend"
    trigger: LiveItem | None
    format: dict
    created_at: float  # time.monotonic()
    text: str = ""  # what the model meant to say
    duration_ms: int = 0
    status: str = "pending"  # then "speaking", and "completed" | "interrupted" | "failed"
    start_ms: float | None = None  # on the session timeline, where its first chunk went
    first_audio_at: float | None = None
    done_at: float | None = None
    audio: bytearray = field(default_factory=bytearray)  # sent (if record_audio)
    sent_ms: float = 0.0
    sent_text: str = ""
    played_ms: float = 0.0
    item: LiveItem | None = None  # its entry in the history, once it speaks
    task: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        return self.status in ("pending", "speaking")


@dataclass(eq=False)
class _Turn:
    """The caller's turn while its speech lasts: its transcript waits for the end."""

    item: LiveItem
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float = 0.0  # loop time


# ---- audio in the session's format (pure) -----------------------------------------------


def bytes_per_ms(fmt: dict) -> float:
    """PCM16 at 16 or 24 kHz: 32 or 48; G.711 (8 kHz, a byte a sample): 8."""
    return fmt["rate"] * 2 / 1000 if fmt["type"] == "audio/pcm" else 8.0


def _resample(pcm: bytes, src: int, dst: int) -> bytes:
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32)
    count = len(samples) * dst // src
    positions = np.arange(count, dtype=np.float64) * src / dst
    out = np.interp(positions, np.arange(len(samples)), samples)
    return out.astype("<i2").tobytes()


def from_pcm24k(pcm: bytes, fmt: dict) -> bytes:
    """PCM16 24 kHz (the fixtures' format) in the session's format."""
    if fmt["type"] == "audio/pcm":
        return pcm if fmt["rate"] == 24000 else _resample(pcm, 24000, fmt["rate"])
    samples = np.frombuffer(_resample(pcm, 24000, 8000), dtype="<i2")
    table = ALAW_ENCODE if fmt["type"] == "audio/pcma" else MULAW_ENCODE
    return table[samples.view(np.uint16)].tobytes()


@lru_cache(maxsize=256)
def _voice_audio(fmt_type: str, rate: int, duration_ms: int) -> bytes:
    if fmt_type == "audio/pcm" and rate != 24000:
        return _resample(reply_audio("audio/pcm", duration_ms), 24000, rate)
    return reply_audio(fmt_type, duration_ms)


def voice_audio(fmt: dict, duration_ms: int) -> bytes:
    """The model's voice: the Realtime simulator's reply audio (byte for byte in pcmu, pcma
    and PCM 24 kHz; resampled for PCM 16 kHz), so tests can tell who is speaking."""
    return _voice_audio(fmt["type"], fmt["rate"], duration_ms)


def _silence(fmt: dict, size: int) -> bytes:
    fill = {"audio/pcmu": b"\xff", "audio/pcma": b"\xd5"}.get(fmt["type"], b"\x00")
    return fill * size


def _vad_view(data: bytes, fmt: dict) -> tuple[bytes, str]:
    """Input as the energy detector reads it (it knows 24 kHz PCM and G.711)."""
    if fmt["type"] == "audio/pcm" and fmt["rate"] != 24000:
        return _resample(data, fmt["rate"], 24000), "audio/pcm"
    return data, fmt["type"]


class _Chunk(NamedTuple):
    offset_ms: float  # in the output's own timeline (paced by `speed`)
    ms: float
    audio: bytes
    text: str


def _split(text: str, count: int) -> list[str]:
    return [text[len(text) * i // count : len(text) * (i + 1) // count] for i in range(count)]


def plan_chunks(audio: bytes, fmt: dict, text: str, delta_ms: float) -> list[_Chunk]:
    """Output deltas of `delta_ms` of audio each, the transcript spread evenly over them."""
    bpm = bytes_per_ms(fmt)
    size = max(2, int(max(1.0, delta_ms) * bpm))
    size -= size % 2 if fmt["type"] == "audio/pcm" else 0  # whole 16-bit samples
    count = max(1, math.ceil(len(audio) / size))
    pieces = _split(text, count)
    return [
        _Chunk(i * size / bpm, len(part) / bpm, part, pieces[i])
        for i, part in enumerate(audio[i * size : (i + 1) * size] for i in range(count))
    ]


# ---- session.start rules (pure) ---------------------------------------------------------


def _voices() -> tuple[str, ...]:
    from openai.types.live import BuiltInVoice

    return get_args(BuiltInVoice)


def _invalid_value(value: Any, supported: str, param: str) -> ClientEventError:
    shown = f"'{value}'" if isinstance(value, str) else repr(value)
    message = f"Invalid value: {shown}. Supported values are: {supported}."
    return ClientEventError(message, code="invalid_value", param=param)


def _over_tokens(param: str, tokens: int, limit: int) -> ClientEventError:
    message = f"Invalid '{param}': about {tokens} tokens, above the limit of {limit} tokens."
    return ClientEventError(message, code="invalid_value", param=param)


def history_tokens(items: list[dict]) -> int:
    """The seeded history's rendered size, by the simulator's estimate."""
    return sum(
        estimate_tokens(part["text"]) + MESSAGE_OVERHEAD_TOKENS
        for item in items
        for part in item["content"]
    )


def _history_problem(items: list[dict], limit: int) -> ClientEventError | None:
    if len(items) > MAX_INITIAL_ITEMS:
        message = (
            f"Invalid 'session.input': array too long. Expected an array with maximum length "
            f"{MAX_INITIAL_ITEMS}, but got an array with length {len(items)} instead."
        )
        return ClientEventError(message, code="array_above_max_length", param="session.input")
    for index, item in enumerate(items):
        if len(item["content"]) != 1:  # "Supply exactly one text part"
            param = f"session.input[{index}].content"
            message = (
                f"Invalid '{param}': expected exactly one text part, got {len(item['content'])}."
            )
            return ClientEventError(message, code="invalid_value", param=param)
    tokens = history_tokens(items)
    return _over_tokens("session.input", tokens, limit) if tokens > limit else None


def start_problem(session: dict, cfg: LiveSimConfig) -> ClientEventError | None:
    """What the types cannot say about a session.start: rates, voices, documented limits."""
    audio = session.get("audio") or {}
    fmt = audio.get("format")
    if fmt and fmt["type"] != "audio/pcm" and fmt["rate"] != 8000:  # "G.711 audio uses 8000 Hz"
        return _invalid_value(fmt["rate"], "8000", "session.audio.format.rate")
    voice = (audio.get("output") or {}).get("voice")
    if isinstance(voice, str) and voice not in _voices():
        names = ", ".join(f"'{name}'" for name in _voices())
        return _invalid_value(voice, names, "session.audio.output.voice")
    tokens = estimate_tokens(session.get("instructions") or "")
    if tokens > MAX_INSTRUCTIONS_TOKENS:
        return _over_tokens("session.instructions", tokens, MAX_INSTRUCTIONS_TOKENS)
    return _history_problem(session.get("input") or [], cfg.history_token_limit)


def _merged(old: dict, new: dict) -> dict:
    """A sparse delegation update: omitted settings keep their values."""
    out = dict(old)
    for key, value in new.items():
        both = isinstance(value, dict) and isinstance(old.get(key), dict)
        out[key] = {**old[key], **value} if both else value
    return out


def _item_text(item: dict) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return " ".join(part.get("text") or "" for part in parts if isinstance(part, dict)).strip()


def backend_stream(text: str, model: str, input_tokens: int) -> list[dict]:
    """A Responses stream for one text answer, as `response.event` nests it. Lifecycle
    snapshots "omit input and clear instructions, tools, and output" (the SDK's words)."""
    resp_id, item_id = new_id("resp"), new_id("msg")
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": estimate_tokens(text),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + estimate_tokens(text),
    }

    part = {"type": "output_text", "text": text, "annotations": []}
    message = {"id": item_id, "type": "message", "role": "assistant", "status": "completed"}
    ids = {"item_id": item_id, "output_index": 0, "content_index": 0}
    pieces = _split(text, max(1, math.ceil(len(text) / BACKEND_DELTA_CHARS)))
    events = [
        {"type": "response.created", "response": snapshot(resp_id, model, "in_progress")},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **ids, "part": {**part, "text": ""}},
        *(
            {"type": "response.output_text.delta", **ids, "delta": p, "logprobs": []}
            for p in pieces
        ),
        {"type": "response.output_text.done", **ids, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **ids, "part": part},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**message, "content": [part]},
        },
        {"type": "response.completed", "response": snapshot(resp_id, model, "completed", usage)},
    ]
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def _answering(raw: dict) -> dict[str, str]:
    """`client_event_id` for a server event that answers a client event with an id."""
    event_id = raw.get("event_id")
    return {"client_event_id": event_id} if isinstance(event_id, str) else {}


# ---- the session ------------------------------------------------------------------------


class LiveSession:
    """One Live connection: state, protocol handling and what tests read back."""

    def __init__(
        self,
        cfg: LiveSimConfig,
        link: Link,
        *,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> None:
        self.sim_config = cfg
        self.link = link
        self.id = new_id("sess")
        self.headers = headers or {}
        self.query = query or {}
        self.config: dict | None = None  # the resolved SessionResource, once started
        self.opened_at = time.monotonic()
        self.started_at: float | None = None
        self.received: list[Timed] = []  # every client event (appends if record_audio)
        self.sent: list[Timed] = []  # every server event (audio deltas if record_audio)
        self.errors: list[dict] = []
        self.history: list[LiveItem] = []  # the voice model's context
        self.replies: list[LiveReply] = []
        self.backend_items: list[dict] = []  # response.item.create items, as sent
        self.tools = DelegatedTools()  # delegated function calls (live_tools.py)
        self.input_audio = bytearray()  # every appended byte (session format) if record_audio
        self.audio_ms = 0.0  # the session timeline: input audio appended since the start
        self.muted = False
        self.fixture_active = False
        self.appends_received = 0
        self.deltas_sent = 0
        self.closing = False  # session.closed sent: nothing more is handled
        self.close_reason: str | None = None
        self.closed = False
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self._output_end_ms = 0.0
        self._vad = EnergyVad()
        self._vad_ms = 0.0
        power = (32768.0 * 10 ** (cfg.vad_threshold_dbfs / 20)) ** 2
        self._vad_params = VadParams(power, 0, cfg.vad_silence_ms, cfg.vad_start_ms, None)
        self._turn: _Turn | None = None
        self._backend: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._waits = Waits()

    # -- views --

    @property
    def started(self) -> bool:
        return self.config is not None

    @property
    def format(self) -> dict:
        """The one audio format of both directions ("sent and received")."""
        assert self.config is not None
        return self.config["audio"]["format"]

    @property
    def active_reply(self) -> LiveReply | None:
        return next((r for r in reversed(self.replies) if r.active), None)

    def events(self, event_type: str | None = None) -> list[dict]:
        """Sent server events (optionally of one type), in order."""
        return [t.event for t in self.sent if event_type is None or t.event["type"] == event_type]

    def sent_types(self) -> list[str]:
        return [t.event["type"] for t in self.sent]

    def client_events(self, event_type: str | None = None) -> list[Any]:
        """Received client events (optionally of one type), in order."""
        return [
            t.event
            for t in self.received
            if event_type is None
            or (isinstance(t.event, dict) and t.event.get("type") == event_type)
        ]

    # -- control (tests and faults) --

    async def drop(self, code: int = 1011, message: str = "Internal server error") -> None:
        """An upstream failure: close now with `code`, without session.closed."""
        await self.link.close_now(code, message)

    def abort(self) -> None:
        """A network drop: the TCP connection dies without a close frame (1006)."""
        self.link.abort()

    def inject(self, payload: Any) -> None:
        """Send any JSON value (or raw text) as if the server had."""
        self.link.send(payload if isinstance(payload, str) else orjson.dumps(payload).decode())

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:  # noqa: ASYNC109
        """Until `predicate()` is truthy, re-checked at every change; its value."""
        await self._waits.wait(lambda: bool(predicate()), timeout)
        return predicate()

    async def wait_event(self, event_type: str, timeout: float = 5.0) -> dict:  # noqa: ASYNC109
        """The first sent event of `event_type`."""
        return await self.wait_for(lambda: next(iter(self.events(event_type)), None), timeout)

    # -- emitting --

    def _notify(self) -> None:
        self._waits.check()

    def emit(self, event_type: str, **fields: Any) -> dict:
        audio = event_type == "session.output_audio.delta"
        # The primary socket's audio deltas carry no event_id (OutputAudioDeltaEvent).
        head = {"type": event_type} if audio else {"type": event_type, "event_id": new_id("event")}
        event = {**head, **fields}
        self.link.send(orjson.dumps(event).decode())
        if audio:
            self._count_delta()
        if self.sim_config.record_audio or not audio:
            self.sent.append(Timed(time.monotonic(), event))
        if event_type == "error":
            self.errors.append(event)
        self._notify()
        return event

    def _count_delta(self) -> None:
        self.deltas_sent += 1
        if self.deltas_sent == self.sim_config.drop_after_deltas:
            asyncio.get_running_loop().call_soon(self.abort)

    def emit_error(self, err: ClientEventError, client_event_id: str | None = None) -> None:
        error = live_error(err, client_event_id)
        extra = {"client_event_id": error["client_event_id"]} if error["client_event_id"] else {}
        self.emit("error", error=error, **extra)

    def _fail(self, message: str, code: str, param: str | None, raw: dict) -> None:
        self.emit_error(ClientEventError(message, code=code, param=param), raw.get("event_id"))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    # -- receiving --

    def handle_text(self, text: str) -> None:
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            self.received.append(Timed(time.monotonic(), {"_unparsed": text[:2000]}))
            message = f"We could not parse the JSON body of your request. ({exc})"
            self.emit_error(ClientEventError(message, code="invalid_json"))
            return
        self.handle_event(raw)

    def handle_binary(self, data: bytes) -> None:
        message = "Binary WebSocket frames are not supported; send JSON text frames."
        self.emit_error(ClientEventError(message, code="invalid_value"))

    def handle_event(self, raw: Any) -> None:
        is_append = isinstance(raw, dict) and raw.get("type") == "session.input_audio.append"
        if self.sim_config.record_audio or not is_append:
            self.received.append(Timed(time.monotonic(), raw))
        self._notify()
        if self.closing:
            return
        try:
            check_client_event(raw)
        except ClientEventError as err:
            self.emit_error(err)
            return
        kind = raw["type"]
        if kind == "session.close" and not self.started:
            return self.link.close_after_pending(1000, "")
        if kind != "session.start" and not self.started:
            return self._fail(NOT_STARTED, "session_not_started", "type", raw)
        getattr(self, "_on_" + kind.replace(".", "_"))(raw)

    # -- session.start / session.update / session.close --

    def _on_session_start(self, raw: dict) -> None:
        if self.started:
            message = "The session has already started: session.start is sent once."
            return self._fail(message, "session_already_started", "type", raw)
        requested = raw["session"]
        problem = start_problem(requested, self.sim_config)
        if problem is not None:
            return self.emit_error(problem, raw.get("event_id"))
        self.config = self._resolve(requested)
        self.started_at = time.monotonic()
        for item in requested.get("input") or []:
            self.history.append(LiveItem(item["role"], item["content"][0]["text"], "input"))
        self.emit("session.started", session=_copy(self.config), **_answering(raw))
        self._spawn(self._expire())
        if self.sim_config.usage_interval_s:
            self._spawn(self._usage_ticker(self.sim_config.usage_interval_s))

    def _resolve(self, requested: dict) -> dict:
        """The session snapshot: the request with the server's defaults filled in."""
        audio = requested.get("audio") or {}
        fmt = audio.get("format") or {"type": "audio/pcm", "rate": 24000}
        voice = (audio.get("output") or {}).get("voice") or DEFAULT_VOICE
        resource = {
            "id": self.id,
            "expires_at": int(time.time() + self.sim_config.max_session_s),
            "model": requested["model"],
            "status": "active",
            "audio": {"format": fmt, "output": {"voice": voice}},
            "store": requested.get("store") or False,
        }
        for key in _ECHOED:
            if requested.get(key) is not None:
                resource[key] = requested[key]
        return _copy(resource)

    def _on_session_update(self, raw: dict) -> None:
        assert self.config is not None
        patch = raw["session"]
        delegation = patch.get("delegation")
        if delegation is not None:
            current = (self.config.get("delegation") or {}).get("type", "client")
            if delegation["type"] != current:
                message = f"The delegation type cannot change: this session's is '{current}'."
                return self._fail(message, "invalid_value", "session.delegation.type", raw)
            self.config["delegation"] = _merged(self.config.get("delegation") or {}, delegation)
        if patch.get("triggers") is not None:
            self.config["triggers"] = patch["triggers"]
        self.emit("session.updated", session=_copy(self.config), **_answering(raw))

    def _on_session_close(self, raw: dict) -> None:
        self.finish("close_requested", raw.get("event_id"))

    def finish(self, reason: str, client_event_id: str | None = None) -> None:
        """End the session: `session.closed` (reason, final snapshot and usage), then 1000."""
        if self.closing or self.closed:
            return
        self.closing, self.close_reason = True, reason
        active = self.active_reply
        if active is not None:
            self._finish_reply(active, "interrupted", self.audio_ms, report=False)
        self._cancel_tasks()
        extra = {"client_event_id": client_event_id} if client_event_id else {}
        self.emit(
            "session.closed", reason=reason, session=_copy(self.config), usage=self.usage(), **extra
        )
        self.link.close_after_pending(1000, "")

    async def _expire(self) -> None:
        await asyncio.sleep(self.sim_config.max_session_s)
        self.finish("expired")

    def on_closed(self, code: int | None) -> None:
        self.closed, self.closed_at, self.close_code = True, time.monotonic(), code
        if self.close_reason is None:
            self.close_reason = "connection_lost"  # no session.close: the socket went away
        self._cancel_tasks()
        self._notify()

    # -- usage --

    def usage(self) -> dict:
        """Cumulative billable seconds (whole, rounded up: the SDK does not say how)."""
        elapsed = time.monotonic() - (self.started_at or self.opened_at)
        return {"seconds": float(max(1, math.ceil(elapsed)))}

    def _emit_usage(self) -> None:
        extra = {}
        limit = self.sim_config.context_limit_tokens
        if limit:
            extra["context_window"] = {"usage_ratio": round(self._context_tokens() / limit, 4)}
        self.emit("session.usage.updated", usage=self.usage(), **extra)

    def _context_tokens(self) -> int:
        assert self.config is not None
        text = sum(estimate_tokens(item.text) for item in self.history)
        audio = math.ceil(self.audio_ms / 100)  # ~10 tokens per second of input audio
        return estimate_tokens(self.config.get("instructions") or "") + text + audio

    async def _usage_ticker(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self._emit_usage()

    # -- input audio and the model's turn detection --

    def _on_session_input_audio_append(self, raw: dict) -> None:
        self.appends_received += 1
        data = decoded_audio(raw["audio"])
        if data is None:
            return self._fail(NOT_BASE64, "invalid_value", "audio", raw)
        self.push_audio(data)

    def push_audio(self, data: bytes) -> None:
        """Decoded input audio: the timeline advances, the detector listens."""
        fmt = self.format
        self.audio_ms += len(data) / bytes_per_ms(fmt)
        if self.sim_config.record_audio:
            self.input_audio += data
        # Muted input reaches the model as silence; input during a fixture is dropped.
        heard = _silence(fmt, len(data)) if self.muted or self.fixture_active else data
        view, kind = _vad_view(heard, fmt)
        events = self._vad.feed(view, self._vad_ms, kind, self._vad_params)
        self._vad_ms += len(view) / bytes_per_ms({"type": kind, "rate": 24000})
        for event in events:
            self._on_vad(event)

    def _on_vad(self, event: VadEvent) -> None:
        if event.kind == "start":
            self._speech_started(event.ms)
        elif event.kind == "stop":
            self._speech_stopped(event.ms)

    def _speech_started(self, at_ms: float) -> None:
        self._interrupt(at_ms)
        item = LiveItem("user", "", "speech", start_ms=at_ms, end_ms=at_ms)
        item.text = self._caller_said(item)
        self.history.append(item)
        self._turn = _Turn(item)
        self._spawn(self._transcribe(self._turn))

    def _speech_stopped(self, at_ms: float) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        turn.item.end_ms = max(turn.item.start_ms, at_ms - self.sim_config.vad_silence_ms)
        turn.ended_at = asyncio.get_running_loop().time()
        turn.ended.set()
        knob = self._tool_call_for(turn.item)
        if knob is not None:
            self._spawn(self._delegate(turn.item, knob))
        else:
            self.start_reply("speech", turn.item)

    # -- delegated tools (live_tools.py) --

    @property
    def tool_outputs(self) -> list:
        return self.tools.outputs

    @property
    def tool_violations(self) -> list[str]:
        return self.tools.violations

    def _tool_call_for(self, item: LiveItem) -> Any:
        knobs = self.sim_config.tool_calls
        if not knobs or self.config is None:
            return None
        offered = offered_tools(self.config.get("delegation"))
        return self.tools.knob_for(knobs, item.text, offered)

    async def _delegate(self, trigger: LiveItem, knob: Any) -> None:
        """The model hands the caller's request to the Responses backend, which calls the
        function; the client's output and response.create continue it."""
        delegation_id, resp_id = new_id("dlg"), new_id("resp")
        delegation = {"id": delegation_id, "target": "responses", "type": "delegation",
                      "response_id": resp_id}  # fmt: skip
        self.emit("session.delegation.created", delegation=delegation, offset_ms=int(self.audio_ms))
        await asyncio.sleep(self.sim_config.first_audio_latency_ms / 1000)
        call_id = new_id("call")
        self.tools.calls[call_id] = DelegatedCall(knob, delegation_id, trigger)
        stream = function_call_stream(resp_id, self._backend_model() or "", call_id, knob.name,
                                      knob.arguments_json())  # fmt: skip
        for event in stream:
            self.emit("response.event", event=event, delegation_id=delegation_id)

    def _caller_said(self, item: LiveItem) -> str:
        source = self.sim_config.input_transcript
        return source if isinstance(source, str) else source(self, item)

    async def _transcribe(self, turn: _Turn) -> None:
        """The first word soon after the speech starts; the rest after it ends."""
        latency = self.sim_config.transcription_latency_ms / 1000
        item = turn.item
        head, space, tail = item.text.partition(" ")
        head_end = item.start_ms + self.sim_config.vad_start_ms
        await asyncio.sleep(latency)
        if head:
            self._transcript("input", head, item.start_ms, head_end)
        await turn.ended.wait()
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, turn.ended_at + latency - loop.time()))
        if tail:
            self._transcript("input", space + tail, head_end, max(head_end, item.end_ms))

    def _transcript(self, side: str, text: str, start_ms: float, end_ms: float) -> None:
        self.emit(
            f"session.{side}_transcript.delta",
            delta=text,
            start_ms=int(start_ms),
            end_ms=int(end_ms),
        )

    def _on_session_input_audio_mute(self, raw: dict) -> None:
        self.muted = True
        self.emit("session.input_audio.muted", **_answering(raw))

    def _on_session_input_audio_unmute(self, raw: dict) -> None:
        self.muted = False
        self.emit("session.input_audio.unmuted", **_answering(raw))

    # -- the model speaking --

    def start_reply(
        self,
        cause: str,
        trigger: LiveItem | None,
        text: str | None = None,
        latency_ms: float | None = None,
    ) -> LiveReply:
        """The model answers `trigger`: `text`, or the `reply` knob's, after the latency."""
        reply = LiveReply(cause, trigger, self.format, time.monotonic())
        self.replies.append(reply)
        wait = self.sim_config.first_audio_latency_ms if latency_ms is None else latency_ms
        reply.task = self._spawn(self._speak(reply, text, wait))
        return reply

    async def _reply_text(self, trigger: LiveItem | None) -> str:
        fn = self.sim_config.reply
        if fn is None:
            return self.sim_config.reply_text
        text = fn(self, trigger)
        return await text if inspect.isawaitable(text) else text

    async def _speak(self, reply: LiveReply, text: str | None, latency_ms: float) -> None:
        cfg = self.sim_config
        try:
            reply.text = text if text is not None else await self._reply_text(reply.trigger)
        except Exception as exc:  # a broken reply knob: the server's error, in one log line
            log.warning("reply function failed: %r", exc)
            reply.status, reply.done_at = "failed", time.monotonic()
            self.emit("error", error={"type": "server_error", "code": "server_error",
                                      "message": SERVER_ERROR, "param": None})  # fmt: skip
            return
        await asyncio.sleep(max(0.0, latency_ms / 1000 - (time.monotonic() - reply.created_at)))
        reply.duration_ms = self._duration_ms(reply.text)
        audio = voice_audio(reply.format, reply.duration_ms)
        self._open_reply(reply)
        chunks = plan_chunks(audio, reply.format, reply.text, cfg.delta_ms)
        async for chunk in _PacedChunks(chunks, cfg.speed):
            self._send_chunk(reply, chunk)
        self._finish_reply(reply, "completed")

    def _duration_ms(self, text: str) -> int:
        cfg = self.sim_config
        return max(cfg.min_reply_ms, min(cfg.max_reply_ms, int(len(text) * cfg.ms_per_char)))

    def _open_reply(self, reply: LiveReply) -> None:
        reply.status = "speaking"
        reply.start_ms = max(self.audio_ms, self._output_end_ms)
        reply.item = LiveItem(
            "assistant", "", "reply", "in_progress", reply.start_ms, reply.start_ms
        )
        self.history.append(reply.item)

    def _send_chunk(self, reply: LiveReply, chunk: _Chunk) -> None:
        assert reply.start_ms is not None
        if reply.first_audio_at is None:
            reply.first_audio_at = time.monotonic()
        if self.sim_config.record_audio:
            reply.audio += chunk.audio
        start = reply.start_ms + reply.sent_ms
        reply.sent_ms += chunk.ms
        self.emit("session.output_audio.delta", delta=base64.b64encode(chunk.audio).decode())
        if chunk.text:
            reply.sent_text += chunk.text
            self._transcript("output", chunk.text, start, start + chunk.ms)

    def _interrupt(self, at_ms: float) -> None:
        """The caller (or a fixture) takes the floor at `at_ms` of the timeline."""
        spoken = [r for r in self.replies if r.item is not None or r.active]
        reply = spoken[-1] if spoken else None
        if reply is None:
            return
        if reply.active:
            self._finish_reply(reply, "interrupted", at_ms)
        elif reply.item is not None and reply.status == "completed" and reply.item.end_ms > at_ms:
            reply.status = "interrupted"  # sent in full, but still playing on the timeline
            self._cut(reply, at_ms)

    def _finish_reply(
        self, reply: LiveReply, status: str, at_ms: float | None = None, report: bool = True
    ) -> None:
        if not reply.active:
            return
        if reply.task is not None and asyncio.current_task() is not reply.task:
            reply.task.cancel()
        reply.status, reply.done_at = status, time.monotonic()
        if reply.item is None:  # interrupted before its first chunk: nothing was said
            self._notify()
            return
        if status == "completed":
            reply.played_ms = reply.duration_ms
            reply.item.text, reply.item.status = reply.text, "completed"
            reply.item.end_ms = (reply.start_ms or 0.0) + reply.duration_ms
            self._output_end_ms = max(self._output_end_ms, reply.item.end_ms)
        else:
            self._cut(reply, self.audio_ms if at_ms is None else at_ms)
        if report:
            self._emit_usage()
        self._notify()

    def _cut(self, reply: LiveReply, at_ms: float) -> None:
        """Keep what was played before `at_ms` (and sent): the text in proportion."""
        assert reply.item is not None and reply.start_ms is not None
        played = min(reply.sent_ms, max(0.0, at_ms - reply.start_ms))
        reply.played_ms = played
        keep = int(len(reply.text) * played / max(1, reply.duration_ms))
        reply.item.text, reply.item.status = reply.text[:keep], "incomplete"
        reply.item.end_ms = reply.start_ms + played
        self._output_end_ms = reply.item.end_ms

    # -- appended context --

    def _on_session_instructions_append(self, raw: dict) -> None:
        # A silent model acts on new instructions (a greeting asked for this way is spoken,
        # reported ~1.2 s later in aplisay/llm-agent#306); thinking stays silent.
        item = self._append_context(raw, "instructions")
        if item is None or self.active_reply is not None:
            return
        knob = self._tool_call_for(item)  # what it asks for may be a tool's work
        if knob is not None:
            self._spawn(self._delegate(item, knob))
        else:
            self.start_reply("instructions", item)

    def _on_session_thinking_append(self, raw: dict) -> None:
        self._append_context(raw, "thinking")

    def _on_session_commentary_append(self, raw: dict) -> None:
        item = self._append_context(raw, "commentary")
        if item is not None and self.active_reply is None:  # "context the model can communicate"
            self.start_reply("commentary", item)

    def _append_context(self, raw: dict, kind: str) -> LiveItem | None:
        problem = self._context_problem(raw)
        if problem is not None:
            self._fail(*problem, raw)
            return None
        at = int(self.audio_ms)
        item = LiveItem("developer", raw["content"], kind, start_ms=at, end_ms=at)
        self.history.append(item)
        self.emit(f"session.{kind}.appended", start_ms=at, end_ms=at, **_answering(raw))
        return item

    def _context_problem(self, raw: dict) -> tuple[str, str, str | None] | None:
        if self.fixture_active:
            return (
                f"{raw['type']} is rejected while an audio fixture is active.",
                "fixture_active",
                None,
            )
        delegation_id = raw["delegation_id"]
        if delegation_id is not None:
            if self._backend_model() is not None:
                message = "Non-null delegation_id is not accepted with Responses delegation."
                return message, "invalid_value", "delegation_id"
            return (
                f"Unknown delegation_id: '{delegation_id}'.",
                "unknown_delegation",
                "delegation_id",
            )
        tokens = estimate_tokens(raw["content"])
        if tokens > MAX_APPEND_TOKENS:
            error = _over_tokens("content", tokens, MAX_APPEND_TOKENS)
            return error.message, error.code, error.param
        return None

    # -- audio fixtures --

    def _on_session_output_audio_fixture_play(self, raw: dict) -> None:
        if self.fixture_active:
            message = "Only one audio fixture can be active at a time."
            return self._fail(message, "fixture_active", None, raw)
        pcm = decoded_audio(raw["audio"])
        if pcm is None:
            return self._fail(NOT_BASE64, "invalid_value", "audio", raw)
        ms = len(pcm) / 48
        if len(pcm) % 2 or ms > MAX_FIXTURE_MS or not pcm:
            message = (
                "Invalid 'audio': expected raw mono PCM16 little-endian at 24 kHz, "
                f"at most {MAX_FIXTURE_MS // 1000} seconds; got {len(pcm)} bytes."
            )
            return self._fail(message, "invalid_value", "audio", raw)
        self._interrupt(self.audio_ms)  # "model speech is interrupted and input is muted"
        self.fixture_active = True
        self.emit("session.output_audio.fixture.playing", **_answering(raw))
        self._spawn(self._play_fixture(from_pcm24k(pcm, self.format), ms, raw))

    async def _play_fixture(self, audio: bytes, ms: float, raw: dict) -> None:
        start = max(self.audio_ms, self._output_end_ms)
        chunks = plan_chunks(audio, self.format, "", self.sim_config.delta_ms)
        async for chunk in _PacedChunks(chunks, self.sim_config.speed):
            self.emit("session.output_audio.delta", delta=base64.b64encode(chunk.audio).decode())
        self._output_end_ms = start + ms
        self.fixture_active = False
        self.emit("session.output_audio.fixture.played", **_answering(raw))

    # -- the Responses backend (manual turns) --

    def _backend_model(self) -> str | None:
        assert self.config is not None
        delegation = self.config.get("delegation") or {}
        return delegation["responses"]["model"] if delegation.get("type") == "responses" else None

    def _needs_backend(self, raw: dict) -> bool:
        if self._backend_model() is not None:
            return True
        message = (
            f"{raw['type']} requires Responses delegation (session.delegation.type 'responses')."
        )
        self._fail(message, "delegation_required", "type", raw)
        return False

    def _on_response_item_create(self, raw: dict) -> None:
        if not self._needs_backend(raw):
            return
        item = raw["item"]
        if item.get("type") == "function_call_output":
            problem = self.tools.output(item)
            if problem is not None:
                return self._fail(problem, "invalid_value", "item.call_id", raw)
        self.backend_items.append(_copy(item))
        self._notify()

    def _on_response_create(self, raw: dict) -> None:
        if not self._needs_backend(raw):
            return
        if self._backend is not None and not self._backend.done():
            message = "A backend response is already in progress. Wait until it is completed."
            return self._fail(message, "conversation_already_has_active_response", None, raw)
        if self.tools.calls:
            answered = self.tools.answered()
            if not answered:
                message = "Function call outputs are missing for the delegated response."
                self.tools.violations.append(message)
                return self._fail(message, "missing_tool_output", None, raw)
            call = answered[0]
            text = call.knob.answer
            self._backend = self._spawn(
                self._backend_response(call.trigger, raw, text, call.delegation_id)
            )
            return
        users = [i for i in self.backend_items if i.get("role") == "user"]
        trigger = LiveItem("user", _item_text(users[-1]), "backend") if users else None
        self._backend = self._spawn(self._backend_response(trigger, raw))

    async def _backend_response(
        self,
        trigger: LiveItem | None,
        raw: dict,
        text: str | None = None,
        delegation_id: str | None = None,
    ) -> None:
        try:
            text = text if text is not None else await self._reply_text(trigger)
        except Exception as exc:  # a broken reply knob
            log.warning("reply function failed: %r", exc)
            self._fail(SERVER_ERROR, "server_error", None, raw)
            return
        await asyncio.sleep(self.sim_config.first_audio_latency_ms / 1000)
        tokens = sum(estimate_tokens(_item_text(item)) for item in self.backend_items)
        model = self._backend_model() or ""
        delegated = {"delegation_id": delegation_id} if delegation_id else {}
        for event in backend_stream(text, model, tokens):
            self.emit("response.event", event=event, **delegated, **_answering(raw))
        if self.active_reply is None:  # the voice model speaks the answer (an assumption)
            self.start_reply("backend", trigger, text=text, latency_ms=0)

    # -- Decisions: not simulated --

    def _not_simulated(self, raw: dict) -> None:
        self._fail(f"{raw['type']} is not simulated.", "not_simulated", "type", raw)

    _on_decision_create = _not_simulated
    _on_decision_item_create = _not_simulated
    _on_decision_item_delete = _not_simulated


class _PacedChunks:
    """Chunks handed out at `speed` x real time (inf: at once). A class, not an async
    generator: a reply cancelled mid-way leaves no generator for the loop to finalise."""

    def __init__(self, chunks: list[_Chunk], speed: float) -> None:
        self._chunks = iter(chunks)
        self._speed = speed if speed > 0 else math.inf
        self._t0 = asyncio.get_running_loop().time()

    def __aiter__(self) -> _PacedChunks:
        return self

    async def __anext__(self) -> _Chunk:
        chunk = next(self._chunks, None)
        if chunk is None:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._t0 + chunk.offset_ms / 1000 / self._speed - loop.time()))
        return chunk


# ---- aiohttp server ---------------------------------------------------------------------


class LiveSimulator(SimServer):
    """The aiohttp server: `GET /v1/live/sessions` upgraded to a Live session."""

    def __init__(self, config: LiveSimConfig | None = None) -> None:
        super().__init__()
        self.config = config or LiveSimConfig()
        self.sessions: list[LiveSession] = []
        self.attach(self.app)
        self._waits = Waits()
        self._refused = 0

    @property
    def base_url(self) -> str:
        """What `AsyncOpenAI(base_url=...)` takes so `client.live.connect()` lands here."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/live/sessions"

    def attach(self, app: web.Application, prefix: str = "/v1") -> None:
        """Mount the Live route on `app` (another simulator's app may host it)."""
        app.router.add_get(f"{prefix}/live/sessions", self.handle)
        app.on_shutdown.append(self._on_shutdown)

    def warm(self) -> None:
        _warm_up()

    async def _on_shutdown(self, app: web.Application) -> None:
        live = [s for s in self.sessions if not s.closed]
        with contextlib.suppress(Exception):
            await asyncio.gather(*(s.drop(1001, "Server shutting down") for s in live))

    async def wait_for_session(self, timeout: float = 5.0, count: int = 1) -> LiveSession:  # noqa: ASYNC109
        """The `count`-th session (1-based) once it exists."""
        await self._waits.wait(lambda: len(self.sessions) >= count, timeout)
        return self.sessions[count - 1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            body = _openai_error("Missing bearer or basic authentication in header")
            return web.json_response(body, status=401)
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
        session = LiveSession(
            self.config, link, headers=dict(request.headers), query=dict(request.query)
        )
        self.sessions.append(session)
        self._waits.check()
        try:
            await _serve(session, ws)
        finally:
            if link.closing:  # our close frame is out; let the handshake finish
                await asyncio.wait([link.writer], timeout=2.0)
            link.writer.cancel()
            session.on_closed(link.close_code or ws.close_code)
        return ws


async def _serve(session: LiveSession, ws: web.WebSocketResponse) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            session.handle_text(msg.data)
        elif msg.type == WSMsgType.BINARY:
            session.handle_binary(msg.data)
        else:
            break


def _warm_up() -> None:
    """Slow once per process (~1 s): the voice's master clips, the client-event adapter."""
    warm_audio_cache()
    client_event_adapter()


# ---- command line -----------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI GPT-Live simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--latency-ms", type=float, default=300.0, help="first-audio latency")
    parser.add_argument("--speed", type=float, default=4.0, help="x real time (inf: no pacing)")
    parser.add_argument("--delta-ms", type=float, default=125.0, help="audio per delta")
    parser.add_argument("--reply", default=LiveSimConfig.reply_text, help="reply text")
    parser.add_argument("--max-session-s", type=float, default=7200.0)
    parser.add_argument("--no-record", action="store_true", help="don't keep audio (load tests)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    cfg = LiveSimConfig(
        first_audio_latency_ms=args.latency_ms,
        speed=args.speed,
        delta_ms=args.delta_ms,
        reply_text=args.reply,
        max_session_s=args.max_session_s,
        record_audio=not args.no_record,
    )
    sim = LiveSimulator(cfg)
    await serve(sim, args.host, args.port, lambda: [
        f"GPT-Live simulator listening on {sim.ws_url}",
        f"  AsyncOpenAI(api_key='sk-sim', base_url='{sim.base_url}').live.connect()",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    run(_serve_forever(args), args.log_level)


if __name__ == "__main__":
    main()
