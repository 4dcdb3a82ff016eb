"""A local ElevenLabs text-to-speech service, wire-faithful to what the `elevenlabs` SDK sends.

Routes (the SDK's text_to_speech/raw_client.py and realtime_tts.py; base URL without /v1,
as `ElevenLabsEnvironment.PRODUCTION` is `https://api.elevenlabs.io`):

* `POST /v1/text-to-speech/{voice_id}` and `.../stream`: the audio bytes, chunked.
* `POST /v1/text-to-speech/{voice_id}/with-timestamps`: one JSON object
  `{"audio_base64", "alignment", "normalized_alignment"}`; `.../stream/with-timestamps`:
  one such object per line (the SDK reads `aiter_lines()`), each alignment
  `{"characters", "character_start_times_seconds", "character_end_times_seconds"}` in
  seconds from the start of the whole audio.
  Query `output_format` (default `mp3_44100_128`), `enable_logging`,
  `optimize_streaming_latency`; JSON body `{"text", "model_id"?, "voice_settings"?, ...}`.
* `GET /v1/text-to-speech/{voice_id}/stream-input?model_id=&output_format=&...`, a
  websocket: the first message `{"text": " ", "voice_settings"?, "generation_config"?,
  "xi-api-key"?}`, then `{"text": "... ", "try_trigger_generation"?, "flush"?}`, ended by
  `{"text": ""}`; the server answers `{"audio": base64, "isFinal": null,
  "normalizedAlignment": {...}, "alignment": {"chars", "charStartTimesMs",
  "charDurationsMs"}}` (times relative to that chunk, as the SDK's `Alignment` says), then
  `{"isFinal": true}` and a 1000 close. Text is generated when the buffer reaches the
  `chunk_length_schedule` (default 120, 160, 250, 290), on `flush`, on
  `try_trigger_generation` past `TRY_TRIGGER_MIN_CHARS`, on every message with
  `auto_mode=true`, and at the end. An error is a last message `{"message", "error",
  "code"}` and a 1008 close (the SDK raises `ApiError` on a close whose last message has
  "message"); `inactivity_timeout` (default 20 s) without text ends it the same way.

Auth is the `xi-api-key` header (`core/client_wrapper.py`), or for stream-input the first
message's `xi-api-key` (the SDK's `InitializeConnection` alias; `xi_api_key` too). Errors
are ElevenLabs' `{"detail": {"status", "message"}}` (401 needs_authorization /
invalid_api_key, 404 voice_not_found, 400 for the rest), and FastAPI's 422
`{"detail": [{"loc", "msg", "type"}]}` for a bad query or body, which the SDK raises as
`UnprocessableEntityError`. mp3 and opus formats are valid but not produced: 400
`output_format_not_simulated`.

The voice (simulators/elevenlabs_audio.py) is speech-like at `ELEVENLABS_PITCH_HZ`, which
`sounds_like_elevenlabs()` recognises and the Realtime simulator's voice never matches.
Every character lasts `config.ms_per_char()` ms; characters billed are the text's length.
Knobs and faults: `ElevenLabsSimConfig` (elevenlabs_config.py), `fail_next()`,
`cut_next()`. Every request is recorded (`requests`, `TtsRequest`).

`python -m simulators.elevenlabs --port 8767` runs it standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

from simulators.elevenlabs_audio import (
    DEFAULT_OUTPUT_FORMAT,
    ELEVENLABS_PITCH_HZ,
    KNOWN_OUTPUT_FORMATS,
    OutputFormat,
    estimate_pitch_hz,
    simulated_format,
    sounds_like_elevenlabs,
    voice_audio,
    warm_voice_cache,
)
from simulators.elevenlabs_config import (
    DEFAULT_CHUNK_SCHEDULE,
    DEFAULT_INACTIVITY_S,
    DEFAULT_MODEL,
    MAX_INACTIVITY_S,
    MAX_TEXT_CHARS,
    SANDBOX_VOICE_ID,
    SIM_API_KEY,
    SIM_VOICE_ID,
    STATUS_FOR_HTTP,
    TRY_TRIGGER_MIN_CHARS,
    VOICE_SETTING_RANGES,
    ElevenLabsSimConfig,
    error_detail,
    validation_error,
)
from simulators.server import SimServer, run, serve

__all__ = [
    "ELEVENLABS_PITCH_HZ",
    "SANDBOX_VOICE_ID",
    "SIM_API_KEY",
    "SIM_VOICE_ID",
    "ElevenLabsSimConfig",
    "ElevenLabsSimulator",
    "TtsRequest",
    "estimate_pitch_hz",
    "sounds_like_elevenlabs",
]

log = logging.getLogger(__name__)

_BOOL_VALUES = {"true": True, "false": False}


@dataclass
class TtsRequest:
    """One request as the simulator saw and answered it."""

    kind: str  # convert | stream | convert_with_timestamps | stream_with_timestamps | stream_input
    voice_id: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None  # REST: the JSON body as sent (None if it was not JSON)
    messages: list[dict] = field(default_factory=list)  # stream-input: client messages
    sent: list[dict] = field(default_factory=list)  # stream-input: server messages
    auth_ok: bool | None = None  # None: never checked (an injected failure came first)
    status: int | None = None  # the HTTP status answered (101: upgraded to a websocket)
    error: str | None = None  # the error's detail.status (or "validation" for a 422)
    close_code: int | None = None  # stream-input: the close the server sent (1006: cut)
    output_format: str | None = None
    model_id: str | None = None
    characters: int = 0  # billed
    audio: bytearray = field(default_factory=bytearray)  # every audio byte sent
    chunks: int = 0  # audio chunks (REST chunks / lines, websocket audio messages)
    text: str = ""  # the text generated, in order
    cut: bool = False  # ended by a cut_after_chunks fault
    finished: bool = False  # the answer is complete (or cut, or refused)
    started_at: float = field(default_factory=time.monotonic)
    first_audio_at: float | None = None

    @property
    def first_audio_ms(self) -> float | None:
        """Milliseconds from the request to its first audio chunk on the wire."""
        if self.first_audio_at is None:
            return None
        return (self.first_audio_at - self.started_at) * 1000


class _Refusal(Exception):
    """A request refused: the HTTP status and the body, or a stream-input close."""

    def __init__(self, status: int, body: dict, error: str) -> None:
        super().__init__(error)
        self.status, self.body, self.error = status, body, error


def _detail(http_status: int, status: str, **fields: Any) -> _Refusal:
    return _Refusal(http_status, error_detail(status, **fields), status)


def _invalid(loc: list[str | int], msg: str, kind: str, value: Any = None) -> _Refusal:
    return _Refusal(422, validation_error(loc, msg, kind, value), "validation")


@dataclass
class _Speech:
    """A text to speak: its format, per-character length and chunking."""

    text: str
    fmt: OutputFormat
    ms_per_char: int
    chars_per_chunk: int

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(first char, end char) of each chunk."""
        for start in range(0, len(self.text), self.chars_per_chunk):
            yield start, min(len(self.text), start + self.chars_per_chunk)

    def audio(self, start: int, end: int) -> bytes:
        return voice_audio(self.fmt, start * self.ms_per_char, end * self.ms_per_char)

    def seconds_alignment(self, start: int, end: int) -> dict:
        ms = self.ms_per_char
        return {
            "characters": list(self.text[start:end]),
            "character_start_times_seconds": [i * ms / 1000 for i in range(start, end)],
            "character_end_times_seconds": [(i + 1) * ms / 1000 for i in range(start, end)],
        }

    def ms_alignment(self, start: int, end: int) -> dict:
        ms = self.ms_per_char
        return {
            "chars": list(self.text[start:end]),
            "charStartTimesMs": [(i - start) * ms for i in range(start, end)],
            "charDurationsMs": [ms] * (end - start),
        }


