"""A Realtime session's state without I/O: its configuration rules, ids, items, responses,
and its function calls with what followed them (`ToolLedger`)."""

from __future__ import annotations

import asyncio
import base64
import os
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from simulators.realtime_audio import bytes_per_ms
from simulators.realtime_config import RealtimeSimConfig, SimToolCall
from simulators.realtime_events import ClientEventError

# ---- session configuration (pure) ------------------------------------------------------

_MERGED_PATHS = frozenset({"audio", "audio.input", "audio.output"})
_CLEARABLE = frozenset(
    {
        "audio.input.turn_detection",
        "audio.input.noise_reduction",
        "audio.input.transcription",
        "tracing",
        "prompt",
    }
)


def server_vad_defaults() -> dict:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }


def semantic_vad_defaults() -> dict:
    return {
        "type": "semantic_vad",
        "eagerness": "auto",
        "create_response": True,
        "interrupt_response": True,
    }


def default_session(model: str, cfg: RealtimeSimConfig, session_id: str) -> dict:
    """The full GA session object the real server sends in `session.created`."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": cfg.instructions,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time() + cfg.max_session_s),
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": server_vad_defaults(),
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": cfg.default_voice,
                "speed": 1.0,
            },
        },
        "include": None,
    }


def merge_session(current: dict, patch: dict, path: str = "") -> dict:
    """Partial update: only sent fields change; `audio`, `audio.input/output` merge deeply.

    null clears only the clearable fields (turn_detection, noise_reduction, transcription,
    tracing, prompt); elsewhere it leaves the value alone.
    """
    out = dict(current)
    for key, value in patch.items():
        sub = f"{path}.{key}".lstrip(".")
        if value is None and sub not in _CLEARABLE:
            continue
        if sub in _MERGED_PATHS and isinstance(out.get(key), dict):
            out[key] = merge_session(out[key], value, sub)
        else:
            out[key] = _normalized(sub, value, out.get(key))
    return out


def _normalized(path: str, value: Any, old: Any) -> Any:
    if path in ("audio.input.format", "audio.output.format"):
        kind = value.get("type") or "audio/pcm"
        return {"type": kind, "rate": 24000} if kind == "audio/pcm" else {"type": kind}
    if path == "audio.input.turn_detection" and value is not None:
        same_type = isinstance(old, dict) and old.get("type") == value["type"]
        base = old if same_type else None
        if base is None:
            base = (
                server_vad_defaults() if value["type"] == "server_vad" else semantic_vad_defaults()
            )
        return {**base, **value}
    return value


def session_rule_violation(
    old: dict, new: dict, audio_out_started: bool
) -> ClientEventError | None:
    """Semantic checks the schema can't express (ranges, frozen fields)."""
    out_old, out_new = old["audio"]["output"], new["audio"]["output"]
    if audio_out_started and out_new.get("voice") != out_old.get("voice"):
        return ClientEventError(
            "Cannot update a conversation's voice if assistant audio is present.",
            code="cannot_update_voice",
            param="session.audio.output.voice",
        )
    if audio_out_started and new.get("model") != old.get("model"):
        return ClientEventError(  # wording modelled on the voice error (unverified)
            "Cannot update a conversation's model if assistant audio is present.",
            code="cannot_update_model",
            param="session.model",
        )
    if old.get("tracing") is not None and new.get("tracing") != old.get("tracing"):
        return ClientEventError(
            "Tracing configuration cannot be modified once enabled.",
            code="invalid_value",
            param="session.tracing",
        )
    modalities = new.get("output_modalities") or ["audio"]
    if sorted(set(modalities)) not in (["audio"], ["text"]):
        return ClientEventError(
            "Invalid 'session.output_modalities': it is not possible to request both "
            "'text' and 'audio' at the same time.",
            code="invalid_value",
            param="session.output_modalities",
        )
    return _range_violation(new)


def _range_violation(new: dict) -> ClientEventError | None:
    turn = new["audio"]["input"].get("turn_detection") or {}
    checks = [
        ("session.audio.output.speed", new["audio"]["output"].get("speed"), 0.25, 1.5),
        ("session.audio.input.turn_detection.threshold", turn.get("threshold"), 0.0, 1.0),
    ]
    tokens = new.get("max_output_tokens")
    if isinstance(tokens, int):
        checks.append(("session.max_output_tokens", tokens, 1, 4096))
    for param, value, low, high in checks:
        if value is None or low <= value <= high:
            continue
        kind = "integer" if isinstance(value, int) else "decimal"
        side, bound, sign = (
            ("above", "maximum", "<=") if value > high else ("below", "minimum", ">=")
        )
        limit = high if value > high else low
        return ClientEventError(
            f"Invalid '{param}': {kind} {side} {bound} value. "
            f"Expected a value {sign} {limit}, but got {value} instead.",
            code=f"{kind}_{side}_{'max' if value > high else 'min'}_value",
            param=param,
        )
    return None


