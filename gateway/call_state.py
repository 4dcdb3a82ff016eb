"""The call's protocol core, without I/O: Twilio and Realtime events in, actions out.

Twilio Media Streams on one side (mu-law 8 kHz frames, marks, clear), the Realtime API
on the other (`audio/pcmu` both ways, so payloads pass through untouched). The handler
in `calls.py` only moves messages and carries out actions; everything that decides lives
here, driven by an explicit clock so tests run without sockets or sleeps.

A call has an explicit phase, in the manner of h11's `Connection`:

    WAITING_FOR_START -> STREAMING -> ENDING -> ENDED

and its upstream has its own (OPENING -> LIVE -> RECONNECTING -> LIVE ... -> GONE). Every
field read from either side is checked: a bad value is a `ProtocolError` action the call
survives (or, where nothing sensible can go on, a clean end); no exception leaves the core.
Clock-driven decisions (session rotation before the 60-minute cap, the stall watchdog, the
reconnect backoff, the bounded wait for the last transcripts at the end) come out as actions.

Each delta's whole 160-byte frames go out as one Twilio `media` message followed by one
`mark`. Twilio echoes a mark when the audio before it has played, and plays at exactly
8 bytes per ms, so the position inside the chunk now playing follows from the time since
the previous echo: on barge-in we know what the caller heard to a few ms, and truncate the
model's memory of its own reply to exactly that. (A mark per frame would give the same
precision with twice the messages and an echo every 20 ms.)
"""

from __future__ import annotations

import binascii
import bisect
import enum
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.bridge import LinkPolicy
from gateway.tool_flow import AfterPlayback, ToolFlow
from gateway.tools import ToolCall
from gateway.transcode import FRAME_BYTES, MULAW_BYTES_PER_MS, FrameChunker

log = logging.getLogger(__name__)

# Codes the real server sends in normal operation that need no reaction.
BENIGN_ERRORS = frozenset(
    {"response_cancel_not_active", "conversation_already_has_active_response"}
)
TRANSCRIPT_GRACE_S = 1.5  # at the end, how long the caller's last words may take to arrive
ROTATION_RETRY_S = 30.0
MAX_PRE_START_BYTES = 30_000 * MULAW_BYTES_PER_MS  # greeting audio held until Twilio's start
DTMF_DIGITS = frozenset("0123456789*#ABCD")


class Phase(enum.Enum):
    WAITING_FOR_START = "waiting_for_start"
    STREAMING = "streaming"
    ENDING = "ending"  # the phone is closed; the caller's last transcript may still come
    ENDED = "ended"


class Upstream(enum.Enum):
    OPENING = "opening"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    GONE = "gone"


@dataclass(slots=True)
class SendTwilio:
    message: dict[str, Any]


@dataclass(slots=True)
class SendRealtime:
    event: dict[str, Any]


@dataclass(slots=True)
class SendRealtimeRaw:
    """A pre-serialized event: the 50-a-second audio append skips dict and re-encoding."""

    data: bytes


@dataclass(slots=True)
class EndCall:
    """Close the Twilio socket; the TwiML's <Say> after <Connect> apologises if needed."""

    reason: str


@dataclass(slots=True)
class OpenUpstream:
    """Open a new Realtime session (with the call's transcript) after `delay_s`.

    `replace`: the current one is dead (reconnect); otherwise it is still live and is closed
    once the new one has taken over (rotation before the time cap)."""

    delay_s: float
    reason: str
    replace: bool = True


@dataclass(slots=True)
class CloseUpstream:
    reason: str


@dataclass(slots=True)
class ProtocolError:
    """A message from Twilio or OpenAI the core could not use; the call goes on."""

    source: str  # twilio | realtime
    detail: str


@dataclass(slots=True)
class RecordTurn:
    role: str  # user | assistant | dtmf
    text: str
    audio_ms: int | None = None
    response_latency_ms: float | None = None
    upstream_first_audio_ms: float | None = None


@dataclass(slots=True)
class RecordUsage:
    response_id: str | None
    usage: dict[str, Any]
    audio_ms: int = 0  # reply audio the model generated for this response


@dataclass(slots=True)
class UpstreamError:
    code: str | None
    message: str


@dataclass(slots=True)
class RunTool:
    """The model called a function: carry it out, then hand `tool_finished` its output."""

    call: ToolCall