class _Pacer:
    """Sends audio on a clock: the first chunk after the latency, then `speed` x real time."""

    def __init__(self, cfg: ElevenLabsSimConfig, since: float) -> None:
        self.cfg = cfg
        self.due = since + cfg.first_audio_latency_ms / 1000

    def restart(self, since: float) -> None:
        """A new generation: its audio comes no sooner than the latency after `since`."""
        self.due = max(self.due, since + self.cfg.first_audio_latency_ms / 1000)

    async def wait(self, audio_ms: float) -> None:
        delay = self.due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if math.isfinite(self.cfg.speed) and self.cfg.speed > 0:
            self.due = max(self.due, time.monotonic()) + audio_ms / 1000 / self.cfg.speed


class ElevenLabsSimulator(SimServer):
    """The aiohttp server: ElevenLabs' text-to-speech routes on one loopback port."""

    def __init__(self, config: ElevenLabsSimConfig | None = None) -> None:
        super().__init__()
        self.config = config or ElevenLabsSimConfig()
        self.requests: list[TtsRequest] = []
        self.attach(self.app)
        self._changed = asyncio.Event()
        self._failed = 0
        self._cut = 0
        self._sockets: set[web.WebSocketResponse] = set()

    # -- lifecycle --

    @property
    def base_url(self) -> str:
        """What `ElevenLabs(base_url=...)` takes (ElevenLabs' own has no /v1)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def ws_url(self, voice_id: str = SIM_VOICE_ID, **query: Any) -> str:
        """The stream-input address for `voice_id`, with `query` (booleans as true/false)."""
        scheme = "wss" if self.scheme == "https" else "ws"
        params = urlencode(
            {k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()}
        )
        url = f"{scheme}://{self.host}:{self.port}/v1/text-to-speech/{voice_id}/stream-input"
        return f"{url}?{params}" if params else url

    def attach(self, app: web.Application, prefix: str = "/v1/text-to-speech") -> None:
        """Mount the text-to-speech routes on `app`."""
        app.router.add_post(prefix + "/{voice_id}", self._convert)
        app.router.add_post(prefix + "/{voice_id}/stream", self._stream)
        app.router.add_post(prefix + "/{voice_id}/with-timestamps", self._convert_timestamps)
        app.router.add_post(prefix + "/{voice_id}/stream/with-timestamps", self._stream_timestamps)
        app.router.add_get(prefix + "/{voice_id}/stream-input", self._stream_input)
        app.on_shutdown.append(self._on_shutdown)

    def warm(self) -> None:
        warm_voice_cache()

    async def _on_shutdown(self, app: web.Application) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(
                *(ws.close(code=1001, message=b"Server shutting down") for ws in self._sockets)
            )

    # -- faults and records --

    def fail_next(self, count: int = 1, status: int = 500) -> None:
        """The next `count` requests (REST, or websocket upgrades) answer HTTP `status`."""
        self.config.fail_requests = self._failed + count
        self.config.fail_status = status

    def cut_next(self, after_chunks: int, count: int = 1) -> None:
        """The next `count` requests are cut after `after_chunks` audio chunks."""
        self.config.cut_after_chunks = after_chunks
        self.config.cut_requests = self._cut + count

    @property
    def characters_billed(self) -> int:
        return sum(r.characters for r in self.requests)

    async def wait_for_requests(
        self,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109 - the test-facing signature
        finished: bool = True,
    ) -> list[TtsRequest]:
        """The first `count` requests, once they exist (and, by default, are finished)."""

        def ready() -> bool:
            done = self.requests[:count]
            return len(done) >= count and (not finished or all(r.finished for r in done))

        async with asyncio.timeout(timeout):
            while not ready():
                await self._changed.wait()
        return self.requests[:count]

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _record(self, kind: str, request: web.Request) -> TtsRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = TtsRequest(
            kind, request.match_info["voice_id"], request.path, dict(request.query), headers
        )
        self.requests.append(record)
        self._notify()
        return record

    def _finish(self, record: TtsRequest) -> None:
        record.finished = True
        self._notify()

    def _injected_failure(self) -> _Refusal | None:
        if self._failed >= self.config.fail_requests:
            return None
        self._failed += 1
        status = self.config.fail_status
        return _detail(status, STATUS_FOR_HTTP.get(status, "internal_server_error"), voice_id="")

    def _cut_after(self) -> int | None:
        """This request's cut point (consumed), or None."""
        cfg = self.config
        if cfg.cut_after_chunks is None:
            return None
        if cfg.cut_requests is not None:
            if self._cut >= cfg.cut_requests:
                return None
            self._cut += 1
        return cfg.cut_after_chunks

    # -- checks shared by REST and stream-input --

    def _key_ok(self, key: str | None) -> bool:
        return bool(key) and (self.config.api_key is None or key == self.config.api_key)

    def _check_key(self, key: str | None) -> None:
        if not key:
            raise _detail(401, "needs_authorization")
        if self.config.api_key is not None and key != self.config.api_key:
            raise _detail(401, "invalid_api_key")

    def _check_voice(self, voice_id: str) -> None:
        if voice_id not in self.config.voices:
            raise _detail(404, "voice_not_found", voice_id=voice_id)

    def _check_model(self, model_id: Any, loc: list[str | int]) -> str:
        if model_id is None:
            return DEFAULT_MODEL
        if not isinstance(model_id, str):
            raise _invalid(loc, "Input should be a valid string", "string_type", model_id)
        if model_id not in self.config.models:
            raise _detail(400, "model_not_found", model_id=model_id)
        return model_id

    @staticmethod
    def _output_format(query: Any) -> str:
        name = query.get("output_format", DEFAULT_OUTPUT_FORMAT)
        if name not in KNOWN_OUTPUT_FORMATS:
            quoted = [f"'{f}'" for f in KNOWN_OUTPUT_FORMATS]
            allowed = ", ".join(quoted[:-1]) + " or " + quoted[-1]  # pydantic's enum wording
            raise _invalid(["query", "output_format"], f"Input should be {allowed}", "enum", name)
        return name

    @staticmethod
    def _simulated(name: str) -> OutputFormat:
        fmt = simulated_format(name)
        if fmt is None:
            raise _detail(400, "output_format_not_simulated", output_format=name)
        return fmt

    @staticmethod
    def _query_bool(query: Any, name: str) -> bool | None:
        if name not in query:
            return None
        value = _BOOL_VALUES.get(query[name].lower())
        if value is None:
            raise _invalid(
                ["query", name], "Input should be a valid boolean", "bool_parsing", query[name]
            )
        return value

    @staticmethod
    def _query_int(query: Any, name: str, low: int, high: int) -> int | None:
        if name not in query:
            return None
        try:
            value = int(query[name])
        except ValueError:
            raise _invalid(
                ["query", name], "Input should be a valid integer", "int_parsing", query[name]
            ) from None
        if not low <= value <= high:
            raise _invalid(
                ["query", name], f"Input should be between {low} and {high}", "range", value
            )
        return value

    @staticmethod
    def _voice_speed(settings: Any, loc: list[str | int]) -> float:
        """Checks `voice_settings`; the speaking speed it asks for (1.0 by default)."""
        if settings is None:
            return 1.0
        if not isinstance(settings, dict):
            raise _invalid(loc, "Input should be a valid dictionary", "dict_type", settings)
        for name, (low, high) in VOICE_SETTING_RANGES.items():
            value = settings.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _invalid([*loc, name], "Input should be a valid number", "float_type", value)
            if not low <= value <= high:
                msg = f"Input should be between {low} and {high}"
                raise _invalid([*loc, name], msg, "range", value)
        return float(settings.get("speed") or 1.0)

    def _speech(self, text: str, fmt: OutputFormat, voice_speed: float) -> _Speech:
        ms = self.config.ms_per_char(voice_speed)
        per_chunk = max(1, round(self.config.chunk_ms / ms))
        return _Speech(text, fmt, ms, per_chunk)

    # -- REST --

    async def _convert(self, request: web.Request) -> web.StreamResponse:
        return await self._rest(request, "convert")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        return await self._rest(request, "stream")

    async def _convert_timestamps(self, request: web.Request) -> web.StreamResponse:
        return await self._rest(request, "convert_with_timestamps")

    async def _stream_timestamps(self, request: web.Request) -> web.StreamResponse:
        return await self._rest(request, "stream_with_timestamps")

    async def _rest(self, request: web.Request, kind: str) -> web.StreamResponse:
        record = self._record(kind, request)
        try:
            speech = await self._rest_checks(request, record)
        except _Refusal as refusal:
            record.status, record.error = refusal.status, refusal.error
            self._finish(record)
            return web.json_response(refusal.body, status=refusal.status)
        try:
            return await self._speak_rest(request, record, speech)
        finally:
            self._finish(record)

    async def _rest_checks(self, request: web.Request, record: TtsRequest) -> _Speech:
        failure = self._injected_failure()
        if failure is not None:
            raise failure
        key = request.headers.get("xi-api-key")
        record.auth_ok = self._key_ok(key)
        self._check_key(key)
        record.output_format = self._output_format(request.query)
        self._query_bool(request.query, "enable_logging")
        self._query_int(request.query, "optimize_streaming_latency", 0, 4)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            raise _invalid(["body"], "JSON decode error", "json_invalid") from None
        record.body = body
        if not isinstance(body, dict):
            raise _invalid(["body"], "Input should be a valid dictionary", "dict_type", body)
        text = body.get("text")
        if text is None:
            raise _invalid(["body", "text"], "Field required", "missing")
        if not isinstance(text, str):
            raise _invalid(["body", "text"], "Input should be a valid string", "string_type", text)
        record.model_id = self._check_model(body.get("model_id"), ["body", "model_id"])
        voice_speed = self._voice_speed(body.get("voice_settings"), ["body", "voice_settings"])
        self._check_voice(record.voice_id)
        if not text.strip():
            raise _detail(400, "invalid_text")
        if len(text) > MAX_TEXT_CHARS:
            raise _detail(400, "text_too_long", limit=MAX_TEXT_CHARS)
        fmt = self._simulated(record.output_format)
        return self._speech(text, fmt, voice_speed)

    async def _speak_rest(
        self, request: web.Request, record: TtsRequest, speech: _Speech
    ) -> web.StreamResponse:
        timestamps = "with_timestamps" in record.kind
        record.characters, record.text, record.status = len(speech.text), speech.text, 200
        headers = {
            "request-id": secrets.token_hex(10),
            "history-item-id": secrets.token_hex(10),
            "character-cost": str(len(speech.text)),
        }
        pacer = _Pacer(self.config, record.started_at)
        if record.kind == "convert_with_timestamps":  # one JSON object, once generated
            await pacer.wait(len(speech.text) * speech.ms_per_char)
            await pacer.wait(0.0)  # all of it generated before the answer
            audio = speech.audio(0, len(speech.text))
            self._sent_audio(record, audio)
            alignment = speech.seconds_alignment(0, len(speech.text))
            body = {
                "audio_base64": base64.b64encode(audio).decode(),
                "alignment": alignment,
                "normalized_alignment": alignment,
            }
            return web.json_response(body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.content_type = "application/json" if timestamps else speech.fmt.content_type
        response.enable_chunked_encoding()
        await response.prepare(request)
        cut_after = self._cut_after()
        for start, end in speech.chunks():
            if cut_after is not None and record.chunks >= cut_after:
                return self._cut_rest(request, record, response)
            await pacer.wait((end - start) * speech.ms_per_char)
            audio = speech.audio(start, end)
            if timestamps:
                alignment = speech.seconds_alignment(start, end)
                line = {
                    "audio_base64": base64.b64encode(audio).decode(),
                    "alignment": alignment,
                    "normalized_alignment": alignment,
                }
                payload = json.dumps(line, ensure_ascii=False).encode() + b"\n"
            else:
                payload = audio
            try:
                await response.write(payload)
            except ConnectionError:
                return response  # the client went away
            self._sent_audio(record, audio)
        await response.write_eof()
        return response

    def _cut_rest(
        self, request: web.Request, record: TtsRequest, response: web.StreamResponse
    ) -> web.StreamResponse:
        """End the body without its terminating chunk: the TCP connection just dies."""
        record.cut = True
        transport = request.transport
        if transport is not None:
            transport.abort()
        return response

    def _sent_audio(self, record: TtsRequest, audio: bytes) -> None:
        if record.first_audio_at is None:
            record.first_audio_at = time.monotonic()
        record.audio += audio
        record.chunks += 1
        self._notify()

    # -- stream-input (websocket) --

    async def _stream_input(self, request: web.Request) -> web.StreamResponse:
        record = self._record("stream_input", request)
        failure = self._injected_failure()
        if failure is not None:
            record.status, record.error = failure.status, failure.error
            self._finish(record)
            return web.json_response(failure.body, status=failure.status)
        ws = web.WebSocketResponse(compress=False, max_msg_size=4 * 1024 * 1024, timeout=2.0)
        if not ws.can_prepare(request).ok:
            record.status, record.error = 426, "websocket_required"
            self._finish(record)
            body = error_detail("invalid_message", reason="Expected a WebSocket upgrade.")
            return web.json_response(body, status=426)
        await ws.prepare(request)
        record.status = 101
        self._sockets.add(ws)
        session = _InputSession(self, record, ws, request)
        try:
            await session.run()
        finally:
            self._sockets.discard(ws)
            self._finish(record)
        return ws


class _InputSession:
    """One stream-input connection: the reader (this task) and the speaker task."""

    def __init__(
        self,
        sim: ElevenLabsSimulator,
        record: TtsRequest,
        ws: web.WebSocketResponse,
        request: web.Request,
    ) -> None:
        self.sim, self.cfg, self.record, self.ws, self.request = (
            sim,
            sim.config,
            record,
            ws,
            request,
        )
        self.buffer = ""
        self.schedule: list[float] = list(DEFAULT_CHUNK_SCHEDULE)
        self.generations = 0
        self.auto_mode = False
        self.inactivity_s: float = DEFAULT_INACTIVITY_S
        self.voice_speed = 1.0
        self.fmt: OutputFormat | None = None
        self.jobs: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
        self.cut_after = sim._cut_after()
        self.pacer = _Pacer(self.cfg, time.monotonic())

    async def run(self) -> None:
        speaker: asyncio.Task | None = None
        try:
            await self._open()
            speaker = asyncio.ensure_future(self._speak())
            await self._read()
            await speaker
        except _Refusal as refusal:
            if speaker is not None:
                speaker.cancel()
            await self._refuse(refusal)
        except _Dropped:
            pass
        finally:
            if speaker is not None:  # done or not: its end (a cut's _Dropped) is retrieved here
                speaker.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Dropped):
                    await speaker
        # The client's close frame, if it sends one after ours.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                async for _ in self.ws:
                    pass

    async def _open(self) -> None:
        query = self.request.query
        record = self.record
        first = await self._receive()
        header_key = self.request.headers.get("xi-api-key")
        key = header_key or first.get("xi-api-key") or first.get("xi_api_key")
        record.auth_ok = self.sim._key_ok(key)
        self.sim._check_key(key)
        record.output_format = self.sim._output_format(query)
        record.model_id = self.sim._check_model(query.get("model_id"), ["query", "model_id"])
        for name in ("enable_logging", "enable_ssml_parsing", "sync_alignment", "auto_mode"):
            value = self.sim._query_bool(query, name)
            if name == "auto_mode":
                self.auto_mode = bool(value)
        self.sim._query_int(query, "optimize_streaming_latency", 0, 4)
        inactivity = self.sim._query_int(query, "inactivity_timeout", 1, MAX_INACTIVITY_S)
        self.inactivity_s = inactivity or DEFAULT_INACTIVITY_S
        self.sim._check_voice(record.voice_id)
        self.fmt = self.sim._simulated(record.output_format)
        self.voice_speed = self.sim._voice_speed(first.get("voice_settings"), ["voice_settings"])
        config = first.get("generation_config") or {}
        if not isinstance(config, dict):
            msg = "Input should be a valid dictionary"
            raise _invalid(["generation_config"], msg, "dict_type", config)
        schedule = config.get("chunk_length_schedule")
        if schedule is not None:
            if not isinstance(schedule, list) or not schedule:
                raise _invalid(
                    ["generation_config", "chunk_length_schedule"],
                    "Input should be a valid list",
                    "list_type",
                    schedule,
                )
            if not all(isinstance(v, int | float) and 50 <= v <= 500 for v in schedule):
                raise _invalid(
                    ["generation_config", "chunk_length_schedule"],
                    "Each item should be in the range 50-500",
                    "range",
                    schedule,
                )
            self.schedule = list(schedule)
        self._add_text(first)

    async def _receive(self) -> dict:
        """The next client message, parsed; a timeout or bad message is a _Refusal."""
        try:
            msg = await self.ws.receive(timeout=self.inactivity_s)
        except TimeoutError:
            timeout = int(self.inactivity_s)
            raise _detail(1008, "input_timeout_exceeded", timeout=timeout) from None
        if msg.type != WSMsgType.TEXT:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                raise _Dropped
            raise _detail(1008, "invalid_message", reason="Binary messages are not accepted.")
        try:
            message = json.loads(msg.data)
        except ValueError:
            raise _detail(1008, "invalid_message", reason="Message is not valid JSON.") from None
        if not isinstance(message, dict) or not isinstance(message.get("text"), str):
            raise _detail(1008, "invalid_message", reason="Message must have a string 'text'.")
        self.record.messages.append(message)
        self.sim._notify()
        return message

    async def _read(self) -> None:
        while True:
            message = await self._receive()
            if message["text"] == "":
                self._generate()
                self.jobs.put_nowait(None)
                return
            self._add_text(message)

    def _add_text(self, message: dict) -> None:
        text = message["text"]
        if text.strip() or self.buffer:
            self.buffer += text
        threshold = self.schedule[min(self.generations, len(self.schedule) - 1)]
        if (
            message.get("flush")
            or self.auto_mode
            or len(self.buffer) >= threshold
            or (message.get("try_trigger_generation") and len(self.buffer) >= TRY_TRIGGER_MIN_CHARS)
        ):
            self._generate()

    def _generate(self) -> None:
        if not self.buffer.strip():
            return
        text, self.buffer = self.buffer, ""
        self.generations += 1
        self.record.characters += len(text)
        self.record.text += text
        self.jobs.put_nowait((text, time.monotonic()))

    async def _speak(self) -> None:
        assert self.fmt is not None
        while True:
            job = await self.jobs.get()
            if job is None:
                await self._send({"isFinal": True})
                self.record.close_code = 1000
                await self.ws.close(code=1000, message=b"")
                return
            text, since = job
            self.pacer.restart(since)
            speech = self.sim._speech(text, self.fmt, self.voice_speed)
            for start, end in speech.chunks():
                if self.cut_after is not None and self.record.chunks >= self.cut_after:
                    self._cut()
                await self.pacer.wait((end - start) * speech.ms_per_char)
                audio = speech.audio(start, end)
                alignment = speech.ms_alignment(start, end)
                message = {
                    "audio": base64.b64encode(audio).decode(),
                    "isFinal": None,
                    "normalizedAlignment": alignment,
                    "alignment": alignment,
                }
                await self._send(message)
                self.sim._sent_audio(self.record, audio)

    def _cut(self) -> None:
        self.record.cut, self.record.close_code = True, 1006
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        raise _Dropped

    async def _send(self, message: dict) -> None:
        if self.ws.closed:
            raise _Dropped
        try:
            await self.ws.send_str(json.dumps(message, ensure_ascii=False))
        except ConnectionError:
            raise _Dropped from None
        self.record.sent.append(message)

    async def _refuse(self, refusal: _Refusal) -> None:
        """ElevenLabs' last message on an error, then a 1008 close."""
        detail = refusal.body["detail"]
        if isinstance(detail, list):  # a validation error: say what and where
            item = detail[0]
            text = f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}"
        else:
            text = detail["message"]
        self.record.error, self.record.close_code = refusal.error, 1008
        with contextlib.suppress(_Dropped):
            await self._send({"message": text, "error": refusal.error, "code": 1008})
        with contextlib.suppress(Exception):
            await self.ws.close(code=1008, message=text.encode()[:120])


class _Dropped(Exception):
    """The connection is gone (the client left, or a cut fault killed it)."""


# ---- command line ----------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ElevenLabs text-to-speech simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument(
        "--api-key", default=None, help="the one key accepted (default: any non-empty key)"
    )
    parser.add_argument("--latency-ms", type=float, default=75.0, help="first-audio latency")
    parser.add_argument("--speed", type=float, default=4.0, help="x real time (inf: no pacing)")
    parser.add_argument("--chars-per-second", type=float, default=14.0, help="speaking rate")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    cfg = ElevenLabsSimConfig(
        api_key=args.api_key,
        first_audio_latency_ms=args.latency_ms,
        speed=args.speed,
        chars_per_second=args.chars_per_second,
    )
    sim = ElevenLabsSimulator(cfg)
    await serve(sim, args.host, args.port, lambda: [
        f"ElevenLabs simulator listening on {sim.base_url}",
        f"  ElevenLabs(api_key='sk_sim', base_url='{sim.base_url}')",
        f"  voices: {', '.join(cfg.voices)}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    run(_serve_forever(args), args.log_level)


if __name__ == "__main__":
    main()
