"""The GPT-Live simulator's knobs, and the limits and wording the SDK documents.

Limits quoted from `openai.types.live` (openai 3.63.0): session `input` "at most 128
messages and a configured rendered-token limit (8,192 by default)", one text part per
message; `instructions` "Limited to 16,384 client-supplied tokens"; appended
instructions/thinking/commentary "limited to 500 tokens"; G.711 "uses 8000 Hz"; PCM
16000 or 24000 Hz; an audio fixture is PCM16 24 kHz, "at most 30 seconds". Tokens are
the simulator's estimate (`estimate_tokens`): the SDK does not say how it renders them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from simulators.realtime_config import DEFAULT_REPLY

if TYPE_CHECKING:
    from simulators.live import LiveItem, LiveSession

__all__ = [
    "DEFAULT_REPLY",
    "DEFAULT_VOICE",
    "MAX_APPEND_TOKENS",
    "MAX_FIXTURE_MS",
    "MAX_INITIAL_ITEMS",
    "MAX_INSTRUCTIONS_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "LiveSimConfig",
    "LiveToolCall",
    "estimate_tokens",
]

MAX_INITIAL_ITEMS = 128
MAX_INSTRUCTIONS_TOKENS = 16_384
MAX_APPEND_TOKENS = 500
MAX_FIXTURE_MS = 30_000
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of a rendered history message (estimate)
DEFAULT_VOICE = "marin"  # "Defaults to `marin`"

ReplyFn = Callable[["LiveSession", "LiveItem | None"], "str | Awaitable[str]"]
TranscriptFn = Callable[["LiveSession", "LiveItem"], str]


def estimate_tokens(text: str) -> int:
    """About four characters a token, as the Realtime simulator counts."""
    return math.ceil(len(text) / 4)


@dataclass
class LiveToolCall:
    """A function the simulated Responses backend calls, through a delegation, when the
    caller's words contain `trigger` (case-insensitive; None: any turn of the caller). The
    session must offer it (`delegation.responses.tools`); otherwise the model just answers
    and the refusal is recorded. After its output and `response.create`, the backend answers
    `answer` (None: the reply knob's text) and the voice model speaks it. `once`: at most
    once per session."""

    name: str
    arguments: dict | str = field(default_factory=dict)
    trigger: str | None = None
    answer: str | None = None
    once: bool = True

    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


@dataclass
class LiveSimConfig:
    """Timing and behaviour knobs; all explicit so benchmarks can subtract them."""

    first_audio_latency_ms: float = 300.0  # end of the caller's speech -> first output delta
    speed: float = 4.0  # output streamed this many times faster than real time (inf: no pacing)
    delta_ms: float = 125.0  # output audio per session.output_audio.delta
    reply_text: str = DEFAULT_REPLY
    reply: ReplyFn | None = None  # (session, triggering item) -> text; overrides reply_text
    ms_per_char: float = 60.0  # reply audio length per character of text
    min_reply_ms: int = 400
    max_reply_ms: int = 20_000
    # What the caller said, for input transcripts and `reply`: a str or (session, item) -> str,
    # asked once per user turn when its speech starts (its audio is still arriving then).
    input_transcript: str | TranscriptFn = "(fala do cliente)"
    # The first word of a turn's transcript is sent this long after its speech starts (so a
    # client can see a barge-in early); the rest this long after the speech ends.
    transcription_latency_ms: float = 150.0
    max_session_s: float = 7200.0  # then session.closed (reason "expired"); the SDK gives no value
    history_token_limit: int = 8192  # "a configured rendered-token limit (8,192 by default)"
    context_limit_tokens: int | None = 32_000  # for context_window.usage_ratio; None: omitted
    usage_interval_s: float | None = None  # periodic session.usage.updated besides after replies
    # The model's own turn detection (Live exposes no VAD settings): energy over 20 ms windows.
    vad_threshold_dbfs: float = -35.0  # RMS level of a voiced window
    vad_start_ms: int = 60  # consecutive voiced audio before the caller is speaking
    vad_silence_ms: int = 500  # silence that ends the caller's turn
    record_audio: bool = True  # False (load tests): input audio and output deltas not kept
    # Fault knobs, for tests of what the gateway does when OpenAI misbehaves:
    open_delay_s: float = 0.0  # the websocket upgrade is answered this late
    refuse_sessions: int = 0  # this many upgrades are refused with HTTP 500 first
    drop_after_deltas: int | None = None  # each session's TCP dies after this many audio deltas
    # Functions the delegated Responses backend calls (see LiveToolCall).
    tool_calls: list[LiveToolCall] = field(default_factory=list)
