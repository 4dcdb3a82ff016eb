"""The clone's tools as a contract: names, parameters, which channel offers which, and the
checks on the arguments a model sends. No I/O (`tool_runner.py` carries the tools out).

The names and parameter names are fixed here, in code, because operators write prompts and
reports against them; what the model reads about each (descriptions, results) is persona text
(`tools.toml`). A tool is offered only where it can work: the hand-off needs a human's number,
and `end_call` / `send_whatsapp` exist only on a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.persona import Persona
from gateway.settings import Settings
from gateway.store import INTERESTS, Lead

SAVE_LEAD = "save_lead"
TRANSFER_TO_HUMAN = "transfer_to_human"
END_CALL = "end_call"
SEND_WHATSAPP = "send_whatsapp"

# name -> (parameter -> required); every parameter is a string.
PARAMETERS: dict[str, dict[str, bool]] = {
    SAVE_LEAD: {
        "name": True,
        "interest": True,
        "company": False,
        "city": False,
        "budget": False,
        "timeline": False,
        "notes": False,
    },
    TRANSFER_TO_HUMAN: {"reason": True},
    END_CALL: {},
    SEND_WHATSAPP: {"text": True},
}
MAX_CHARS = {"notes": 1000, "text": 1500, "reason": 500}  # others: DEFAULT_MAX_CHARS
DEFAULT_MAX_CHARS = 200
MAX_ARGUMENTS_BYTES = 16_384

Surface = Literal["call", "whatsapp"]


class BadArguments(ValueError):
    """What the model sent cannot be used; the message says what, for the model to ask."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


def offered(settings: Settings, surface: Surface) -> tuple[str, ...]:
    """The tools a session on this surface may use, given what the owner configured."""
    human = settings.human_transfer_number if surface == "call" else settings.human_whatsapp_number
    names = [SAVE_LEAD]
    if human:
        names.append(TRANSFER_TO_HUMAN)
    if surface == "call":
        names += [END_CALL, SEND_WHATSAPP]
    return tuple(names)


def definitions(persona: Persona, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """`session.tools` for these names: function tools with JSON-schema parameters."""
    texts = persona.tools
    return [
        {
            "type": "function",
            "name": name,
            "description": texts["descriptions"][name],
            "parameters": _schema(name, texts["parameters"]),
        }
        for name in names
    ]


def _schema(name: str, descriptions: dict[str, str]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for param in PARAMETERS[name]:
        prop: dict[str, Any] = {"type": "string", "description": descriptions[param]}
        if param == "interest":
            prop["enum"] = list(INTERESTS)
        properties[param] = prop
    required = [p for p, needed in PARAMETERS[name].items() if needed]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def parse(call: ToolCall, allowed: tuple[str, ...]) -> dict[str, str]:
    """The call's arguments as clean strings, or BadArguments saying what is wrong."""
    if call.name not in allowed:
        raise BadArguments(f"a ferramenta {call.name[:40]!r} não está disponível")
    if len(call.arguments) > MAX_ARGUMENTS_BYTES:
        raise BadArguments("argumentos longos demais")
    try:
        raw = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        raise BadArguments("argumentos ilegíveis") from None
    if not isinstance(raw, dict):
        raise BadArguments("os argumentos devem ser um objeto")
    spec = PARAMETERS[call.name]
    out: dict[str, str] = {}
    for key, value in raw.items():
        if key not in spec or value is None:
            continue  # a model's extra key is ignored, not fatal
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise BadArguments(f"{key} deve ser um texto")
        text = " ".join(str(value).split()) if key != "text" else str(value).strip()
        if text:
            out[key] = text[: MAX_CHARS.get(key, DEFAULT_MAX_CHARS)]
    missing = [key for key, needed in spec.items() if needed and key not in out]
    if missing:
        raise BadArguments("falta " + ", ".join(missing))
    if call.name == SAVE_LEAD and out["interest"] not in INTERESTS:
        raise BadArguments(f"interest deve ser um de: {', '.join(INTERESTS)}")
    return out


def lead_of(arguments: dict[str, str]) -> Lead:
    return Lead(
        name=arguments["name"],
        interest=arguments["interest"],
        company=arguments.get("company"),
        city=arguments.get("city"),
        budget=arguments.get("budget"),
        timeline=arguments.get("timeline"),
        notes=arguments.get("notes"),
    )
