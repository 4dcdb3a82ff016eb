"""GPT-Live spoken in the call core's terms, without I/O (VOICE_BACKEND=live).

The call core (call_state.py) keeps the phone's side: 160-byte frames, marks, `clear` on
barge-in, what was heard, turn timing. It reads Realtime's events. Live has no replies
with ids, no `speech_started`, no `response.done`: the model owns turn-taking and only
streams audio and transcripts (docs/gpt-live.md §4). `LiveDialect` derives what the core
needs from what Live does send, so the core stays one:

* A reply starts at the first voiced output audio (or output transcript) after silence;
  it gets a response and item id, and the caller's words before it become the user turn
  (its end on the input timeline is the last input transcript's `end_ms`).
* A reply ends when no voiced output came for `reply_gap_s` (`tick`), or when the caller
  talks over it: an input transcript that starts after the reply began is a barge-in,
  `speech_started` for the core (Twilio `clear`, the heard part recorded).
* Outbound, the core's Realtime events become Live's: the greeting and news are appended
  context; a truncate, delete or cancel has no Live form (the model keeps what it played
  on its own timeline) and is dropped.
* Tools run on Live's Responses backend (delegation). Its function calls, nested in
  `response.event`, become the core's `function_call_arguments.done`, so the core's tool
  flow runs them as on Realtime; their outputs go back as `response.item.create` and the
  core's `response.create` continues the delegation. The backend's answer is spoken by the
  voice model afterwards, so that response counts as done only when the voice reply after
  it has ended: a hang-up held for "after the goodbye" then waits for the goodbye.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from dataclasses import dataclass, field
from typing import Any

APPEND_HEAD = b'{"type":"session.input_audio.append","audio":'
REPLY_GAP_S = 0.6  # no voiced output this long: the reply is over (Live says nothing)
MAX_APPEND_CHARS = 1800  # Live caps appended context at 500 tokens
HELD_ANSWER_S = 3.0  # a backend answer the voice does not start speaking by then: done anyway
SILENT_ULAW = b"\xff\x7f"  # mu-law's two codes for zero
SILENT_PCM = b"\x00"  # PCM16's zero, both bytes
_DROPPED = frozenset(
    {
        "conversation.item.truncate",
        "conversation.item.delete",
        "response.cancel",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "session.update",
    }
)


@dataclass
class _Reply:
    response_id: str
    item_id: str
    starts_ms: int  # where it began on the input timeline
    last_voiced_at: float
    words: list[str] = field(default_factory=list)


@dataclass
class _Backend:
    calls: bool = False  # it called functions (their outputs continue it)


@dataclass
class _Heard:
    item_id: str
    end_ms: int = 0
    words: list[str] = field(default_factory=list)


class LiveDialect:
    def __init__(self, reply_gap_s: float = REPLY_GAP_S, silence: bytes = SILENT_ULAW) -> None:
        self.reply_gap_s = reply_gap_s
        self.silence = silence  # the byte values of the session format's digital silence
        self._ids = itertools.count(1)
        self._reply: _Reply | None = None
        self._heard: _Heard | None = None  # the caller's turn, while they speak
        self._closing: _Heard | None = None  # their turn being answered; its last words may
        # come after the reply began (Live's transcript lags its audio)
        self._backend: dict[str, _Backend] = {}  # delegated Responses responses, by id
        self._held: list[dict[str, Any]] = []  # backend answers' done, until spoken
        self._held_since = 0.0

    def session_replaced(self) -> None:
        """A new session: nothing of the old one's reply or words goes on."""
        self._reply = self._heard = self._closing = None
        self._backend.clear()
        self._held.clear()

    # Live -> core
    def inbound(self, event: Any, now: float, input_ms: int) -> list[Any]:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "session.output_audio.delta":
            return self._on_output_audio(event, now, input_ms)
        if kind == "session.output_transcript.delta":
            return self._on_output_words(event, now, input_ms)
        if kind == "session.input_transcript.delta":
            return self._on_input_words(event, now)
        if kind == "session.started":
            return [_session_updated(event)]
        if kind == "response.event":
            return self._on_backend(event.get("event"), now)
        if kind == "error" or not isinstance(kind, str):
            return [event]  # the core reports it (or its bad shape)
        return []  # acknowledgements, info: nothing for the call

    def tick(self, now: float) -> list[dict[str, Any]]:
        """The clock: a reply with no voiced output for `reply_gap_s` is over; a backend
        answer the voice never spoke is released after `HELD_ANSWER_S`."""
        reply = self._reply
        if reply is None and self._held and now - self._held_since >= HELD_ANSWER_S:
            return self._release_held()
        if reply is None or now - reply.last_voiced_at < self.reply_gap_s:
            return []
        return self._end_reply("completed")

    def _on_backend(self, nested: Any, now: float) -> list[dict[str, Any]]:
        """A Responses event of the delegated backend (`response.event`)."""
        if not isinstance(nested, dict):
            return []
        kind = nested.get("type")
        response = nested.get("response") if isinstance(nested.get("response"), dict) else {}
        if kind == "response.created" and isinstance(response.get("id"), str):
            self._backend[response["id"]] = _Backend()
            return [{"type": "gateway.delegated_response.created", "response_id": response["id"]}]
        if kind == "response.output_item.done":
            return self._backend_item(nested)
        if kind in ("response.completed", "response.failed", "response.incomplete"):
            return self._backend_done(response, now)
        return []

    def _backend_item(self, nested: dict[str, Any]) -> list[dict[str, Any]]:
        item = nested.get("item") if isinstance(nested.get("item"), dict) else {}
        rid = next(reversed(self._backend), None)  # Responses streams one response at a time
        if item.get("type") != "function_call" or rid is None:
            return []
        self._backend[rid].calls = True
        return [{"type": "response.function_call_arguments.done", "response_id": rid,
                 "item_id": item.get("id"), "output_index": nested.get("output_index", 0),
                 "call_id": item.get("call_id"), "name": item.get("name"),
                 "arguments": item.get("arguments")}]  # fmt: skip

    def _backend_done(self, response: dict[str, Any], now: float) -> list[dict[str, Any]]:
        rid = response.get("id")
        backend = self._backend.pop(rid, None) if isinstance(rid, str) else None
        if backend is None:
            return []
        status = "completed" if response.get("status") == "completed" else "failed"
        done = {"type": "response.done", "response": {"id": rid, "status": status}}
        if backend.calls or status != "completed":
            return [done]  # its calls may be answered now
        if not self._held:
            self._held_since = now
        self._held.append(done)  # an answer to be spoken: done once the voice has said it
        return []

    def _release_held(self) -> list[dict[str, Any]]:
        held, self._held = self._held, []
        return held

    def _on_output_audio(self, event: dict[str, Any], now: float, input_ms: int) -> list[Any]:
        delta = event.get("delta")
        if not isinstance(delta, str):
            return [{**event, "type": "response.output_audio.delta"}]  # the core refuses it
        voiced = _voiced(delta, self.silence)
        if self._reply is None and not voiced:
            return []  # the silence Live streams between replies
        events = self._begin_reply(now, input_ms)
        reply = self._reply
        assert reply is not None
        if voiced:
            reply.last_voiced_at = now
        ids = {"response_id": reply.response_id, "item_id": reply.item_id}
        return [*events, {"type": "response.output_audio.delta", **ids, "delta": delta,
                          "output_index": 0, "content_index": 0}]  # fmt: skip

    def _on_output_words(self, event: dict[str, Any], now: float, input_ms: int) -> list[Any]:
        delta = event.get("delta")
        if not isinstance(delta, str) or not delta:
            return []
        events = self._begin_reply(now, input_ms)
        reply = self._reply
        assert reply is not None
        reply.words.append(delta)
        ids = {"response_id": reply.response_id, "item_id": reply.item_id}
        return [*events, {"type": "response.output_audio_transcript.delta", **ids,
                          "delta": delta, "output_index": 0, "content_index": 0}]  # fmt: skip

    def _on_input_words(self, event: dict[str, Any], now: float) -> list[dict[str, Any]]:
        delta, start_ms, end_ms = event.get("delta"), event.get("start_ms"), event.get("end_ms")
        if not isinstance(delta, str) or not isinstance(start_ms, int | float):
            return []
        events: list[dict[str, Any]] = []
        reply = self._reply
        if reply is not None and start_ms < reply.starts_ms and self._heard is None:
            if self._closing is not None:  # late words of the turn being answered
                self._closing.words.append(delta)
            return []
        if self._heard is None:
            events += self._transcribed()
            self._heard = _Heard(f"live_in_{next(self._ids)}")
            events.append({"type": "input_audio_buffer.speech_started",
                           "item_id": self._heard.item_id,
                           "audio_start_ms": int(start_ms)})  # fmt: skip
        if reply is not None:  # the caller talks over the reply: it is over
            events += self._end_reply("cancelled")
        self._heard.words.append(delta)
        if isinstance(end_ms, int | float):
            self._heard.end_ms = max(self._heard.end_ms, int(end_ms))
        return events

    def _begin_reply(self, now: float, input_ms: int) -> list[dict[str, Any]]:
        if self._reply is not None:
            return []
        events = self._close_heard()
        n = next(self._ids)
        self._reply = _Reply(f"live_resp_{n}", f"live_item_{n}", input_ms, now)
        response = {"id": self._reply.response_id, "object": "realtime.response",
                    "status": "in_progress", "output": []}  # fmt: skip
        return [*events, {"type": "response.created", "response": response}]

    def _close_heard(self) -> list[dict[str, Any]]:
        """The caller's turn ends where the model starts answering it; its words are whole
        when that reply ends or the caller speaks again (`_transcribed`)."""
        heard, self._heard = self._heard, None
        if heard is None:
            return []
        events = self._transcribed()
        self._closing = heard
        item = {"item_id": heard.item_id}
        return [
            *events,
            {"type": "input_audio_buffer.speech_stopped", **item, "audio_end_ms": heard.end_ms},
            {"type": "input_audio_buffer.committed", **item},
        ]

    def _transcribed(self) -> list[dict[str, Any]]:
        heard, self._closing = self._closing, None
        if heard is None:
            return []
        return [{"type": "conversation.item.input_audio_transcription.completed",
                 "item_id": heard.item_id, "content_index": 0,
                 "transcript": "".join(heard.words)}]  # fmt: skip

    def _end_reply(self, status: str) -> list[dict[str, Any]]:
        reply, self._reply = self._reply, None
        if reply is None:
            return []
        words = self._transcribed()
        ids = {"response_id": reply.response_id, "item_id": reply.item_id,
               "output_index": 0, "content_index": 0}  # fmt: skip
        response = {"id": reply.response_id, "object": "realtime.response", "status": status}
        return [
            *words,
            {"type": "response.output_audio.done", **ids},
            {"type": "response.output_audio_transcript.done", **ids,
             "transcript": "".join(reply.words)},
            {"type": "response.done", "response": response},
            *self._release_held(),
        ]  # fmt: skip

    # core -> Live
    def outbound(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind in _DROPPED:
            return []  # Realtime's session.update included: Live's takes delegation only
        if isinstance(kind, str) and kind.startswith("session."):
            return [event]  # already Live's (the greeting)
        if kind == "conversation.item.create":
            item = event.get("item") if isinstance(event.get("item"), dict) else {}
            if item.get("type") == "function_call_output":  # to the delegated backend
                output = {k: item.get(k) for k in ("type", "call_id", "output")}
                return [{"type": "response.item.create", "item": output}]
            text = _item_text(item)
            return [silent_context(text)] if text else []
        if kind == "response.create":  # the core's tool flow: the delegation continues
            return [{"type": "response.create"}]
        return []


def greeting_event(instruction: str) -> dict[str, Any]:
    """Live's voice model takes no response.create: an appended instruction greets."""
    return {"type": "session.instructions.append", "content": instruction[:MAX_APPEND_CHARS],
            "delegation_id": None}  # fmt: skip


def silent_context(text: str) -> dict[str, Any]:
    """Something the model should know but not say now (news from another channel)."""
    return {"type": "session.thinking.append", "content": text[:MAX_APPEND_CHARS],
            "delegation_id": None}  # fmt: skip


def _voiced(delta: str, silence: bytes) -> bool:
    try:
        audio = base64.b64decode(delta, validate=True)
    except (binascii.Error, ValueError):
        return True  # not ours to judge: the core refuses it
    return bool(audio.strip(silence))


def _item_text(item: Any) -> str:
    if not isinstance(item, dict) or item.get("role") not in ("system", "developer"):
        return ""
    parts = item.get("content") or []
    texts = [p.get("text") for p in parts if isinstance(p, dict)]
    return "\n".join(t for t in texts if isinstance(t, str))


def _session_updated(started: dict[str, Any]) -> dict[str, Any]:
    """Live's started session as the core's `session.updated`: one format both ways, and
    the model stops its own reply when interrupted (no cancel owed)."""
    session = started.get("session") if isinstance(started.get("session"), dict) else {}
    audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
    fmt = audio.get("format") if isinstance(audio.get("format"), dict) else {}
    fmt = {"type": fmt.get("type")}
    turns = {"type": "live", "interrupt_response": True}
    return {
        "type": "session.updated",
        "session": {
            "audio": {
                "input": {"format": fmt, "turn_detection": turns},
                "output": {"format": fmt},
            }
        },
    }
