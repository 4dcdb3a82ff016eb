"""Strict validation of Realtime (GA) events against the openai SDK's own types.

The SDK's models are `extra="allow"` and its unions are only tagged through
`PropertyInfo`, which pydantic ignores: a beta-shaped event (`input_audio_format`,
`"g711_ulaw"`, top-level `voice`...) validates silently and the real server then
answers with an error or, worse, falls back to defaults. So, per the protocol
reference, we (1) discriminate the top-level union on `type`, (2) validate in strict
mode (the wire is JSON: `"100"` is not an integer) and (3) walk `model_extra` to
reject unknown keys at any depth.

Errors mirror the real server's wording so the simulator can send them verbatim:
`Unknown parameter: 'session.input_audio_format'.` (code `unknown_parameter`),
`Missing required parameter: 'session.type'.`, `Invalid value: 'x'. Supported values
are: ...`, `Invalid type for 'p': expected ..., but got ... instead.`
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any, Union, get_args

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

__all__ = [
    "ClientEventError",
    "EventError",
    "ServerEventError",
    "check_client_event",
    "check_event",
    "check_server_event",
    "client_event_adapter",
    "server_event_adapter",
    "tagged_adapter",
    "unknown_keys",
]

# Fields the real server puts in `session.created/updated.session` that the SDK's event
# type (RealtimeSessionCreateRequest) does not declare; they are declared on
# RealtimeSessionCreateResponse, so they are known, not extra.
_SERVER_SESSION_EXTRAS = frozenset({"session.id", "session.object", "session.expires_at"})
_SERVER_ALLOWED_EXTRAS = {
    "session.created": _SERVER_SESSION_EXTRAS,
    "session.updated": _SERVER_SESSION_EXTRAS,
}
# Literal fields that identify a union member: a mismatch there means "wrong member",
# not "wrong value", so those errors are noise when another member got further.
_TAG_FIELDS = frozenset({"type", "role"})


class EventError(ValueError):
    """An event that the real service would refuse; fields match its `error` object."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        param: str | None = None,
        event_type: str | None = None,
        event_id: str | None = None,
    ) -> None:
        # str() names the parameter; .message stays the server's exact wording.
        named = param and param not in message
        super().__init__(f"{message} (param: {param})" if named else message)
        self.message = message
        self.code = code
        self.param = param
        self.event_type = event_type
        self.event_id = event_id

    def as_error(self) -> dict[str, Any]:
        """The `error` object of a Realtime `error` event."""
        return {
            "type": "invalid_request_error",
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "event_id": self.event_id,
        }


class ClientEventError(EventError):
    """A client event the real Realtime server would reject."""


class ServerEventError(EventError):
    """A server event that does not match the SDK's types (a simulator bug)."""


def tagged_adapter(alias: Any) -> TypeAdapter:
    """Adapter over an SDK union alias (`Annotated[Union[...], PropertyInfo]`), tagged on
    `type`: pydantic ignores the SDK's own discriminator, so it is declared again here."""
    members = get_args(get_args(alias)[0])  # Annotated[Union[...], PropertyInfo] -> members
    return TypeAdapter(Annotated[Union[members], Field(discriminator="type")])  # noqa: UP007


@cache
def client_event_adapter() -> TypeAdapter:
    """Discriminated adapter over `RealtimeClientEvent`, built once.

    One repair: the SDK's *model* for `response.create` types `response.input` as
    conversation items only, while its *param* type (what `conn.send()` accepts) and the
    server also take `{"type": "item_reference", "id": ...}`; we accept both.
    """
    from openai.types.realtime import RealtimeClientEvent, ResponseCreateEvent

    members = [
        _response_create_with_references() if m is ResponseCreateEvent else m
        for m in get_args(get_args(RealtimeClientEvent)[0])
    ]
    return TypeAdapter(Annotated[Union[tuple(members)], Field(discriminator="type")])  # noqa: UP007


def _response_create_with_references() -> type[BaseModel]:
    from openai.types.realtime import (
        ConversationItem,
        RealtimeResponseCreateParams,
        ResponseCreateEvent,
        ResponseItemReference,
    )

    class ResponseCreateParamsWithReferences(RealtimeResponseCreateParams):
        input: list[Union[ConversationItem, ResponseItemReference]] | None = None  # noqa: UP007

    class ResponseCreateEventWithReferences(ResponseCreateEvent):
        response: ResponseCreateParamsWithReferences | None = None

    return ResponseCreateEventWithReferences


@cache
def server_event_adapter() -> TypeAdapter:
    """Discriminated adapter over `RealtimeServerEvent`, built once."""
    from openai.types.realtime import RealtimeServerEvent

    return tagged_adapter(RealtimeServerEvent)


