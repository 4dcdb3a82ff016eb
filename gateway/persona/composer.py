"""Compose a Realtime session's instructions from a persona, a channel and the person's memory.

Everything here is pure: no I/O, no clock (pass ``now``), so calls and WhatsApp get byte-identical
instructions for the same inputs and the tests need no fixtures beyond a loaded persona.

Every word the model or the person reads comes from the persona's files; this module only
arranges them. Token counts are *estimated* as ``ceil(chars / 4)``: cheap, deterministic and
close enough for a budget that only decides how many old turns to drop. Portuguese tends to
take a few more real tokens per character than English, so leave the model's context some slack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Literal, get_args

Channel = Literal["call", "whatsapp_voice", "whatsapp_text"]
CHANNELS: tuple[str, ...] = get_args(Channel)

# Order matters: identity first so everything after reads as "this person's" style and rules;
# rules last among the layers so they are the freshest constraint before the channel notes.
LAYERS: tuple[str, ...] = ("identity", "expertise", "style", "language", "rules")

CHARS_PER_TOKEN = 4
SECTION_SEP = "\n\n"
# Below this many characters a clipped turn says too little to be worth its label.
MIN_CLIPPED_CHARS = 120
# WhatsApp ProfileName is chosen by the sender: keep it one short line so it cannot smuggle
# headings or paragraphs of "instructions" into the prompt.
MAX_NAME_CHARS = 60


@dataclass(frozen=True)
class Persona:
    """A persona as loaded from its directory; see ``gateway.persona.load_persona``."""

    name: str
    display_name: str
    layers: dict[str, str]  # LAYERS order
    channels: dict[str, str]  # channel -> instructions
    greetings: dict[str, str]  # "known" ({name}) / "unknown" spoken opening lines
    messages: dict[str, str]  # fixed messages the gateway sends without the model
    voice: str  # Realtime voice, built-in or custom (voice_...); REALTIME_VOICE overrides it
    language: str  # BCP-47, e.g. for Twilio <Say language=...>
    say_voice: str  # Twilio <Say voice=...> for the fixed spoken messages
    channel_labels: dict[str, str]  # channel -> label used in the history lines
    channel_greetings: dict[str, str]  # channel -> how to open, with {greeting}
    prompt: dict[str, str]  # headings and sentences framing the memory sections
    tz: tzinfo  # local time for the dates shown in the history
    source: Path  # directory it was loaded from, for logs and errors
    summarizer: str = ""  # instructions for the text model that keeps the rolling summary
    tools: dict[str, dict[str, str]] = field(default_factory=dict)  # tools.toml's tables


@dataclass
class MemoryTurn:
    role: Literal["user", "assistant"]
    text: str
    channel: str  # one of CHANNELS; anything else is shown as-is
    at: datetime  # naive datetimes are taken as UTC


@dataclass
class MemoryContext:
    name: str | None
    phone_hint: str | None
    summary: str | None
    turns: list[MemoryTurn]
    first_contact: bool


def estimate_tokens(text: str) -> int:
    """ceil(chars / 4): the estimate every budget in the gateway uses."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def compose_instructions(
    persona: Persona,
    channel: Channel,
    memory: MemoryContext | None = None,
    *,
    budget_tokens: int = 3000,
    now: datetime | None = None,
) -> str:
    """Session instructions: layers, channel notes, who the person is, summary, latest turns.

    The persona, the "who" section and the summary are always kept, even past the budget (they
    are the clone's identity and the only long-term memory); only the turns are fitted into what
    is left, newest first, so the oldest are the ones dropped.
    """
    _check_channel(persona, channel)
    sections = [persona.layers[layer] for layer in LAYERS]
    sections.append(channel_section(persona, channel))
    sections.append(_who_section(persona, memory, now))
    if memory and memory.summary and memory.summary.strip():
        sections.append(f"{persona.prompt['summary_heading']}\n{memory.summary.strip()}")
    head = SECTION_SEP.join(sections)
    if not memory or not memory.turns:
        return head
    room = budget_tokens * CHARS_PER_TOKEN - len(head) - len(SECTION_SEP)
    history = _history_section(persona, memory.turns, room, now)
    return f"{head}{SECTION_SEP}{history}" if history else head