@dataclass(slots=True)
class ActOnCall:
    """The model's last sentence has played: hang up or transfer the call (Twilio REST)."""

    after: AfterPlayback


Action = (
    SendTwilio
    | SendRealtime
    | SendRealtimeRaw
    | EndCall
    | OpenUpstream
    | CloseUpstream
    | ProtocolError
    | RecordTurn
    | RecordUsage
    | UpstreamError
    | RunTool
    | ActOnCall
)


class _Bad(Exception):
    """A field of an incoming message has the wrong shape."""


def _obj(parent: dict[str, Any], key: str, required: bool = True) -> dict[str, Any]:
    value = parent.get(key)
    if isinstance(value, dict):
        return value
    if value is None and not required:
        return {}
    raise _Bad(f"{key} is {type(value).__name__}, not an object")


def _text(parent: dict[str, Any], key: str, required: bool = True) -> str:
    value = parent.get(key)
    if isinstance(value, str):
        return value
    if value is None and not required:
        return ""
    raise _Bad(f"{key} is {type(value).__name__}, not a string")


def _whole(parent: dict[str, Any], key: str) -> int:
    value = parent.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Bad(f"{key} is {value!r}, not a whole number")


def _b64(value: str, what: str) -> bytes:
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except ValueError as err:  # binascii.Error, or a character that is not ASCII
        raise _Bad(f"{what} is not base64 ({err})") from None


@dataclass(slots=True)
class _Mark:
    number: int
    item_id: str
    item_bytes_start: int  # where in the item the chunk before this mark begins
    item_bytes_end: int  # bytes of this item on the phone once this mark is echoed


@dataclass(slots=True)
class _Item:
    """An assistant audio item as it flows to the phone."""

    item_id: str
    response_id: str
    received: int = 0  # bytes of audio the model sent us
    queued: int = 0  # bytes handed to Twilio (whole frames)
    played: int = 0  # bytes Twilio confirmed played (echoed marks)
    text: str | None = None  # the model's transcript of the item, once it is whole
    partial: str = ""  # the transcript so far, from its deltas
    cut: bool = False  # its session was lost before the reply was whole
    audio_done: bool = False
    recorded: bool = False
    timing: TurnTiming | None = None


@dataclass(slots=True)
class TurnTiming:
    """One caller turn, wall-clock seconds from the injected clock."""

    end_of_speech: float  # the caller stopped talking: speech_stopped.audio_end_ms - silence
    speech_stopped_at: float  # the server's VAD said so (end_of_speech + silence window)
    first_delta_at: float | None = None
    first_frame_at: float | None = None

    @property
    def response_latency_ms(self) -> float | None:
        if self.first_frame_at is None:
            return None
        return (self.first_frame_at - self.end_of_speech) * 1000

    @property
    def upstream_first_audio_ms(self) -> float | None:
        if self.first_delta_at is None:
            return None
        return (self.first_delta_at - self.speech_stopped_at) * 1000

    @property
    def gateway_ms(self) -> float | None:
        if self.first_frame_at is None or self.first_delta_at is None:
            return None
        return (self.first_frame_at - self.first_delta_at) * 1000