# ---- conversation (no I/O) -------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 21) -> str:
    """`event_XXXXXXXXXXXXXXXXXXXXX`-style ids: prefix + 21 base62 characters."""
    n = int.from_bytes(os.urandom(16), "big")
    chars = []
    for _ in range(length):
        n, r = divmod(n, 62)
        chars.append(_ID_ALPHABET[r])
    return f"{prefix}_{''.join(chars)}"


def new_call_id() -> str:
    """A function call's id as the real server makes them: `call_` + 16 base62 characters."""
    return new_id("call", 16)


def _is_assistant_audio(item: dict) -> bool:
    parts = item.get("content") or [] if item.get("role") == "assistant" else []
    return any(part.get("type") == "output_audio" for part in parts)


def _copy(data: Any) -> Any:
    return orjson.loads(orjson.dumps(data))  # fast deep copy of JSON data


@dataclass
class ConvItem:
    """A conversation item: its public JSON (without audio) plus the audio bytes."""

    id: str
    data: dict
    audio: bytearray = field(default_factory=bytearray)
    audio_format: str | None = None
    full_transcript: str = ""  # assistant: the whole planned transcript (for truncation)
    full_audio_ms: float = 0.0  # assistant: the whole planned audio length
    response_id: str | None = None
    heard: str | None = None  # user: what the caller said, as the model heard it

    @property
    def role(self) -> str | None:
        return self.data.get("role")

    @property
    def kind(self) -> str | None:
        """The item's `type`: message, function_call or function_call_output."""
        return self.data.get("type")

    @property
    def audio_ms(self) -> float:
        return len(self.audio) / bytes_per_ms(self.audio_format) if self.audio_format else 0.0

    def public(self) -> dict:
        return _copy(self.data)

    def with_audio(self) -> dict:
        data = self.public()
        for part in data.get("content", []):
            if part.get("type") in ("input_audio", "output_audio"):
                part["audio"] = base64.b64encode(self.audio).decode()
        return data

    def text(self) -> str:
        """All text/transcripts of the item (a function call's arguments, a function call
        output's output), for token estimates and reply functions."""
        if self.kind == "function_call":
            return str(self.data.get("arguments") or "")
        if self.kind == "function_call_output":
            return str(self.data.get("output") or "")
        parts = self.data.get("content") or []
        return " ".join(str(p.get("text") or p.get("transcript") or "") for p in parts)


