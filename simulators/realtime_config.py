"""The Realtime simulator's knobs and the server's fixed limits and wording."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulators.realtime import SimSession
    from simulators.realtime_state import ConvItem

MiB = 1024 * 1024
MAX_APPEND_BYTES = 15 * MiB  # per input_audio_buffer.append, decoded
MIN_COMMIT_MS = 100
MAX_DURATION_MESSAGE = "Your session hit the maximum duration of 60 minutes."
BETA_DISABLED_MESSAGE = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. "
    "Act like a human, but remember that you aren't a human."
)
DEFAULT_REPLY = (
    "Olá! Daqui fala o Endrigo. Obrigado pela sua mensagem, estou a ouvir. "
    "Em que posso ajudar hoje?"
)

ARGUMENTS_DELTA_CHARS = 24  # function call arguments per response.function_call_arguments.delta

ReplyFn = Callable[["SimSession", "ConvItem | None"], "str | Awaitable[str]"]
TranscriptFn = Callable[["SimSession", "ConvItem"], str]
MangleFn = Callable[[dict], Any]
TriggerFn = Callable[["SimSession", "ConvItem | None"], bool]


@dataclass
class SimToolCall:
    """A function call the simulated model makes, when `trigger` matches a response's trigger.

    `trigger`: None = the next response that is not itself answering a function_call_output;
    a str = a case-insensitive substring of what the caller said in the triggering user item
    (its text, or for audio what `input_transcript` says they said, transcription on or not);
    a callable (session, trigger item or None) -> bool. That response says `say_first` (if
    set; an assistant message streamed like any reply), then calls `name` with `arguments`
    (a dict is sent as compact JSON; a str verbatim, malformed JSON included). Several knobs
    matching one response are parallel calls, unless `parallel_tool_calls` is false.
    The session must offer the function (`tools`, `tool_choice`); otherwise it is not called
    and the refusal is recorded (`SimSession.tool_calls_refused`). `once`: at most once per
    session (a refusal spends it too, as the moment has passed).
    """

    name: str
    arguments: dict | str = field(default_factory=dict)
    trigger: str | TriggerFn | None = None
    say_first: str | None = None
    once: bool = True

    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


# ---- configuration ---------------------------------------------------------------------


@dataclass
class RealtimeSimConfig:
    """Timing and behaviour knobs; all explicit so benchmarks can subtract them."""

    first_audio_latency_ms: float = 300.0  # response.created -> first audio/text delta
    speed: float = 4.0  # audio streamed this many times faster than real time (inf: no pacing)
    delta_ms: float = 125.0  # audio per delta: 1000 B of pcmu, on purpose not a multiple of 160
    reply_text: str = DEFAULT_REPLY
    reply: ReplyFn | None = None  # (session, last user item) -> text; overrides reply_text
    ms_per_char: float = 60.0  # reply audio length per character of text
    # A text-only reply (output_modalities ["text"]) streams at the model's text rate, one
    # token (~4 characters) a delta, not at its audio's pace. 300 characters/s (75 tokens/s)
    # is an assumption, of the order of GPT-4o-class text output; speed=inf: no pacing.
    text_chars_per_s: float = 300.0
    min_reply_ms: int = 400
    max_reply_ms: int = 20_000
    max_session_s: float = 3600.0  # then close 1001 like the real 60-minute limit
    default_voice: str = "marin"
    instructions: str = DEFAULT_INSTRUCTIONS
    vad_floor_dbfs: float = -60.0  # level for threshold 0
    vad_span_db: float = 50.0  # threshold 1 = floor + span
    vad_start_ms: int = 60  # consecutive voiced audio before speech_started
    semantic_silence_ms: dict[str, int] = field(
        default_factory=lambda: {"low": 2000, "medium": 1000, "auto": 1000, "high": 500}
    )
    input_transcript: str | TranscriptFn = "(fala do cliente)"  # when transcription is on
    transcription_latency_ms: float = 150.0
    send_conversation_created: bool = False  # the real server may or may not; don't rely on it
    send_item_created: bool = False  # legacy conversation.item.created next to .added
    record_audio: bool = True  # False (load tests): no input_audio, appends/deltas not recorded
    # Fault knobs, for tests of what the gateway does when OpenAI misbehaves:
    open_delay_s: float = 0.0  # the websocket upgrade is answered this late
    refuse_sessions: int = 0  # this many upgrades are refused with HTTP 500 first
    mangle: MangleFn | None = None  # (event) -> what is sent instead: any JSON value or raw text
    drop_after_deltas: int | None = None  # each session's TCP dies after this many audio deltas
    # Function calls the model makes (see SimToolCall), checked for what must follow them.
    tool_calls: list[SimToolCall] = field(default_factory=list)