@dataclass
class CallState:
    """State of one call from the pre-opened Realtime session to hang-up."""

    policy: LinkPolicy = field(default_factory=LinkPolicy)
    expected_format: str = "audio/pcmu"
    transcript_grace_s: float = TRANSCRIPT_GRACE_S
    phase: Phase = Phase.WAITING_FOR_START
    upstream: Upstream = Upstream.OPENING
    stream_sid: str | None = None
    call_sid: str | None = None
    started_at: float | None = None
    greeting_ms: float | None = None
    transcript: list[tuple[str, str]] = field(default_factory=list)
    turns: list[TurnTiming] = field(default_factory=list)
    frames_sent: int = 0
    reconnects: int = 0
    rotations: int = 0
    interrupt_response: bool = True
    vad_silence_ms: int = 0
    # GPT-Live decides when the caller is done, and says so only by answering: its wait
    # counts as the upstream's share of the turn, from the end of speech.
    model_owns_turns: bool = False
    caller_speaking: bool = False
    # The head of each audio frame's event: Realtime's append, or GPT-Live's (live_dialect).
    append_head: bytes = b'{"type":"input_audio_buffer.append","audio":'

    def __post_init__(self) -> None:
        self._chunker = FrameChunker(FRAME_BYTES)
        self._items: dict[str, _Item] = {}
        self._marks: deque[_Mark] = deque()
        self._mark_seq = 0
        self._pre_start: list[tuple[_Item, bytes]] = []  # chunks made before Twilio's start
        self._pre_start_bytes = 0
        self._playing_since: float | None = None  # when the chunk at _marks[0] began playing
        self._active_response: str | None = None
        self._dropped_responses: set[str] = set()
        self._superseded: set[str] = set()  # responses of replaced sessions (unknown upstream)
        self._appended_bytes = 0
        self._append_ends: list[int] = []  # cumulative appended ms, for speech_stopped alignment
        self._append_times: list[float] = []
        self._pending_turn: TurnTiming | None = None
        # upstream lifecycle
        self._rotate_at = float("inf")  # when the session is old enough to be replaced
        self._attempt = 0  # reconnects since the upstream last proved alive
        self._rotating = False
        self._rotate_not_before = 0.0
        self._owed: set[str] = set()  # what the upstream owes us: session, response, done
        self._heard_from_upstream = 0.0
        # the end
        self._ending_deadline = 0.0
        self._awaiting_commit = False  # speech stopped: a committed item and its words follow
        self._untranscribed: set[str] = set()  # committed caller items without their words yet
        self.tools = ToolFlow()

    @property
    def appended_ms(self) -> int:
        """The caller's audio sent to this session so far: the session's input timeline."""
        return self._appended_bytes // MULAW_BYTES_PER_MS

    @property
    def ended(self) -> bool:
        """The phone side is finished (ENDING or ENDED)."""
        return self.phase in (Phase.ENDING, Phase.ENDED)

    # Twilio side
    def on_twilio(self, msg: Any, now: float) -> list[Action]:
        try:
            if type(msg) is not dict:
                raise _Bad(f"message is {type(msg).__name__}, not an object")
            kind = msg.get("event")
            if kind == "media":  # 50 a second: checked inline, cheapest first
                if self.phase is not _STREAMING:
                    return []
                actions = self._on_media(msg, now)
                return self._clock(now, actions) if self.upstream is _LIVE else actions
            if self.ended:
                return []
            if kind == "mark":
                return self._on_mark(msg, now)
            if kind == "start":
                return self._on_start(msg, now)
            if kind == "dtmf":
                return self._on_dtmf(msg)
            if kind == "stop":
                return self.end(now, "caller hung up")
            return []  # connected, and events Twilio may add later
        except _Bad as bad:
            return [ProtocolError("twilio", f"{_kind(msg, 'event')}: {bad}")]

    def _on_start(self, msg: dict[str, Any], now: float) -> list[Action]:
        if self.phase is not Phase.WAITING_FOR_START:
            raise _Bad("a second start")
        start = _obj(msg, "start")
        sid = _text(msg, "streamSid", required=False) or _text(start, "streamSid", False)
        if not sid:
            return [ProtocolError("twilio", "start: no streamSid"), *self.end(now, "bad start")]
        self.stream_sid = sid
        self.call_sid = _text(start, "callSid", required=False) or self.call_sid
        self.started_at = now
        self.phase = Phase.STREAMING
        actions: list[Action] = []
        for item, chunk in self._pre_start:
            actions += self._chunk_actions(item, chunk, now)
        self._pre_start.clear()
        return actions

    def _on_media(self, msg: dict[str, Any], now: float) -> list[Action]:
        media = msg.get("media")
        if type(media) is not dict:
            raise _Bad(f"media is {type(media).__name__}, not an object")
        payload = media.get("payload")
        if type(payload) is not str:
            raise _Bad(f"media.payload is {type(payload).__name__}, not a string")
        track = media.get("track")
        if (track is not None and track != "inbound") or not payload:
            return []
        size = len(_b64(payload, "media.payload"))
        if self.upstream is not _LIVE:
            return []  # nobody to hear it, and nothing billed while we reconnect
        self._appended_bytes += size
        self._append_ends.append(self._appended_bytes // MULAW_BYTES_PER_MS)
        self._append_times.append(now)
        if len(self._append_ends) > 4096:  # ~80 s of alignment history is plenty
            del self._append_ends[:2048], self._append_times[:2048]
        return [SendRealtimeRaw(self.append_head + orjson.dumps(payload) + b"}")]

    def _on_dtmf(self, msg: dict[str, Any]) -> list[Action]:
        digit = _text(_obj(msg, "dtmf"), "digit")
        if digit not in DTMF_DIGITS:
            raise _Bad(f"digit {digit[:8]!r}")
        return [RecordTurn("dtmf", digit)]

    def _on_mark(self, msg: dict[str, Any], now: float) -> list[Action]:
        name = _text(_obj(msg, "mark"), "name")
        if not (name.isascii() and name.isdigit() and len(name) <= 20):
            return []  # not one of ours ("²" is a digit to isdigit, not to int)
        number = int(name)
        # Marks cleared by a barge-in come back too; they are older than anything pending.
        finished: list[Action] = []
        while self._marks and self._marks[0].number <= number:
            mark = self._marks.popleft()
            item = self._items.get(mark.item_id)
            if item is not None:
                item.played = max(item.played, mark.item_bytes_end)
                finished += self._maybe_record(item)
            # The next queued chunk starts playing as this one ends.
            self._playing_since = now if self._marks else None
        return finished + self._act_if_due()

    # Realtime side
    def on_realtime(self, event: Any, now: float) -> list[Action]:
        try:
            if not isinstance(event, dict):
                raise _Bad(f"event is {type(event).__name__}, not an object")
            kind = event.get("type")
            if self.phase is Phase.ENDED or not isinstance(kind, str):
                return []
            self._heard_from_upstream = now
            if kind == "session.updated":  # answered, even if its content turns out unusable
                self._owed.discard("session")
            if self.phase is Phase.ENDING:
                handler = _ENDING_HANDLERS.get(kind)
                actions = handler(self, event, now) if handler else []
                return actions + self._finish_if_settled()
            handler = _REALTIME_HANDLERS.get(kind)
            return handler(self, event, now) if handler else []
        except _Bad as bad:
            return [ProtocolError("realtime", f"{_kind(event, 'type')}: {bad}")]

    def _on_session_updated(self, event: dict[str, Any], now: float) -> list[Action]:
        audio = _obj(_obj(event, "session"), "audio")
        audio_in, audio_out = _obj(audio, "input"), _obj(audio, "output")
        formats = (
            _text(_obj(audio_in, "format"), "type"),
            _text(_obj(audio_out, "format"), "type"),
        )
        turn = _obj(audio_in, "turn_detection", required=False)
        self.interrupt_response = turn.get("interrupt_response") is True
        self.model_owns_turns = turn.get("type") == "live"
        silence = turn.get("silence_duration_ms")
        self.vad_silence_ms = silence if isinstance(silence, int) and silence > 0 else 0
        self._attempt = 0  # a session that answers is alive: the backoff starts over
        if formats != (self.expected_format, self.expected_format):
            log.error("session formats %s, expected %s: ending call", formats, self.expected_format)
            return self.end(now, f"upstream audio format {formats} is not {self.expected_format}")
        return []

    def _on_response_created(self, event: dict[str, Any], now: float) -> list[Action]:
        self._active_response = _text(_obj(event, "response"), "id")
        self.tools.on_response_created(self._active_response)
        self._owed.discard("response")
        self._owe("done", now)
        return []

    def _on_response_done(self, event: dict[str, Any], now: float) -> list[Action]:
        self._owed.difference_update(("response", "done"))  # whichever it was, it is over
        response = _obj(event, "response")
        rid = _text(response, "id", required=False) or None
        if rid == self._active_response:
            self._active_response = None
        actions = self._send_all(self.tools.on_response_done(rid), now) + self._act_if_due()
        usage = response.get("usage")
        if not usage:
            return actions
        if not isinstance(usage, dict):
            raise _Bad("response.usage is not an object")
        audio = sum(i.received for i in self._items.values() if i.response_id == rid)
        return [RecordUsage(rid, usage, audio // MULAW_BYTES_PER_MS), *actions]

    def _on_delegated_created(self, event: dict[str, Any], now: float) -> list[Action]:
        self.tools.on_response_created(_text(event, "response_id"))
        return []

    def _on_function_call(self, event: dict[str, Any], now: float) -> list[Action]:
        call = self.tools.on_arguments_done(event)
        if call is None:
            raise _Bad("no usable call_id, name and response_id")
        return [RunTool(call)]

    def tool_finished(
        self, call_id: str, output: str, now: float, after: AfterPlayback | None = None
    ) -> list[Action]:
        """A tool the model called is done: its output goes back, and the model answers."""
        if self.ended:
            return []
        events = self.tools.finished(call_id, output, after)
        if self.upstream is not _LIVE:  # its session is gone; the next one has the transcript
            return self._act_if_due()
        return self._send_all(events, now) + self._act_if_due()

    def _send_all(self, events: list[dict[str, Any]], now: float) -> list[Action]:
        if any(e["type"] == "response.create" for e in events):
            self._owe("response", now)
        return [SendRealtime(e) for e in events]

    def _act_if_due(self) -> list[Action]:
        if self.ended:
            return []
        after = self.tools.due(playback_pending=bool(self._marks or self._pre_start))
        return [ActOnCall(after)] if after is not None else []

    def _on_audio_delta(self, event: dict[str, Any], now: float) -> list[Action]:
        self._owed.discard("response")  # it is streaming, whatever response.created said
        response_id = _text(event, "response_id")
        item_id = _text(event, "item_id")
        audio = _b64(_text(event, "delta"), "delta")
        if response_id in self._dropped_responses:
            return []
        item = self._item_for(item_id, response_id)
        item.received += len(audio)
        turn = self._pending_turn
        if turn is not None and turn.first_delta_at is None:
            turn.first_delta_at = now
            item.timing, self._pending_turn = turn, None
        whole = self._chunker.take(audio)
        return self._emit_chunk(item, whole, now) if whole else []

    def _on_audio_done(self, event: dict[str, Any], now: float) -> list[Action]:
        item = self._items.get(_text(event, "item_id"))
        if item is None or _text(event, "response_id", False) in self._dropped_responses:
            return []
        item.audio_done = True
        tail = self._chunker.flush()
        return self._emit_chunk(item, tail, now) if tail else self._maybe_record(item)

    def _on_transcript_done(self, event: dict[str, Any], now: float) -> list[Action]:
        item = self._items.get(_text(event, "item_id"))
        text = _text(event, "transcript", required=False)
        if item is None:
            return []
        item.text = text
        if self.phase is Phase.ENDING:  # the phone is gone: keep what it had played
            return [] if item.recorded else self._record_assistant(item, _heard_part(item))
        return self._maybe_record(item)

    def _on_transcript_delta(self, event: dict[str, Any], now: float) -> list[Action]:
        response_id = _text(event, "response_id")
        item_id = _text(event, "item_id")
        delta = _text(event, "delta")
        if response_id not in self._dropped_responses:
            item = self._item_for(item_id, response_id)
            if len(item.partial) < 20_000:
                item.partial += delta
        return []

    def _maybe_record(self, item: _Item) -> list[Action]:
        """An assistant turn is recorded once the phone has played all of it."""
        if item.recorded or item.text is None or not item.audio_done:
            return []
        if item.played < item.queued or (self.stream_sid is None and item.queued == 0):
            return []
        return self._record_assistant(item, item.text)

    def _record_assistant(self, item: _Item, text: str) -> list[Action]:
        item.recorded = True
        if not text:
            return []
        if item.cut and not text.endswith("…"):
            text = f"{text.rstrip()}…"
        self.transcript.append(("assistant", text))
        timing = item.timing
        return [
            RecordTurn(
                "assistant",
                text,
                audio_ms=item.played // MULAW_BYTES_PER_MS,
                response_latency_ms=timing.response_latency_ms if timing else None,
                upstream_first_audio_ms=timing.upstream_first_audio_ms if timing else None,
            )
        ]

    def _on_committed(self, event: dict[str, Any], now: float) -> list[Action]:
        self._awaiting_commit = False
        self._untranscribed.add(_text(event, "item_id"))
        if len(self._untranscribed) > 32:  # transcription is off or lost: forget the oldest
            self._untranscribed.pop()
        return []

    def _on_user_transcript(self, event: dict[str, Any], now: float) -> list[Action]:
        self._untranscribed.discard(_text(event, "item_id", required=False))
        text = _text(event, "transcript", required=False).strip()
        if not text:
            return []
        self.transcript.append(("user", text))
        return [RecordTurn("user", text)]

    def _on_transcription_failed(self, event: dict[str, Any], now: float) -> list[Action]:
        self._untranscribed.discard(_text(event, "item_id", required=False))
        return []

    def _on_speech_started(self, event: dict[str, Any], now: float) -> list[Action]:
        self.caller_speaking = True
        actions: list[Action] = []
        if self._active_response is not None:
            self._dropped_responses.add(self._active_response)
            if not self.interrupt_response:  # otherwise the server has cancelled it already
                actions.append(SendRealtime({"type": "response.cancel"}))
        if not self._marks:
            return actions  # nothing is playing: the caller heard the whole reply
        playing = self._marks[0]
        item = self._items.get(playing.item_id)
        actions.append(SendTwilio({"event": "clear", "streamSid": self.stream_sid}))
        if item is not None:
            item.played = max(item.played, self._position_in(playing, now))
        self._marks.clear()
        self._playing_since = None
        self._chunker.reset()
        if item is not None:
            actions += self._forget_unheard(item)
            if not item.recorded and _words(item):
                actions += self._record_assistant(item, _heard_part(item))
        return actions

    def _forget_unheard(self, item: _Item) -> list[Action]:
        if item.response_id in self._superseded:
            return []  # an earlier session's item: the new session never had it
        heard_ms = min(item.played, item.received) // MULAW_BYTES_PER_MS
        if heard_ms <= 0:
            # A 0 ms truncate is rejected; an unheard reply is removed instead.
            return [SendRealtime({"type": "conversation.item.delete", "item_id": item.item_id})]
        return [
            SendRealtime(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item.item_id,
                    "content_index": 0,
                    "audio_end_ms": heard_ms,
                }
            )
        ]

    def _on_speech_stopped(self, event: dict[str, Any], now: float) -> list[Action]:
        self.caller_speaking = False
        self._awaiting_commit = True
        self._owe("response", now)  # server VAD answers every turn it detects
        # audio_end_ms includes the VAD's silence window; the caller stopped before it.
        end_ms = _whole(event, "audio_end_ms") - self.vad_silence_ms
        end_of_speech = self._wall_time_of(end_ms, now)
        stopped_at = end_of_speech if self.model_owns_turns else now
        self._pending_turn = TurnTiming(end_of_speech=end_of_speech, speech_stopped_at=stopped_at)
        self.turns.append(self._pending_turn)
        return []

    def _on_error(self, event: dict[str, Any], now: float) -> list[Action]:
        error = _obj(event, "error")
        code = error.get("code")
        code = code if isinstance(code, str) else None
        if code in BENIGN_ERRORS:
            return []
        return [UpstreamError(code, _text(error, "message", required=False)[:500])]

    # upstream lifecycle
    def upstream_opened(self, now: float, greeting: dict[str, Any] | None = None) -> list[Action]:
        """A session (first, reconnected or rotated) is open and configured; `greeting` is the
        response.create that greets the caller, sent only on the first session."""
        if self.ended:
            return [CloseUpstream("the call ended while the session was opening")]
        if self.upstream is not Upstream.OPENING:
            self._session_replaced()
            if self._rotating:
                self.rotations += 1
            else:
                self.reconnects += 1
        self.upstream, self._rotating = Upstream.LIVE, False
        self._rotate_at = now + self.policy.max_age_s
        self._owed.clear()
        self._owe("session", now)
        if greeting is not None and self.greeting_due:
            self._owe("response", now)
            return [SendRealtime(greeting)]
        return self._act_if_due()

    @property
    def greeting_due(self) -> bool:
        """No reply has reached us yet: a session opened now should greet the caller."""
        return not self._items

    def upstream_open_failed(self, now: float, reason: str) -> list[Action]:
        if self._rotating:  # the old session still works; try again a little later
            self._rotating = False
            self._rotate_not_before = now + ROTATION_RETRY_S
            return []
        return self.upstream_lost(now, f"open failed: {reason}")

    def upstream_lost(self, now: float, reason: str) -> list[Action]:
        """The session dropped, stalled or broke: reconnect with backoff, or end the call."""
        if self.phase is Phase.ENDED:
            return []
        if self.phase is Phase.ENDING:
            return self._finish("upstream gone while ending")
        actions = self._orphan_items()
        self._attempt += 1
        delay = self.policy.reconnect_delay(self._attempt)
        if delay is None:
            self.upstream = Upstream.GONE
            return actions + self.end(now, f"upstream lost for good ({reason})")
        self.upstream = Upstream.RECONNECTING
        self._owed.clear()
        self.tools.session_replaced()  # its calls die with it; a held hang-up does not
        return [*actions, *self._act_if_due(), OpenUpstream(delay, reason, replace=True)]

    def tick(self, now: float) -> list[Action]:
        """Clock-driven decisions, for moments no message arrives (the handler's timer)."""
        if self.phase is Phase.ENDING and now >= self._ending_deadline:
            return self._finish("the last transcripts did not come in time")
        if self.upstream is Upstream.LIVE and not self.ended:
            return self._clock(now, [])
        return []

    def _clock(self, now: float, actions: list[Action]) -> list[Action]:
        if self._owed and now - self._heard_from_upstream > self.policy.stall_s:
            owed = ", ".join(sorted(self._owed))
            return actions + self.upstream_lost(now, f"stalled: no event for {owed}")
        if now < self._rotate_at or self._rotating:
            return actions
        if now >= self._rotate_not_before and self.quiet:
            self._rotating = True
            actions.append(OpenUpstream(0.0, "session age", replace=False))
        return actions

    def _owe(self, what: str, now: float) -> None:
        if not self._owed:
            self._heard_from_upstream = now  # the stall clock starts when the debt does
        self._owed.add(what)

    # the end
    def end(self, now: float, reason: str) -> list[Action]:
        """End the call from any phase, once: the unfinished reply is recorded as far as the
        phone played it, the phone is closed, and the upstream stays open (bounded) for the
        caller's last transcript."""
        if self.ended:
            return []
        actions = [*self._record_unfinished(now), EndCall(reason)]
        if self.caller_speaking and self.upstream is Upstream.LIVE:
            # No more audio will come to end the turn: commit it, so its words are kept.
            actions.append(SendRealtime({"type": "input_audio_buffer.commit"}))
            self._awaiting_commit = True
        self.phase = Phase.ENDING
        self._ending_deadline = now + self.transcript_grace_s
        return actions + self._finish_if_settled()

    @property
    def transcripts_pending(self) -> bool:
        if self.upstream is not Upstream.LIVE:
            return False
        if self._awaiting_commit or self._untranscribed:
            return True
        return any(i.text is None and i.queued > 0 and not i.recorded for i in self._items.values())

    def _finish_if_settled(self) -> list[Action]:
        if self.phase is Phase.ENDING and not self.transcripts_pending:
            return self._finish("the call ended")
        return []

    def _finish(self, reason: str) -> list[Action]:
        self.phase = Phase.ENDED
        live = self.upstream in (Upstream.LIVE, Upstream.OPENING)
        self.upstream = Upstream.GONE
        return [CloseUpstream(reason)] if live else []

    # helpers
    def _item_for(self, item_id: str, response_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item(item_id, response_id)
            self._chunker.reset()  # a new item never inherits another's remainder
            if len(self._items) > 64:
                self._items.pop(next(iter(self._items)))
        return item

    def _orphan_items(self) -> list[Action]:
        """The lost session's replies will get no more audio or transcript: each is remembered
        with the words that came, once the phone has played the audio that came."""
        actions: list[Action] = []
        for item in self._items.values():
            if item.recorded or (item.audio_done and item.text is not None):
                continue
            item.audio_done, item.cut = True, True
            if item.text is None:
                item.text = item.partial
            actions += self._maybe_record(item)
        return actions

    def _record_unfinished(self, now: float) -> list[Action]:
        """Replies still on the phone are remembered as far as they were heard."""
        if self._marks:
            playing = self._marks[0]
            item = self._items.get(playing.item_id)
            if item is not None:
                item.played = max(item.played, self._position_in(playing, now))
        actions: list[Action] = []
        for item in self._items.values():
            if not item.recorded and _words(item) and item.queued > 0:
                actions += self._record_assistant(item, _heard_part(item))
        return actions

    def _position_in(self, playing: _Mark, now: float) -> int:
        """Bytes of the item played by `now`: the chunk's start plus real time since it began."""
        if self._playing_since is None:
            return playing.item_bytes_start
        elapsed = round((now - self._playing_since) * 1000) * MULAW_BYTES_PER_MS
        return min(playing.item_bytes_end, playing.item_bytes_start + max(0, elapsed))

    def _emit_chunk(self, item: _Item, chunk: bytes, now: float) -> list[Action]:
        if self.stream_sid is None:
            if self._pre_start_bytes + len(chunk) <= MAX_PRE_START_BYTES:
                self._pre_start.append((item, chunk))
                self._pre_start_bytes += len(chunk)
            return []
        return self._chunk_actions(item, chunk, now)

    def _chunk_actions(self, item: _Item, chunk: bytes, now: float) -> list[Action]:
        """Whole frames as one `media`, then the `mark` that tells us when they have played."""
        start = item.queued
        item.queued += len(chunk)
        self._mark_seq += 1
        if not self._marks:  # the phone was idle: this chunk starts playing on arrival
            self._playing_since = now
        self._marks.append(_Mark(self._mark_seq, item.item_id, start, item.queued))
        self.frames_sent += len(chunk) // FRAME_BYTES
        if self.greeting_ms is None and self.started_at is not None:
            self.greeting_ms = (now - self.started_at) * 1000
        timing = item.timing
        if timing is not None and timing.first_frame_at is None:
            timing.first_frame_at = now
        sid = self.stream_sid
        return [
            SendTwilio(
                {
                    "event": "media",
                    "streamSid": sid,
                    "media": {"payload": binascii.b2a_base64(chunk, newline=False).decode()},
                }
            ),
            SendTwilio({"event": "mark", "streamSid": sid, "mark": {"name": str(self._mark_seq)}}),
        ]

    def _wall_time_of(self, audio_ms: int, fallback: float) -> float:
        """When the frame holding `audio_ms` of appended audio reached us."""
        i = bisect.bisect_left(self._append_ends, audio_ms)
        if i >= len(self._append_ends):
            return fallback
        return self._append_times[i]

    def _session_replaced(self) -> None:
        """A new Realtime session took over: its audio clock and items start afresh."""
        self._appended_bytes = 0
        self._append_ends.clear()
        self._append_times.clear()
        if self._active_response is not None:
            self._dropped_responses.add(self._active_response)
        self._active_response = None
        self._pending_turn = None
        self._awaiting_commit = False
        self._untranscribed.clear()
        self.caller_speaking = False
        self._chunker.reset()
        self._superseded.update(i.response_id for i in self._items.values())
        self.tools.session_replaced()

    @property
    def playback_pending(self) -> bool:
        return bool(self._marks)

    @property
    def response_active(self) -> bool:
        return self._active_response is not None

    @property
    def quiet(self) -> bool:
        """Nobody is talking: a moment to swap the upstream session unheard."""
        return not (
            self.caller_speaking or self._active_response or self._marks or self.tools.waiting
        )


_STREAMING, _LIVE = Phase.STREAMING, Upstream.LIVE


def _kind(message: Any, key: str) -> str:
    value = message.get(key) if isinstance(message, dict) else None
    return value[:60] if isinstance(value, str) else "?"


def _words(item: _Item) -> str:
    return item.text if item.text is not None else item.partial


def _heard_part(item: _Item) -> str:
    """The words the caller heard, cut in proportion to the audio played, marked as cut.

    Before the transcript is whole, its deltas so far stand for the audio received so far."""
    text = _words(item)
    if item.received <= 0:
        return ""
    share = min(1.0, item.played / item.received)
    if share >= 1:
        return text
    cut = text[: round(len(text) * share)].rsplit(" ", 1)[0].strip()
    return f"{cut}…" if cut else ""


_REALTIME_HANDLERS = {
    "session.updated": CallState._on_session_updated,
    "response.created": CallState._on_response_created,
    "response.done": CallState._on_response_done,
    "response.output_audio.delta": CallState._on_audio_delta,
    "response.output_audio.done": CallState._on_audio_done,
    "response.output_audio_transcript.delta": CallState._on_transcript_delta,
    "response.output_audio_transcript.done": CallState._on_transcript_done,
    "input_audio_buffer.committed": CallState._on_committed,
    "conversation.item.input_audio_transcription.completed": CallState._on_user_transcript,
    "conversation.item.input_audio_transcription.failed": CallState._on_transcription_failed,
    "input_audio_buffer.speech_started": CallState._on_speech_started,
    "input_audio_buffer.speech_stopped": CallState._on_speech_stopped,
    "response.function_call_arguments.done": CallState._on_function_call,
    "error": CallState._on_error,
    # GPT-Live (live_dialect.py): a delegated backend response began; only tools care.
    "gateway.delegated_response.created": CallState._on_delegated_created,
}
# Once the phone is closed only the words still owed matter.
_ENDING_HANDLERS = {
    "input_audio_buffer.committed": CallState._on_committed,
    "conversation.item.input_audio_transcription.completed": CallState._on_user_transcript,
    "conversation.item.input_audio_transcription.failed": CallState._on_transcription_failed,
    "response.output_audio_transcript.done": CallState._on_transcript_done,
}