def unknown_keys(node: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of keys the models did not declare, e.g. `session.tools[0].meta`."""
    if isinstance(node, BaseModel):
        for key in node.model_extra or {}:
            yield f"{path}.{key}".lstrip(".")
        for name in type(node).model_fields:
            yield from unknown_keys(getattr(node, name), f"{path}.{name}")
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from unknown_keys(item, f"{path}[{i}]")


def check_client_event(raw: Any) -> BaseModel:
    """Validate a client event dict; returns the SDK model or raises ClientEventError."""
    return check_event(raw, client_event_adapter(), ClientEventError, {})


def check_server_event(raw: Any) -> BaseModel:
    """Validate a server event dict; returns the SDK model or raises ServerEventError."""
    return check_event(raw, server_event_adapter(), ServerEventError, _SERVER_ALLOWED_EXTRAS)


def check_event(
    raw: Any,
    adapter: TypeAdapter,
    error_cls: type[EventError],
    allowed: dict[str, frozenset[str]],
) -> BaseModel:
    """Validate `raw` with `adapter` (strict, unknown keys refused except the dotted paths
    `allowed[type]`); the model, or `error_cls` worded like the server. Any SDK protocol."""
    if not isinstance(raw, dict):
        raise error_cls(
            f"Invalid type for event: expected an object, but got {_json_type(raw)} instead.",
            code="invalid_type",
        )
    event_type = raw.get("type")
    event_id = raw["event_id"] if isinstance(raw.get("event_id"), str) else None
    try:
        model = adapter.validate_python(raw, strict=True)
    except ValidationError as exc:
        message, code, param = _describe(exc, raw)
        raise error_cls(
            message, code=code, param=param, event_type=event_type, event_id=event_id
        ) from None
    skip = allowed.get(str(event_type), frozenset())
    extra = [key for key in unknown_keys(model) if key not in skip]
    if extra:
        raise error_cls(
            f"Unknown parameter: '{extra[0]}'.",
            code="unknown_parameter",
            param=extra[0],
            event_type=event_type,
            event_id=event_id,
        )
    return model


# ---- turning pydantic's errors into the server's wording -------------------------------


def _describe(exc: ValidationError, raw: dict) -> tuple[str, str, str | None]:
    """(message, code, param) for the most relevant error of a failed validation."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "union_tag_invalid":
        return _invalid_value(raw.get("type"), _expected_tags(first), "type")
    if first["type"] == "union_tag_not_found":
        return "Missing required parameter: 'type'.", "missing_required_parameter", "type"
    located = [_Located(err, raw) for err in errors]
    chosen = _pick(located)
    same_place = [e.err for e in located if e.path.text == chosen.path.text]
    return _message_for(chosen.path.text, chosen.err, same_place)


def _pick(located: list[_Located]) -> _Located:
    """The error of the union member the client evidently meant."""
    wrong = [e for e in located if e.wrong_member]
    bad_members = {e.member for e in wrong}
    clean = [e for e in located if not any(e.inside(m) for m in bad_members)]
    if clean:
        return max(clean, key=lambda e: len(e.path.parts))  # the member that got deepest
    # Every member failed on a tag. If some accepted `type` (e.g. "message"), the
    # problem is their other tag (e.g. `role`); otherwise `type` itself is wrong.
    failed_on_type = {e.member for e in wrong if e.path.parts[-1] == "type"}
    others = [e for e in wrong if e.member not in failed_on_type]
    return (others or wrong)[0]


class _Path:
    """A location in the client's JSON, e.g. `session.tools[0].name`."""

    def __init__(self, parts: list[str | int]) -> None:
        self.parts = parts

    @property
    def text(self) -> str:
        out = ""
        for part in self.parts:
            out += f"[{part}]" if isinstance(part, int) else f".{part}"
        return out.lstrip(".")


class _Located:
    """A pydantic error mapped onto the client's JSON, union-member labels removed.

    loc[0] is the discriminator tag; the rest mixes field names, list indexes and
    smart-union labels (class names, "literal[...]"): walking the client's own JSON
    tells them apart. `member` is the loc prefix of the innermost union member.
    """

    def __init__(self, err: dict, raw: dict) -> None:
        self.err = err
        loc = err["loc"]
        node: Any = raw
        parts: list[str | int] = []
        self.member: tuple = loc[:1]
        after_label = True
        tag_field = False
        for i, step in enumerate(loc[1:], start=1):
            is_last = i == len(loc) - 1
            if isinstance(step, int) and isinstance(node, list) and step < len(node):
                parts.append(step)
                node, after_label = node[step], False
            elif isinstance(node, dict) and (step in node or is_last):
                parts.append(step)
                tag_field = after_label and is_last and step in _TAG_FIELDS
                node, after_label = node.get(step), False
            else:
                self.member, after_label = loc[: i + 1], True
        self.path = _Path(parts)
        self.wrong_member = tag_field and err["type"] == "literal_error"

    def inside(self, member: tuple) -> bool:
        return self.err["loc"][: len(member)] == member


def _message_for(param: str, err: dict, same_place: list[dict]) -> tuple[str, str, str | None]:
    kind = err["type"]
    param = param or None
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", "missing_required_parameter", param
    if kind == "literal_error":
        expected = [e.get("ctx", {}).get("expected", "") for e in same_place]
        return _invalid_value(err["input"], _merge_expected(expected), param)
    if kind.endswith("_type") or kind == "model_attributes_type":
        wanted = _WANTED.get(kind, kind.removesuffix("_type"))
        got = _json_type(err["input"])
        message = f"Invalid type for '{param}': expected {wanted}, but got {got} instead."
        return message, "invalid_type", param
    return f"Invalid value for '{param}': {err['msg']}.", "invalid_value", param


def _merge_expected(expected: list[str]) -> str:
    # pydantic writes "'a', 'b' or 'c'"; several members may repeat the same values.
    seen: dict[str, None] = {}
    for text in expected:
        for token in re.split(r", | or ", text):
            if token:
                seen[token] = None
    return ", ".join(seen)


def _invalid_value(value: Any, expected: str, param: str | None) -> tuple[str, str, str | None]:
    shown = f"'{value}'" if isinstance(value, str) else repr(value)
    tail = f" Supported values are: {expected}." if expected else ""
    return f"Invalid value: {shown}.{tail}", "invalid_value", param


def _expected_tags(err: dict) -> str:
    return str(err.get("ctx", {}).get("expected_tags", ""))


_WANTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a decimal",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "an object"
