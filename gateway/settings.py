"""The one home of configuration: a frozen Settings read from the environment.

Every variable is parsed and checked at start; a bad value raises SettingsError naming
the variable, so a misconfigured deploy fails loudly before it takes a call.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TWILIO_API_BASE_URL = "https://api.twilio.com"
DEFAULT_DATABASE_URL = "sqlite:///data/gateway.db"
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
CUSTOM_VOICE = re.compile(r"voice_[A-Za-z0-9_-]+")  # a voice made from recordings, by its id
VAD_TYPES = ("server_vad", "semantic_vad")
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
VOICE_PROVIDERS = ("openai", "elevenlabs")
VOICE_BACKENDS = ("realtime", "live")  # OpenAI's Realtime API, or its successor GPT-Live
DEFAULT_LIVE_MODEL = "gpt-live-1.1"  # the newest of the SDK's SessionConfig.model literals
# ElevenLabs' low-latency multilingual model (Portuguese included), ~75 ms to first audio.
DEFAULT_ELEVENLABS_MODEL = "eleven_flash_v2_5"
DEFAULT_ELEVENLABS_BASE_URL = "https://api.elevenlabs.io"
SANDBOX_ELEVENLABS_VOICE = "sandbox-endrigo"  # the simulator's voice, when no key is set


def voice_problem(value: str) -> str | None:
    """Why `value` is no Realtime voice: a built-in name or a custom voice id; None if it is."""
    if value in VOICES or CUSTOM_VOICE.fullmatch(value):
        return None
    return f"must be one of {', '.join(VOICES)} or a custom voice id (voice_...); got {value!r}"


class SettingsError(ValueError):
    """A configuration variable is missing or invalid; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str = DEFAULT_OPENAI_BASE_URL
    realtime_model: str = "gpt-realtime-2.1"
    realtime_voice: str | None = None  # None: the persona's voice
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_api_base_url: str = DEFAULT_TWILIO_API_BASE_URL
    public_base_url: str = ""
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "0.0.0.0"
    port: int = 8080
    persona: str = "endrigo"
    admin_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    vad_type: str = "server_vad"
    vad_threshold: float = 0.5
    vad_silence_ms: int = 500
    vad_prefix_ms: int = 300
    sim_first_audio_ms: int = 300
    call_claim_timeout_s: float = 10.0
    realtime_session_max_s: float = 3300.0
    realtime_open_timeout_s: float = 10.0
    realtime_close_timeout_s: float = 1.0
    realtime_stall_s: float = 8.0
    whatsapp_session_idle_s: float = 180.0
    whatsapp_concurrency: int = 16
    max_media_bytes: int = 16 * 1024 * 1024
    max_voice_note_s: int = 300
    media_ttl_s: int = 3600
    summary_model: str = "gpt-5.4-mini"
    summary_interval_s: float = 60.0
    summary_retry_s: float = 30.0
    conversation_idle_s: float = 1800.0
    prices_file: Path = Path("config/prices.toml")
    whatsapp_burst: int = 5
    whatsapp_per_hour: int = 40
    daily_budget_usd: float = 2.0
    max_live_calls: int = 100
    max_parked_calls: int = 50
    media_read_deadline_s: float = 30.0
    crm_webhook_url: str | None = None
    crm_webhook_secret: str | None = field(default=None, repr=False)
    human_transfer_number: str | None = None
    human_whatsapp_number: str | None = None
    crm_retry_s: float = 5.0
    instance_id: str = "gateway"
    public_stream_base_url: str = ""  # "": PUBLIC_BASE_URL
    instance_timeout_s: float = 15.0
    voice_backend: str = "realtime"
    live_model: str = DEFAULT_LIVE_MODEL
    live_tools_model: str = "gpt-5.4-mini"  # GPT-Live's Responses backend, which runs tools
    voice_provider: str = "openai"
    elevenlabs_api_key: str | None = field(default=None, repr=False)
    elevenlabs_voice_id: str | None = None
    elevenlabs_model: str = DEFAULT_ELEVENLABS_MODEL
    elevenlabs_base_url: str = DEFAULT_ELEVENLABS_BASE_URL

    @property
    def sandbox_elevenlabs(self) -> bool:
        """ElevenLabs chosen without a key (the sandbox): its simulator stands in."""
        return self.voice_provider == "elevenlabs" and not self.elevenlabs_api_key

    @property
    def sandbox_realtime(self) -> bool:
        """No API key: the in-process Realtime simulator stands in for OpenAI."""
        return not self.openai_api_key

    @property
    def sandbox_twilio(self) -> bool:
        """No Twilio credentials: the in-process Twilio simulator stands in."""
        return not (self.twilio_account_sid and self.twilio_auth_token)

    @property
    def realtime_ws_url(self) -> str:
        """The websocket URL the SDK derives from OPENAI_BASE_URL (http -> ws, https -> wss)."""
        parts = urlsplit(self.openai_base_url)
        scheme = "ws" if parts.scheme == "http" else "wss"
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/realtime"

    @property
    def database_path(self) -> Path:
        return Path(self.database_url.removeprefix("sqlite:///"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        port = reader.integer("PORT", 8080, 1, 65535)
        host = reader.text("HOST", "0.0.0.0")
        sid = reader.optional("TWILIO_ACCOUNT_SID")
        token = reader.optional("TWILIO_AUTH_TOKEN")
        _check_twilio_pair(sid, token)
        local = f"http://127.0.0.1:{port}"
        crm_url = reader.url("CRM_WEBHOOK_URL", "") if reader.optional("CRM_WEBHOOK_URL") else None
        return cls(
            openai_api_key=reader.optional("OPENAI_API_KEY"),
            openai_base_url=reader.url("OPENAI_BASE_URL", DEFAULT_OPENAI_BASE_URL),
            realtime_model=reader.text("REALTIME_MODEL", "gpt-realtime-2.1"),
            realtime_voice=reader.voice("REALTIME_VOICE"),
            twilio_account_sid=sid,
            twilio_auth_token=token,
            twilio_api_base_url=reader.url("TWILIO_API_BASE_URL", DEFAULT_TWILIO_API_BASE_URL),
            public_base_url=reader.url("PUBLIC_BASE_URL", local, origin_only=True),
            database_url=_database_url(reader.text("DATABASE_URL", DEFAULT_DATABASE_URL)),
            host=host,
            port=port,
            persona=reader.text("PERSONA", "endrigo"),
            admin_token=reader.optional("ADMIN_TOKEN"),
            log_level=reader.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            vad_type=reader.choice("VAD_TYPE", "server_vad", VAD_TYPES),
            vad_threshold=reader.number("VAD_THRESHOLD", 0.5, 0.0, 1.0),
            vad_silence_ms=reader.integer("VAD_SILENCE_MS", 500, 100, 5000),
            vad_prefix_ms=reader.integer("VAD_PREFIX_MS", 300, 0, 2000),
            sim_first_audio_ms=reader.integer("SIM_FIRST_AUDIO_MS", 300, 0, 10000),
            call_claim_timeout_s=reader.number("CALL_CLAIM_TIMEOUT_S", 10.0, 0.5, 120.0),
            # One age for every Realtime session (calls and WhatsApp), below the API's 60-minute
            # cap; CALL_SESSION_ROTATE_S is its old, calls-only name.
            realtime_session_max_s=reader.number(
                "REALTIME_SESSION_MAX_S",
                reader.number("CALL_SESSION_ROTATE_S", 3300.0, 1.0, 3500.0),
                1.0,
                3500.0,
            ),
            realtime_open_timeout_s=reader.number("REALTIME_OPEN_TIMEOUT_S", 10.0, 0.5, 60.0),
            realtime_close_timeout_s=reader.number("REALTIME_CLOSE_TIMEOUT_S", 1.0, 0.05, 10.0),
            realtime_stall_s=reader.number("REALTIME_STALL_S", 8.0, 0.2, 120.0),
            # Below the Realtime API's 60-minute session cap, which the warm session must not hit.
            whatsapp_session_idle_s=reader.number("WHATSAPP_SESSION_IDLE_S", 180.0, 1.0, 3000.0),
            whatsapp_concurrency=reader.integer("WHATSAPP_CONCURRENCY", 16, 1, 256),
            # WhatsApp's own media limit is 16 MB; more is never a legitimate voice note.
            max_media_bytes=reader.integer(
                "MAX_MEDIA_BYTES", 16 * 1024 * 1024, 1024, 100 * 1024 * 1024
            ),
            max_voice_note_s=reader.integer("MAX_VOICE_NOTE_S", 300, 1, 900),
            media_ttl_s=reader.integer("MEDIA_TTL_S", 3600, 60, 7 * 24 * 3600),
            summary_model=reader.text("SUMMARY_MODEL", "gpt-5.4-mini"),
            summary_interval_s=reader.number("SUMMARY_INTERVAL_S", 60.0, 0.05, 3600.0),
            summary_retry_s=reader.number("SUMMARY_RETRY_S", 30.0, 0.05, 3600.0),
            conversation_idle_s=reader.number("CONVERSATION_IDLE_S", 1800.0, 0.1, 7 * 86400.0),
            prices_file=Path(reader.text("PRICES_FILE", "config/prices.toml")),
            # Guardrails: per person, WhatsApp turns (a token bucket: a burst, then so many an
            # hour; extra messages wait and are answered together) and a daily spend in USD
            # (0 turns the budget off); globally, paid Realtime sessions held at once.
            whatsapp_burst=reader.integer("WHATSAPP_BURST", 5, 1, 1000),
            whatsapp_per_hour=reader.integer("WHATSAPP_PER_HOUR", 40, 1, 100000),
            daily_budget_usd=reader.number("DAILY_BUDGET_USD", 2.0, 0.0, 100000.0),
            max_live_calls=reader.integer("MAX_LIVE_CALLS", 100, 1, 10000),
            max_parked_calls=reader.integer("MAX_PARKED_CALLS", 50, 1, 10000),
            # A media body that drips in slower than this is cut: a worker slot is not a hostage.
            media_read_deadline_s=reader.number("MEDIA_READ_DEADLINE_S", 30.0, 0.1, 600.0),
            # The clone's tools: leads go to an optional CRM (each body signed with the
            # secret); a hand-off is offered only where a human's number is set.
            crm_webhook_url=crm_url,
            crm_webhook_secret=_crm_secret(crm_url, reader.optional("CRM_WEBHOOK_SECRET")),
            human_transfer_number=reader.e164("HUMAN_TRANSFER_NUMBER"),
            human_whatsapp_number=reader.e164("HUMAN_WHATSAPP_NUMBER"),
            # The first retry of a lead the CRM did not take; each next waits twice as long.
            crm_retry_s=reader.number("CRM_RETRY_S", 5.0, 0.01, 600.0),
            # Several instances on one PostgreSQL store: each names itself (its claims on the
            # queue carry the name) and may have its own media-stream address, so a call's
            # stream reaches the instance that pre-opened its session.
            instance_id=_instance_id(reader.text("INSTANCE_ID", socket.gethostname())),
            public_stream_base_url=reader.stream_url("PUBLIC_STREAM_BASE_URL"),
            # A silent instance is presumed dead after this: its claimed messages go to others.
            instance_timeout_s=reader.number("INSTANCE_TIMEOUT_S", 15.0, 0.5, 3600.0),
            **_voice(reader),
        )


@dataclass
class _Reader:
    env: Mapping[str, str]

    def optional(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(name, f"must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(name, f"must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(name, f"must be between {low} and {high}, got {value}")
        return value

    def voice(self, name: str) -> str | None:
        value = self.optional(name)
        problem = voice_problem(value) if value is not None else None
        if problem:
            raise SettingsError(name, problem)
        return value

    def e164(self, name: str) -> str | None:
        value = self.optional(name)
        if value is not None and not E164.fullmatch(value):
            raise SettingsError(name, f"must be an E.164 number like +5516999990000, got {value!r}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in allowed:
            raise SettingsError(name, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def stream_url(self, name: str) -> str:
        """A websocket base address (http(s) or ws(s)); any path is kept, as a proxy may route
        by it. "" when unset."""
        value = self.text(name, "").rstrip("/")
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc or parts.query:
            raise SettingsError(name, f"must be an http(s) or ws(s) URL, got {value!r}")
        return value

    def url(self, name: str, default: str, *, origin_only: bool = False) -> str:
        value = self.text(name, default).rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(name, f"must be an http(s) URL, got {value!r}")
        if origin_only and (parts.path or parts.query):
            raise SettingsError(name, f"must be scheme://host[:port] with no path, got {value!r}")
        return value


def _check_twilio_pair(sid: str | None, token: str | None) -> None:
    if bool(sid) != bool(token):
        missing = "TWILIO_AUTH_TOKEN" if sid else "TWILIO_ACCOUNT_SID"
        raise SettingsError(
            missing, "set both TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN, or neither"
        )
    if sid and not (sid.startswith("AC") and len(sid) == 34):
        raise SettingsError("TWILIO_ACCOUNT_SID", "must be 'AC' followed by 32 hex characters")


def _voice(reader: _Reader) -> dict[str, Any]:
    """Who speaks the replies: the Realtime model's own voice, or Endrigo's ElevenLabs clone
    (the model then answers in text). ElevenLabs needs a key and a voice, except in the
    sandbox (no OpenAI key either), where its simulator stands in."""
    provider = reader.choice("VOICE_PROVIDER", "openai", VOICE_PROVIDERS)
    backend = reader.choice("VOICE_BACKEND", "realtime", VOICE_BACKENDS)
    if backend == "live" and provider == "elevenlabs":
        raise SettingsError(
            "VOICE_BACKEND",
            "GPT-Live always answers in its own voice (no text-only replies for ElevenLabs): "
            "set VOICE_BACKEND=realtime, or VOICE_PROVIDER=openai",
        )
    key = reader.optional("ELEVENLABS_API_KEY")
    voice_id = reader.optional("ELEVENLABS_VOICE_ID")
    if voice_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", voice_id):
        raise SettingsError(
            "ELEVENLABS_VOICE_ID", f"must be an ElevenLabs voice id, got {voice_id!r}"
        )
    if provider == "openai" and voice_id is not None:
        raise SettingsError(
            "VOICE_PROVIDER",
            "ELEVENLABS_VOICE_ID is set: set VOICE_PROVIDER=elevenlabs, or unset it",
        )
    if provider == "elevenlabs" and reader.optional("OPENAI_API_KEY"):
        if key is None:
            raise SettingsError(
                "ELEVENLABS_API_KEY", "must be set with VOICE_PROVIDER=elevenlabs and OpenAI's key"
            )
        if voice_id is None:
            raise SettingsError("ELEVENLABS_VOICE_ID", "must name the cloned voice to speak with")
    if provider == "elevenlabs" and key is None:
        voice_id = voice_id or SANDBOX_ELEVENLABS_VOICE
    return {
        "voice_backend": backend,
        "live_model": reader.text("LIVE_MODEL", DEFAULT_LIVE_MODEL),
        "live_tools_model": reader.text("LIVE_TOOLS_MODEL", "gpt-5.4-mini"),
        "voice_provider": provider,
        "elevenlabs_api_key": key,
        "elevenlabs_voice_id": voice_id,
        "elevenlabs_model": reader.text("ELEVENLABS_MODEL", DEFAULT_ELEVENLABS_MODEL),
        "elevenlabs_base_url": reader.url("ELEVENLABS_BASE_URL", DEFAULT_ELEVENLABS_BASE_URL),
    }


def _instance_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}", value):
        raise SettingsError("INSTANCE_ID", "letters, digits and _.:- only, at most 63 characters")
    return value


def _crm_secret(url: str | None, secret: str | None) -> str | None:
    if url and not secret:
        raise SettingsError(
            "CRM_WEBHOOK_SECRET", "must be set with CRM_WEBHOOK_URL (it signs each lead)"
        )
    return secret


def _database_url(value: str) -> str:
    path = value.removeprefix("sqlite:///")
    if value.startswith("sqlite:///") and (path == ":memory:" or "mode=memory" in path):
        # The webhook intake opens its own connection, which would get a private, empty
        # database: every message would be acknowledged and never answered.
        raise SettingsError(
            "DATABASE_URL", "an in-memory SQLite database is not supported; give a file path"
        )
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(value)
        if not parts.path.strip("/") or not (parts.hostname or "host=" in parts.query):
            raise SettingsError(
                "DATABASE_URL", "must name a host and a database: postgresql://user@host/db"
            )
        return value
    raise SettingsError(
        "DATABASE_URL",
        "must look like sqlite:///path/to/file.db or postgresql://user@host/db, "
        f"got {redacted_url(value)!r}",
    )


def redacted_url(url: str) -> str:
    """A URL fit for a log: any password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