class Conversation:
    """Ordered items with insertion after a given item (`previous_item_id`)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.items: dict[str, ConvItem] = {}

    def __iter__(self) -> Iterator[ConvItem]:
        return (self.items[i] for i in self.order)

    def __len__(self) -> int:
        return len(self.order)

    def get(self, item_id: str) -> ConvItem | None:
        return self.items.get(item_id)

    def last_id(self) -> str | None:
        return self.order[-1] if self.order else None

    def insert(self, item: ConvItem, previous_item_id: str | None = None) -> str | None:
        """Insert; returns the id of the item now before it. KeyError if unknown."""
        if previous_item_id is None:
            previous = self.last_id()
            self.order.append(item.id)
        elif previous_item_id == "root":
            previous = None
            self.order.insert(0, item.id)
        else:
            index = self.order.index(previous_item_id) if previous_item_id in self.items else -1
            if index < 0:
                raise KeyError(previous_item_id)
            previous = previous_item_id
            self.order.insert(index + 1, item.id)
        self.items[item.id] = item
        return previous

    def remove(self, item_id: str) -> None:
        self.order.remove(item_id)
        del self.items[item_id]

    def last_user_item(self) -> ConvItem | None:
        for item_id in reversed(self.order):
            if self.items[item_id].role == "user":
                return self.items[item_id]
        return None

    def last_input_item(self) -> ConvItem | None:
        """The newest user message or function_call_output: what a response answers."""
        for item_id in reversed(self.order):
            item = self.items[item_id]
            if item.role == "user" or item.kind == "function_call_output":
                return item
        return None

    def function_call(self, call_id: str) -> ConvItem | None:
        """The function_call item with `call_id` (the model's or one the client created)."""
        for item in self.items.values():
            if item.kind == "function_call" and item.data.get("call_id") == call_id:
                return item
        return None


# ---- responses -------------------------------------------------------------------------


@dataclass
class SimResponse:
    """One model response and what it actually streamed."""

    id: str
    in_conversation: bool  # False for out-of-band (`conversation: "none"`)
    modality: str  # "audio" | "text"
    format: dict
    voice: Any
    max_output_tokens: int | str
    metadata: dict | None
    instructions: str
    created_at: float
    status: str = "in_progress"
    status_details: dict | None = None
    item: ConvItem | None = None
    stage: str = "created"  # created -> item -> part (-> spoken: before calls) -> finished
    text: str = ""  # planned text/transcript
    sent_text: str = ""  # transcript/text streamed so far
    audio_sent: int = 0  # bytes of audio streamed
    first_audio_at: float | None = None  # the first audio delta (a text reply: text delta)
    first_audio_timeline_ms: float | None = None
    done_at: float | None = None
    usage: dict | None = None
    task: asyncio.Task | None = field(default=None, repr=False)
    outputs: list[ConvItem] = field(default_factory=list)  # output items, by output_index
    answers_tool_output: bool = False  # its trigger is a function_call_output
    tool_calls: list[SimToolCall] = field(default_factory=list)  # the knobs it will call
    calls: list[ToolCallRecord] = field(default_factory=list)  # the calls it streamed
    open_call: ConvItem | None = None  # the function_call item whose arguments stream now

    @property
    def item_id(self) -> str | None:
        return self.item.id if self.item else None

    @property
    def audio(self) -> bytes:
        """Audio bytes generated for the response's item (in `format`)."""
        return bytes(self.item.audio) if self.item else b""

    @property
    def audio_ms(self) -> float:
        return self.audio_sent / bytes_per_ms(self.format["type"])

    @property
    def active(self) -> bool:
        return self.status == "in_progress"


@dataclass
class Timed:
    """An event with the monotonic time it was received or sent."""

    at: float
    event: dict


# ---- function calls (no I/O) -----------------------------------------------------------


@dataclass
class ToolCallRecord:
    """A function call the simulated model made, and the output the client gave it."""

    call_id: str
    name: str
    arguments: str  # as planned; the item holds what was streamed
    item_id: str
    response_id: str
    started_at: float  # response.output_item.added
    status: str = "in_progress"  # completed once its arguments are done; incomplete if cut
    done_at: float | None = None  # response.function_call_arguments.done
    output: str | None = None
    output_at: float | None = None


class ToolOutput(NamedTuple):
    """A function_call_output the client created for a known call."""

    call_id: str
    name: str
    output: str
    at: float


@dataclass
class ToolViolation:
    """Something the client did around a function call that the real server lets pass (the
    model just goes on without the result) but that is a bug in the client."""

    kind: str  # one of ToolLedger's kinds
    call_id: str
    detail: str
    at: float


@dataclass
class RefusedToolCall:
    """A knob's function call the session did not allow, so the model did not make it."""

    name: str
    reason: str  # "not offered", "tool_choice is 'none'", "tool_choice forces 'x'"
    response_id: str
    at: float


@dataclass(frozen=True)
class OfferedTools:
    """The functions a response may call: its own `tools`/`tool_choice` or the session's."""

    names: frozenset[str]
    choice: Any  # "auto" | "none" | "required" | {"type": "function", "name": ...} | mcp
    parallel: bool

    @classmethod
    def of(cls, params: dict, session: dict) -> OfferedTools:
        tools = params["tools"] if params.get("tools") is not None else session.get("tools")
        names = {t.get("name") for t in tools or [] if t.get("type", "function") == "function"}
        choice = params.get("tool_choice") or session.get("tool_choice") or "auto"
        parallel = params.get("parallel_tool_calls")
        if parallel is None:
            parallel = session.get("parallel_tool_calls")
        return cls(frozenset(n for n in names if n), choice, parallel is not False)

    def refusal(self, name: str) -> str | None:
        """Why the model could not call `name`, or None if it may."""
        if name not in self.names:
            return "not offered"
        if self.choice == "none":
            return "tool_choice is 'none'"
        if isinstance(self.choice, dict) and self.choice.get("name") != name:
            return f"tool_choice forces '{self.choice.get('name') or self.choice.get('type')}'"
        return None


class ToolLedger:
    """A session's function calls and what followed them.

    The real server checks only that a function_call_output names a call in the
    conversation (else `invalid_tool_call_id`); everything else a client can get wrong
    (no output, no response.create after it, the caller's next turn first) it lets pass
    and the model goes on without the result. Those are recorded here as violations, one
    per kind and call, for tests to read.
    """

    RESPONSE_BEFORE_OUTPUT = "response_before_output"  # response.create, a call unanswered
    TURN_BEFORE_OUTPUT = "turn_before_output"  # the caller's next turn, a call unanswered
    OUTPUT_WITHOUT_RESPONSE = "output_without_response"  # an output, then no response.create
    NO_OUTPUT_AT_CLOSE = "no_output_at_close"  # the session closed, a call unanswered
    UNKNOWN_CALL_ID = "unknown_call_id"  # an output for no call in the conversation
    DUPLICATE_OUTPUT = "duplicate_output"  # a second output for one call

    def __init__(self) -> None:
        self.calls: list[ToolCallRecord] = []
        self.outputs: list[ToolOutput] = []
        self.violations: list[ToolViolation] = []
        self.refused: list[RefusedToolCall] = []
        self._spent: set[int] = set()  # id() of `once` knobs already used
        self._unanswered: list[ToolOutput] = []  # outputs no response.create has followed
        self._flagged: set[tuple[str, str]] = set()

    def choose(
        self,
        knobs: list[SimToolCall],
        offered: OfferedTools,
        matches: Callable[[SimToolCall], bool],
        response_id: str,
        now: float,
    ) -> list[SimToolCall]:
        """The knobs a response calls; refusals recorded, `once` knobs spent."""
        chosen: list[SimToolCall] = []
        for knob in knobs:
            if id(knob) in self._spent or not matches(knob):
                continue
            reason = offered.refusal(knob.name)
            if reason is None and chosen and not offered.parallel:
                continue  # one call per response: this one waits for a later response
            if knob.once:
                self._spent.add(id(knob))
            if reason is None:
                chosen.append(knob)
            else:
                self.refused.append(RefusedToolCall(knob.name, reason, response_id, now))
        return chosen

    def outstanding(self) -> list[ToolCallRecord]:
        """Calls whose arguments were done and that have no output yet."""
        return [c for c in self.calls if c.status == "completed" and c.output is None]

    def output(self, call_id: str, name: str, output: str, now: float) -> ToolOutput:
        record = next((c for c in self.calls if c.call_id == call_id), None)
        if record is not None and record.output is not None:
            detail = f"a second function_call_output for {name}"
            self._violate(self.DUPLICATE_OUTPUT, call_id, detail, now, once=False)
        elif record is not None:
            record.output, record.output_at = output, now
        received = ToolOutput(call_id, name, output, now)
        self.outputs.append(received)
        self._unanswered.append(received)
        return received

    def unknown_output(self, call_id: str, now: float) -> None:
        detail = "function_call_output for a call_id not in the conversation"
        self._violate(self.UNKNOWN_CALL_ID, call_id, detail, now, once=False)

    def response_requested(self, now: float) -> None:
        """The client's response.create for the default conversation was accepted."""
        for call in self.outstanding():
            detail = f"response.create while {call.name} had no function_call_output"
            self._violate(self.RESPONSE_BEFORE_OUTPUT, call.call_id, detail, now)
        self._unanswered.clear()

    def turn_started(self, what: str, now: float) -> None:
        """The caller's next turn began (speech, a commit, a user item)."""
        self._left_behind(what, self.TURN_BEFORE_OUTPUT, now)

    def closed(self, now: float) -> None:
        self._left_behind("the session closed", self.NO_OUTPUT_AT_CLOSE, now)

    def _left_behind(self, what: str, kind: str, now: float) -> None:
        for call in self.outstanding():
            self._violate(kind, call.call_id, f"{what} while {call.name} had no output", now)
        for out in self._unanswered:
            detail = f"{what} before a response.create followed the output of {out.name}"
            self._violate(self.OUTPUT_WITHOUT_RESPONSE, out.call_id, detail, now)
        self._unanswered.clear()

    def _violate(self, kind: str, call_id: str, detail: str, now: float, once: bool = True) -> None:
        if once and (kind, call_id) in self._flagged:
            return
        self._flagged.add((kind, call_id))
        self.violations.append(ToolViolation(kind, call_id, detail, now))
