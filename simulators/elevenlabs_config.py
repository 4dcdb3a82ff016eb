"""The ElevenLabs simulator's knobs, the service's fixed limits, and its error bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SIM_API_KEY = "sk_sim_elevenlabs"
# The sandbox's voice (gateway.settings.SANDBOX_ELEVENLABS_VOICE) and a real-looking id
# (ElevenLabs voice ids are 20 characters, letters and digits).
SANDBOX_VOICE_ID = "sandbox-endrigo"
SIM_VOICE_ID = "EndrigoSimVoice00001"
# Text-to-speech models as GET /v1/models names them; omitted, the API uses the first.
MODELS = (
    "eleven_multilingual_v2",
    "eleven_flash_v2_5",
    "eleven_turbo_v2_5",
    "eleven_v3",
    "eleven_flash_v2",
    "eleven_turbo_v2",
    "eleven_multilingual_v1",
    "eleven_monolingual_v1",
)
DEFAULT_MODEL = MODELS[0]

# stream-input: the default chunk_length_schedule (GenerationConfig's docstring), the
# inactivity timeout's default and bounds (seconds), and the least text a
# try_trigger_generation generates (the SDK says "a minimum threshold"; 30 is a guess).
DEFAULT_CHUNK_SCHEDULE = (120, 160, 250, 290)
DEFAULT_INACTIVITY_S = 20
MAX_INACTIVITY_S = 180
TRY_TRIGGER_MIN_CHARS = 30
MAX_TEXT_CHARS = 40_000  # REST: longer text is refused (the flash/turbo models' limit)
VOICE_SETTING_RANGES = {
    "stability": (0.0, 1.0),
    "similarity_boost": (0.0, 1.0),
    "style": (0.0, 1.0),
    "speed": (0.7, 1.2),
}

# `{"detail": {"status", "message"}}`: ElevenLabs' error body outside request validation.
# 401s, 404 voice_not_found and 429s are the service's own wording; the others' status
# names are the simulator's guesses, marked so.
_MESSAGES = {
    "needs_authorization": (
        "Neither authorization header nor xi-api-key received, please provide one."
    ),
    "invalid_api_key": "Invalid API key",
    "voice_not_found": "A voice with voice_id {voice_id} was not found.",
    "model_not_found": "A model with model ID {model_id} does not exist.",  # guess
    "too_many_concurrent_requests": (
        "Too many concurrent requests for this subscription. Please upgrade or wait."
    ),
    "system_busy": "We are experiencing heavy traffic, please try again later.",
    "quota_exceeded": "This request exceeds your quota remaining. Please upgrade.",
    "invalid_text": "Text must not be empty.",  # guess
    "text_too_long": "Text is longer than the model's limit of {limit} characters.",  # guess
    "output_format_not_simulated": (
        "The simulator does not produce {output_format}; use pcm_*, ulaw_8000 or alaw_8000."
    ),  # the simulator's own
    "internal_server_error": "An internal server error occurred.",  # guess
    "service_unavailable": "The service is temporarily unavailable.",  # guess
    "input_timeout_exceeded": (
        "Have not received a new text input within the timeout of {timeout} seconds. "
        "Streaming input terminated. Please make sure to send text or keep the stream alive."
    ),
    "invalid_message": "{reason}",  # guess: a stream-input message that is not the protocol
}
# What an injected failure of each HTTP status says.
STATUS_FOR_HTTP = {
    401: "invalid_api_key",
    404: "voice_not_found",
    429: "too_many_concurrent_requests",
    500: "internal_server_error",
    503: "service_unavailable",
}


def error_detail(status: str, **fields: Any) -> dict:
    """`{"detail": {"status": ..., "message": ...}}`, the message filled from `fields`."""
    template = _MESSAGES.get(status, "Error")
    return {"detail": {"status": status, "message": template.format(**fields)}}


def validation_error(loc: list[str | int], msg: str, kind: str, value: Any = None) -> dict:
    """FastAPI's 422 body, the SDK's `HttpValidationError` (types/http_validation_error.py):
    `{"detail": [{"loc", "msg", "type", ...}]}`."""
    return {"detail": [{"type": kind, "loc": loc, "msg": msg, "input": value}]}


@dataclass
class ElevenLabsSimConfig:
    """Timing, voices and fault knobs; all explicit so tests can assert against them."""

    api_key: str | None = SIM_API_KEY  # None: any non-empty key is accepted (the sandbox)
    voices: tuple[str, ...] = (SANDBOX_VOICE_ID, SIM_VOICE_ID)
    models: tuple[str, ...] = MODELS
    first_audio_latency_ms: float = 75.0  # request (or generation trigger) -> first audio
    speed: float = 4.0  # audio is sent this many times faster than real time (inf: no pacing)
    chars_per_second: float = 14.0  # speaking rate at voice_settings.speed 1.0
    chunk_ms: float = 250.0  # audio per streamed chunk (whole characters, at least one)
    # Faults: the first `fail_requests` requests (REST, or websocket upgrades) are answered
    # with HTTP `fail_status` and the error body for it; the first `cut_requests` (None:
    # every one) are cut after `cut_after_chunks` audio chunks: the REST body ends without
    # its last chunk, the websocket's TCP connection dies without a close frame.
    fail_requests: int = 0
    fail_status: int = 500
    cut_after_chunks: int | None = None
    cut_requests: int | None = None

    def ms_per_char(self, voice_speed: float = 1.0) -> int:
        """Each character's whole milliseconds of audio at this voice speed."""
        return max(1, round(1000.0 / (self.chars_per_second * voice_speed)))
