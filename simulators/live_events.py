"""Strict validation of GPT-Live events against the openai SDK's own types (`openai.types.live`).

Same approach as realtime_events.py, whose generic pieces it reuses: the top-level union
is discriminated on `type`, validation is strict (the wire is JSON: `"8000"` is not an
integer) and unknown keys are refused at any depth (`unknown_keys` over `model_extra`),
with the real server's wording (`Unknown parameter: 'session.voice'.`, code
`unknown_parameter`). The Live `Error` names the offending command by `client_event_id`,
not Realtime's `event_id` (`live_error`).

One repair: the SDK's *models* make `delegation_id` optional on
`session.{instructions,thinking,commentary}.append`, while its *param* types (what
`conn.send()` is typed against) and docstrings say "Required, nullable". Keys that a
client event's param TypedDict marks `Required` are therefore required at the top level
(`Missing required parameter: 'delegation_id'.`); `null` stays valid.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Required, get_args, get_origin, get_type_hints

from pydantic import BaseModel, TypeAdapter

from simulators.realtime_events import (
    ClientEventError,
    EventError,
    ServerEventError,
    check_event,
    tagged_adapter,
    unknown_keys,
)

__all__ = [
    "ClientEventError",
    "EventError",
    "ServerEventError",
    "check_client_event",
    "check_responses_event",
    "check_server_event",
    "client_event_adapter",
    "live_error",
    "server_event_adapter",
    "unknown_keys",
]


@cache
def client_event_adapter() -> TypeAdapter:
    """Discriminated adapter over the Live `ClientEvent` union, built once (~0.7 s: the
    nested Responses input items of `response.item.create` are a large union)."""
    from openai.types.live import ClientEvent

    return tagged_adapter(ClientEvent)


@cache
def server_event_adapter() -> TypeAdapter:
    """Discriminated adapter over the Live `ServerEvent` union, built once."""
    from openai.types.live import ServerEvent

    return tagged_adapter(ServerEvent)


@cache
def responses_event_adapter() -> TypeAdapter:
    """The Responses streaming events nested in Live's `response.event` (`event: Dict`)."""
    from openai.types.responses import ResponseStreamEvent

    return tagged_adapter(ResponseStreamEvent)


@cache
def _required_by_params() -> dict[str, frozenset[str]]:
    """Top-level keys each client event's param TypedDict marks `Required`, by type."""
    from openai.types.live.client_event_param import ClientEventParam

    required: dict[str, frozenset[str]] = {}
    for param in get_args(ClientEventParam):
        hints = get_type_hints(param, include_extras=True)
        tag = get_args(get_args(hints["type"])[0])[0]  # Required[Literal["x"]] -> "x"
        keys = {name for name, hint in hints.items() if get_origin(hint) is Required}
        required[tag] = frozenset(keys)
    return required


def check_client_event(raw: Any) -> BaseModel:
    """Validate a Live client event dict; the SDK model, or ClientEventError."""
    model = check_event(raw, client_event_adapter(), ClientEventError, {})
    missing = sorted(_required_by_params().get(raw["type"], frozenset()) - raw.keys())
    if missing:
        raise ClientEventError(
            f"Missing required parameter: '{missing[0]}'.",
            code="missing_required_parameter",
            param=missing[0],
            event_type=raw["type"],
            event_id=raw.get("event_id") if isinstance(raw.get("event_id"), str) else None,
        )
    return model


def check_server_event(raw: Any) -> BaseModel:
    """Validate a Live server event dict; the SDK model, or ServerEventError."""
    return check_event(raw, server_event_adapter(), ServerEventError, {})


def check_responses_event(raw: Any) -> BaseModel:
    """Validate a Responses streaming event (what `response.event` nests)."""
    return check_event(raw, responses_event_adapter(), ServerEventError, {})


def live_error(err: EventError, client_event_id: str | None = None) -> dict[str, Any]:
    """The `error` object of a Live `error` event (`openai.types.live.Error`)."""
    event_id = client_event_id if client_event_id is not None else err.event_id
    return {
        "type": "invalid_request_error",
        "code": err.code,
        "message": err.message,
        "param": err.param,
        "client_event_id": event_id,
    }
