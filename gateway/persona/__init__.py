"""Personas as editable files, and the loader that turns a persona directory into a ``Persona``.

A persona directory holds one Markdown file per layer (``identity.md`` ... ``rules.md``),
``channels.toml`` (per-channel notes, labels and opening) and ``persona.toml`` (metadata,
greetings, the fixed messages and the framing of the memory sections). The loader checks that
everything is there and non-empty up front, so a typo in an edited file stops the gateway at
startup with the file and key named, instead of producing a half-empty prompt mid-call.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway.persona.composer import (
    CHANNELS,
    LAYERS,
    Channel,
    MemoryContext,
    MemoryTurn,
    Persona,
    channel_section,
    compose_instructions,
    compose_news,
    estimate_tokens,
    greeting_instruction,
)
from gateway.settings import voice_problem

__all__ = [
    "CHANNELS",
    "LAYERS",
    "MESSAGE_KEYS",
    "PERSONAS_ROOT",
    "Channel",
    "MemoryContext",
    "MemoryTurn",
    "Persona",
    "PersonaError",
    "channel_section",
    "compose_instructions",
    "compose_news",
    "estimate_tokens",
    "greeting_instruction",
    "load_persona",
]

PERSONAS_ROOT = Path(__file__).parent / "personas"

MESSAGE_KEYS: tuple[str, ...] = (
    "call_failed_say",
    "unsupported_media",
    "corrupt_audio",
    "too_large",
    "too_long",
    "empty_message",
    "processing_error",
    "data_deletion_ack",
    "calls_busy_say",
    "rate_limited",
    "over_budget",
    "over_budget_say",
)
METADATA_KEYS = ("name", "display_name", "voice", "language", "say_voice", "utc_offset")
CHANNEL_KEYS = ("label", "instructions", "greeting")

# Placeholders each template may use; anything else is a typo that would crash at runtime.
GREETING_FIELDS: dict[str, set[str]] = {"known": {"name"}, "unknown": set()}
PROMPT_FIELDS: dict[str, set[str]] = {
    "channel_heading": {"label"},
    "who_heading": set(),
    "today": {"date"},
    "name_known": {"name"},
    "name_unknown": set(),
    "phone_hint": {"phone"},
    "first_contact": set(),
    "returning": set(),
    "summary_heading": set(),
    "turns_heading": set(),
    "news_heading": set(),
    "user_label": set(),
    "assistant_label": set(),
    "clipped": set(),
    "written_message": {"text"},
}
CHANNEL_GREETING_FIELDS = {"greeting"}
# tools.toml: the texts the model reads about each tool (the names are the code's contract).
_NONE: frozenset[str] = frozenset()
TOOL_TEXT_FIELDS: dict[str, dict[str, frozenset[str]]] = {
    "descriptions": dict.fromkeys(
        ("save_lead", "transfer_to_human", "end_call", "send_whatsapp"), _NONE
    ),
    "parameters": dict.fromkeys(
        ("name", "interest", "company", "city", "budget", "timeline", "notes", "reason", "text"),
        _NONE,
    ),
    "results": {
        **dict.fromkeys(
            (
                "lead_saved",
                "lead_failed",
                "transfer_call",
                "transfer_whatsapp",
                "transfer_failed",
                "end_call",
                "whatsapp_sent",
                "whatsapp_failed",
                "unavailable",
                "read_aloud",
            ),
            _NONE,
        ),
        "bad_arguments": frozenset({"problem"}),
        "handoff_summary": frozenset({"channel", "name", "phone", "reason", "recent"}),
    },
}

# A bare name selects a directory under PERSONAS_ROOT; restricting it keeps "../x" a path.
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class PersonaError(ValueError):
    """A persona directory is missing, unreadable or incomplete; the message names what."""


def load_persona(name: str | os.PathLike[str] = "endrigo", root: Path | None = None) -> Persona:
    """Load a persona by name (a directory under ``root``, default the bundled personas) or path.

    ``PERSONA=endrigo`` and ``PERSONA=/srv/personas/other`` both work: anything with a path
    separator, or starting with "." or "~", is taken as a directory path.
    """
    directory = _resolve(name, root)
    layers = {layer: _read_layer(directory, layer) for layer in LAYERS}
    meta = _read_toml(directory / "persona.toml")
    chans = _read_toml(directory / "channels.toml")
    fields = {key: _text(meta, key, "persona.toml") for key in METADATA_KEYS}
    return Persona(
        name=fields["name"],
        display_name=fields["display_name"],
        layers=layers,
        channels=_channel_field(chans, "instructions", None),
        greetings=_templates(meta, "greetings", GREETING_FIELDS),
        messages=_messages(meta),
        voice=_voice(fields["voice"], directory / "persona.toml"),
        language=fields["language"],
        say_voice=fields["say_voice"],
        channel_labels=_channel_field(chans, "label", None),
        channel_greetings=_channel_field(chans, "greeting", CHANNEL_GREETING_FIELDS),
        prompt=_templates(meta, "prompt", PROMPT_FIELDS),
        tz=_offset(fields["utc_offset"]),
        source=directory,
        summarizer=_read_layer(directory, "summary"),
        tools=_tool_texts(_read_toml(directory / "tools.toml")),
    )


def _tool_texts(data: dict[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for table, fields in TOOL_TEXT_FIELDS.items():
        values, where = _table(data, table, "tools.toml"), f"tools.toml [{table}]"
        out[table] = {key: _template(values, key, where, set(f)) for key, f in fields.items()}
    return out


def _messages(meta: dict[str, Any]) -> dict[str, str]:
    # Plain text, never formatted: braces are allowed and kept as written.
    table = _table(meta, "messages")
    return {key: _text(table, key, "persona.toml [messages]") for key in MESSAGE_KEYS}


def _resolve(name: str | os.PathLike[str], root: Path | None) -> Path:
    text = os.fspath(name)
    if isinstance(name, os.PathLike) or "/" in text or os.sep in text or text[:1] in ".~":
        directory = Path(text).expanduser()
    elif _NAME_RE.fullmatch(text):
        directory = (root or PERSONAS_ROOT) / text
    else:
        raise PersonaError(f"invalid persona name {text!r}: use a directory name or a path")
    if not directory.is_dir():
        raise PersonaError(f"persona {text!r} not found: no directory {directory}{_known(root)}")
    return directory


def _known(root: Path | None) -> str:
    base = root or PERSONAS_ROOT
    names = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    return f" (available in {base}: {', '.join(names)})" if names else ""


def _read_layer(directory: Path, layer: str) -> str:
    path = directory / f"{layer}.md"
    text = _read_text(path, f"missing layer file {layer}.md")
    if not text.strip():
        raise PersonaError(f"{path}: layer file {layer}.md is empty")
    return text.strip()


def _read_text(path: Path, missing: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PersonaError(f"{path.parent}: {missing}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{path}: cannot read ({exc})") from exc


def _read_toml(path: Path) -> dict[str, Any]:
    text = _read_text(path, f"missing file {path.name}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{path}: invalid TOML ({exc})") from exc


def _table(data: dict[str, Any], key: str, where: str = "persona.toml") -> dict[str, Any]:
    table = data.get(key)
    if not isinstance(table, dict):
        raise PersonaError(f"{where}: missing table [{key}]")
    return table


def _voice(value: str, path: Path) -> str:
    problem = voice_problem(value)
    if problem:
        raise PersonaError(f"{path}: voice {problem}")
    return value


def _text(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PersonaError(f"{where}: missing or empty key {key!r}")
    return value.strip()


def _template(table: dict[str, Any], key: str, where: str, allowed: set[str]) -> str:
    value = _text(table, key, where)
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as exc:
        raise PersonaError(f"{where}: key {key!r} has malformed braces ({exc})") from None
    unknown = used - allowed
    if unknown:
        expected = ", ".join(f"{{{f}}}" for f in sorted(allowed)) or "none"
        raise PersonaError(
            f"{where}: key {key!r} uses unknown placeholder(s) "
            f"{', '.join(f'{{{f}}}' for f in sorted(unknown))}; allowed: {expected}"
        )
    return value


def _templates(meta: dict[str, Any], table: str, fields: dict[str, set[str]]) -> dict[str, str]:
    data = _table(meta, table)
    where = f"persona.toml [{table}]"
    return {key: _template(data, key, where, allowed) for key, allowed in fields.items()}


def _channel_field(chans: dict[str, Any], key: str, allowed: set[str] | None) -> dict[str, str]:
    """One key from every channel table; ``allowed`` set means it is a template to check."""
    out = {}
    for channel in CHANNELS:
        table, where = _table(chans, channel, "channels.toml"), f"channels.toml [{channel}]"
        if allowed is None:
            out[channel] = _text(table, key, where)
        else:
            out[channel] = _template(table, key, where, allowed)
    return out


def _offset(text: str) -> timezone:
    try:
        offset = datetime.strptime(text, "%z").utcoffset()
    except ValueError:
        offset = None
    if offset is None:
        raise PersonaError(f"persona.toml: utc_offset {text!r} is not like '-03:00'")
    return timezone(offset)
