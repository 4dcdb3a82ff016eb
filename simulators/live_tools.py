"""Function tools on the GPT-Live simulator, through Responses delegation.

Live's voice model has no tools: a session offers them to its Responses backend
(`delegation: {type: "responses", responses: {model, tools}}`). When the caller's words
match a `LiveToolCall` knob, the model delegates: `session.delegation.created` (metadata
only), then the backend's stream nested in `response.event` (response.created, the
function_call item added, its arguments, the item done, response.completed). The client
runs the function and answers with `response.item.create` of a `function_call_output` and
then `response.create` ("continue a delegated response waiting for tool results"); the
backend's answer streams the same way and the voice model speaks it (an assumption: the
SDK does not say). What the client did is kept for tests: `tool_outputs`,
`tool_violations` (an output for an unknown call, a `response.create` with outputs
missing), `tool_calls_refused` (a knob whose function the session did not offer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from simulators.live_config import LiveToolCall
from simulators.realtime_state import new_id

if TYPE_CHECKING:
    from simulators.live import LiveItem


@dataclass
class ToolOutputRecord:
    call_id: str
    name: str
    output: str
    at: float  # time.monotonic() when the output arrived


@dataclass
class DelegatedCall:
    knob: LiveToolCall
    delegation_id: str
    trigger: LiveItem
    output: str | None = None


@dataclass
class DelegatedTools:
    """Per session: the calls made, their outputs, and the knobs spent."""

    calls: dict[str, DelegatedCall] = field(default_factory=dict)  # by call_id, until answered
    outputs: list[ToolOutputRecord] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    spent: set[int] = field(default_factory=set)  # ids of `once` knobs already used

    def knob_for(
        self, knobs: list[LiveToolCall], said: str, offered: set[str]
    ) -> LiveToolCall | None:
        for knob in knobs:
            if knob.once and id(knob) in self.spent:
                continue
            if knob.trigger is not None and knob.trigger.lower() not in said.lower():
                continue
            if knob.once:
                self.spent.add(id(knob))
            if knob.name not in offered:
                self.refused.append(knob.name)
                continue
            return knob
        return None

    def output(self, item: dict[str, Any]) -> str | None:
        """A `function_call_output` sent by the client; a problem's wording, or None."""
        call = self.calls.get(str(item.get("call_id")))
        if call is None:
            problem = (
                f"No tool call found for function call output with call_id {item.get('call_id')}."
            )
            self.violations.append(problem)
            return problem
        call.output = str(item.get("output") or "")
        self.outputs.append(ToolOutputRecord(str(item["call_id"]), call.knob.name, call.output,
                                             time.monotonic()))  # fmt: skip
        return None

    def answered(self) -> list[DelegatedCall]:
        """The calls whose outputs are all in, taken (the backend continues with them)."""
        waiting = [c for c in self.calls.values() if c.output is None]
        if waiting:
            return []
        done, self.calls = list(self.calls.values()), {}
        return done


def offered_tools(delegation: dict[str, Any] | None) -> set[str]:
    if not delegation or delegation.get("type") != "responses":
        return set()
    tools = (delegation.get("responses") or {}).get("tools") or []
    return {t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"}


def snapshot(resp_id: str, model: str, status: str, usage: dict | None = None) -> dict:
    """A Responses lifecycle snapshot as Live nests it: input, instructions, tools and output
    cleared (the SDK's words)."""
    return {"id": resp_id, "object": "response", "created_at": int(time.time()),
            "model": model, "status": status, "output": [], "instructions": None, "tools": [],
            "tool_choice": "auto", "parallel_tool_calls": True, "usage": usage}  # fmt: skip


def function_call_stream(
    resp_id: str, model: str, call_id: str, name: str, arguments: str
) -> list[dict]:
    """The backend's stream for one function call, with sequence numbers."""
    item_id = new_id("fc")
    item = {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}  # fmt: skip
    usage = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": max(1, len(arguments) // 4),
             "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": max(1, len(arguments) // 4)}  # fmt: skip
    at = {"item_id": item_id, "output_index": 0}
    events = [
        {"type": "response.created", "response": snapshot(resp_id, model, "in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "arguments": "", "status": "in_progress"}},
        {"type": "response.function_call_arguments.delta", **at, "delta": arguments},
        {"type": "response.function_call_arguments.done", **at, "arguments": arguments,
         "name": name},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": snapshot(resp_id, model, "completed", usage)},
    ]  # fmt: skip
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]