def compose_news(
    persona: Persona,
    turns: list[MemoryTurn],
    *,
    budget_tokens: int = 1500,
    now: datetime | None = None,
) -> str:
    """What a session opened earlier has not seen: the person's turns on another channel since,
    under their own heading, newest kept first within the budget ("" when there is nothing)."""
    if not turns:
        return ""
    return _history_section(
        persona, turns, budget_tokens * CHARS_PER_TOKEN, now, heading=persona.prompt["news_heading"]
    )


def greeting_instruction(
    persona: Persona, channel: Channel, memory: MemoryContext | None = None
) -> str:
    """The short instruction for the clone's opening line: by name when known, else warm generic."""
    _check_channel(persona, channel)
    name = _one_line(memory.name, MAX_NAME_CHARS) if memory and memory.name else ""
    if name:
        greeting = persona.greetings["known"].format(name=name)
    else:
        greeting = persona.greetings["unknown"]
    return persona.channel_greetings[channel].format(greeting=greeting)


def _check_channel(persona: Persona, channel: str) -> None:
    if channel not in persona.channels:
        raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")


def channel_section(persona: Persona, channel: str) -> str:
    heading = persona.prompt["channel_heading"].format(label=persona.channel_labels[channel])
    return f"{heading}\n{persona.channels[channel]}"


def _who_section(persona: Persona, memory: MemoryContext | None, now: datetime | None) -> str:
    p = persona.prompt
    lines = [p["who_heading"]]
    if now is not None:
        lines.append(p["today"].format(date=_local(now, persona.tz).strftime("%d/%m/%Y")))
    name = _one_line(memory.name, MAX_NAME_CHARS) if memory and memory.name else ""
    lines.append(p["name_known"].format(name=name) if name else p["name_unknown"])
    phone = _one_line(memory.phone_hint, MAX_NAME_CHARS) if memory and memory.phone_hint else ""
    if phone:
        lines.append(p["phone_hint"].format(phone=phone))
    if memory is not None:
        lines.append(p["first_contact"] if memory.first_contact else p["returning"])
    return "\n".join(lines)


def _history_section(
    persona: Persona,
    turns: list[MemoryTurn],
    room: int,
    now: datetime | None,
    heading: str | None = None,
) -> str:
    """The heading plus as many of the newest turns as fit in ``room`` characters."""
    heading = heading or persona.prompt["turns_heading"]
    room -= len(heading)
    ordered = sorted(turns, key=lambda t: _aware(t.at))
    reference = now if now is not None else ordered[-1].at
    kept: list[str] = []
    for turn in reversed(ordered):
        text = _one_line(turn.text)
        if not text:
            continue
        prefix = _turn_prefix(persona, turn, reference)
        line = prefix + text
        if len(line) + 1 > room:  # +1: the newline before it
            clipped = _clip(persona, prefix, text, room - 1)
            if clipped:
                kept.append(clipped)
            break
        kept.append(line)
        room -= len(line) + 1
    if not kept:
        return ""
    return "\n".join([heading, *reversed(kept)])


def _turn_prefix(persona: Persona, turn: MemoryTurn, reference: datetime) -> str:
    label = persona.channel_labels.get(turn.channel, turn.channel)
    when = _local(turn.at, persona.tz)
    fmt = "%d/%m" if when.year == _local(reference, persona.tz).year else "%d/%m/%Y"
    who = persona.prompt["user_label" if turn.role == "user" else "assistant_label"]
    return f"[{label}, {when.strftime(fmt)}] {who}: "


def _clip(persona: Persona, prefix: str, text: str, room: int) -> str:
    """The turn cut to ``room`` characters with a marker, or "" if too little would survive."""
    marker = " " + persona.prompt["clipped"]
    keep = room - len(prefix) - len(marker)
    if keep < MIN_CLIPPED_CHARS:
        return ""
    return prefix + text[:keep].rstrip() + marker


def _one_line(text: str, limit: int | None = None) -> str:
    """Collapse all whitespace so a stored text can never open a new line or section."""
    flat = " ".join(text.split())
    return flat[:limit].rstrip() if limit else flat


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _local(at: datetime, tz: tzinfo) -> datetime:
    return _aware(at).astimezone(tz)
