"""The call's protocol core, without I/O: Twilio and Realtime events in, actions out.

Twilio Media Streams on one side (mu-law 8 kHz frames, marks, clear), the Realtime API
on the other (`audio/pcmu` both ways, so payloads pass through untouched). The handler
in `calls.py` only moves messages; everything that decides lives here, driven by an
explicit clock so tests run without sockets or sleeps.

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
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.transcode import FRAME_BYTES, MULAW_BYTES_PER_MS, FrameChunker

log = logging.getLogger(__name__)

# Codes the real server sends in normal operation that need no reaction.
BENIGN_ERRORS = frozenset(
    {"response_cancel_not_active", "conversation_already_has_active_response"}
)


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


Action = (
    SendTwilio | SendRealtime | SendRealtimeRaw | EndCall | RecordTurn | RecordUsage | UpstreamError
)


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
    text: str | None = None  # the model's transcript of the item
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

    expected_format: str = "audio/pcmu"
    stream_sid: str | None = None
    call_sid: str | None = None
    started_at: float | None = None
    greeting_ms: float | None = None
    ended: bool = False
    transcript: list[tuple[str, str]] = field(default_factory=list)
    turns: list[TurnTiming] = field(default_factory=list)
    frames_sent: int = 0
    interrupt_response: bool = True
    vad_silence_ms: int = 0
    caller_speaking: bool = False

    def __post_init__(self) -> None:
        self._chunker = FrameChunker(FRAME_BYTES)
        self._items: dict[str, _Item] = {}
        self._marks: deque[_Mark] = deque()
        self._mark_seq = 0
        self._pre_start: list[tuple[_Item, bytes]] = []  # chunks made before Twilio's start
        self._playing_since: float | None = None  # when the chunk at _marks[0] began playing
        self._active_response: str | None = None
        self._dropped_responses: set[str] = set()
        self._appended_bytes = 0
        self._append_ends: list[int] = []  # cumulative appended ms, for speech_stopped alignment
        self._append_times: list[float] = []
        self._pending_turn: TurnTiming | None = None

    # Twilio side
    def on_twilio(self, msg: dict[str, Any], now: float) -> list[Action]:
        kind = msg.get("event")
        if kind == "media":
            return self._on_media(msg, now)
        if kind == "mark":
            return self._on_mark(msg.get("mark", {}).get("name", ""), now)
        if kind == "start":
            return self._on_start(msg, now)
        if kind == "dtmf":
            digit = str(msg.get("dtmf", {}).get("digit", ""))
            return [RecordTurn("dtmf", digit)] if digit else []
        if kind == "stop":
            self.ended = True
            return [*self._record_unfinished(now), EndCall("caller hung up")]
        return []  # connected, and events Twilio may add later

    def _on_start(self, msg: dict[str, Any], now: float) -> list[Action]:
        start = msg.get("start", {})
        self.stream_sid = msg.get("streamSid") or start.get("streamSid")
        self.call_sid = start.get("callSid")
        self.started_at = now
        actions: list[Action] = []
        for item, chunk in self._pre_start:
            actions += self._chunk_actions(item, chunk, now)
        self._pre_start.clear()
        return actions

    def _on_media(self, msg: dict[str, Any], now: float) -> list[Action]:
        media = msg.get("media", {})
        if media.get("track", "inbound") != "inbound":
            return []
        payload = media.get("payload", "")
        if not payload:
            return []
        self._appended_bytes += len(payload) * 3 // 4 - payload.count("=", -2)
        self._append_ends.append(self._appended_bytes // MULAW_BYTES_PER_MS)
        self._append_times.append(now)
        if len(self._append_ends) > 4096:  # ~80 s of alignment history is plenty
            del self._append_ends[:2048], self._append_times[:2048]
        return [SendRealtimeRaw(_APPEND_HEAD + orjson.dumps(payload) + b"}")]

    def _on_mark(self, name: str, now: float) -> list[Action]:
        try:
            number = int(name)
        except ValueError:
            return []
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
        return finished

    # Realtime side
    def on_realtime(self, event: dict[str, Any], now: float) -> list[Action]:
        handler = _REALTIME_HANDLERS.get(event.get("type", ""))
        return handler(self, event, now) if handler else []

    def _on_session_updated(self, event: dict[str, Any], now: float) -> list[Action]:
        audio = event.get("session", {}).get("audio", {})
        formats = (
            audio.get("input", {}).get("format", {}).get("type"),
            audio.get("output", {}).get("format", {}).get("type"),
        )
        turn = audio.get("input", {}).get("turn_detection") or {}
        self.interrupt_response = bool(turn.get("interrupt_response", False))
        self.vad_silence_ms = int(turn.get("silence_duration_ms") or 0)
        if formats != (self.expected_format, self.expected_format):
            log.error("session formats %s, expected %s: ending call", formats, self.expected_format)
            return [EndCall(f"upstream audio format {formats} is not {self.expected_format}")]
        return []

    def _on_response_created(self, event: dict[str, Any], now: float) -> list[Action]:
        self._active_response = event.get("response", {}).get("id")
        return []

    def _on_response_done(self, event: dict[str, Any], now: float) -> list[Action]:
        response = event.get("response", {})
        if response.get("id") == self._active_response:
            self._active_response = None
        usage = response.get("usage")
        if not usage:
            return []
        rid = response.get("id")
        audio = sum(i.received for i in self._items.values() if i.response_id == rid)
        return [RecordUsage(rid, usage, audio // MULAW_BYTES_PER_MS)]

    def _on_audio_delta(self, event: dict[str, Any], now: float) -> list[Action]:
        response_id = event.get("response_id", "")
        if response_id in self._dropped_responses:
            return []
        item = self._item_for(event.get("item_id", ""), response_id)
        audio = binascii.a2b_base64(event.get("delta", ""))
        item.received += len(audio)
        turn = self._pending_turn
        if turn is not None and turn.first_delta_at is None:
            turn.first_delta_at = now
            item.timing, self._pending_turn = turn, None
        whole = self._chunker.take(audio)
        return self._emit_chunk(item, whole, now) if whole else []

    def _on_audio_done(self, event: dict[str, Any], now: float) -> list[Action]:
        item = self._items.get(event.get("item_id", ""))
        if item is None or event.get("response_id") in self._dropped_responses:
            return []
        item.audio_done = True
        tail = self._chunker.flush()
        return self._emit_chunk(item, tail, now) if tail else self._maybe_record(item)

    def _on_transcript_done(self, event: dict[str, Any], now: float) -> list[Action]:
        item = self._items.get(event.get("item_id", ""))
        if item is None:
            return []
        item.text = event.get("transcript", "")
        return self._maybe_record(item)

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

    def _on_user_transcript(self, event: dict[str, Any], now: float) -> list[Action]:
        text = (event.get("transcript") or "").strip()
        if not text:
            return []
        self.transcript.append(("user", text))
        return [RecordTurn("user", text)]

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
            actions.append(self._forget_unheard(item))
            if not item.recorded and item.text:
                actions += self._record_assistant(item, _heard_part(item))
        return actions

    def _forget_unheard(self, item: _Item) -> SendRealtime:
        heard_ms = min(item.played, item.received) // MULAW_BYTES_PER_MS
        if heard_ms <= 0:
            # A 0 ms truncate is rejected; an unheard reply is removed instead.
            return SendRealtime({"type": "conversation.item.delete", "item_id": item.item_id})
        return SendRealtime(
            {
                "type": "conversation.item.truncate",
                "item_id": item.item_id,
                "content_index": 0,
                "audio_end_ms": heard_ms,
            }
        )

    def _on_speech_stopped(self, event: dict[str, Any], now: float) -> list[Action]:
        self.caller_speaking = False
        # audio_end_ms includes the VAD's silence window; the caller stopped before it.
        end_ms = int(event.get("audio_end_ms", 0)) - self.vad_silence_ms
        end_of_speech = self._wall_time_of(end_ms, now)
        self._pending_turn = TurnTiming(end_of_speech=end_of_speech, speech_stopped_at=now)
        self.turns.append(self._pending_turn)
        return []

    def _on_error(self, event: dict[str, Any], now: float) -> list[Action]:
        error = event.get("error", {})
        code = error.get("code")
        if code in BENIGN_ERRORS:
            return []
        return [UpstreamError(code, error.get("message", ""))]

    # helpers
    def _item_for(self, item_id: str, response_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item(item_id, response_id)
            self._chunker.reset()  # a new item never inherits another's remainder
            if len(self._items) > 64:
                self._items.pop(next(iter(self._items)))
        return item

    def _record_unfinished(self, now: float) -> list[Action]:
        """At hang-up, replies still on the phone are remembered as far as they were heard."""
        if self._marks:
            playing = self._marks[0]
            item = self._items.get(playing.item_id)
            if item is not None:
                item.played = max(item.played, self._position_in(playing, now))
        actions: list[Action] = []
        for item in self._items.values():
            if not item.recorded and item.text and item.queued > 0:
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
            self._pre_start.append((item, chunk))
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

    # upstream lifecycle
    def upstream_replaced(self) -> None:
        """A new Realtime session took over: its audio clock and items start afresh."""
        self._appended_bytes = 0
        self._append_ends.clear()
        self._append_times.clear()
        self._active_response = None
        self.caller_speaking = False
        self._chunker.reset()

    @property
    def playback_pending(self) -> bool:
        return bool(self._marks)

    @property
    def response_active(self) -> bool:
        return self._active_response is not None

    @property
    def quiet(self) -> bool:
        """Nobody is talking: a moment to swap the upstream session unheard."""
        return not (self.caller_speaking or self._active_response or self._marks)


_APPEND_HEAD = b'{"type":"input_audio_buffer.append","audio":'


def _heard_part(item: _Item) -> str:
    """The words the caller heard, cut in proportion to the audio played, marked as cut."""
    text = item.text or ""
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
    "response.output_audio_transcript.done": CallState._on_transcript_done,
    "conversation.item.input_audio_transcription.completed": CallState._on_user_transcript,
    "input_audio_buffer.speech_started": CallState._on_speech_started,
    "input_audio_buffer.speech_stopped": CallState._on_speech_stopped,
    "error": CallState._on_error,
}
