"""A function-call round on one Realtime session, without I/O: the calls a response makes,
their outputs, the `response.create` that must follow, and what waits for the phone.

The Realtime API (GA) delivers a call as `response.function_call_arguments.done {call_id,
name, arguments}`; the client answers each with a `conversation.item.create` of a
`function_call_output` and then one `response.create`, sent only once the response that made
the calls is done (a second response while one is active is refused) and every output is in.
A tool that ends or moves the call (`end_call`, `transfer_to_human`) acts only after the model
has said its last sentence and the phone has played it: the action is held until the response
answering the tool is done and no audio is left on the phone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.tools import ToolCall

MAX_ROUNDS = 4  # tool calls answered in a row before the model must speak without one


@dataclass(frozen=True, slots=True)
class AfterPlayback:
    """What to do to the call once its last sentence has played."""

    kind: Literal["hangup", "transfer"]
    number: str | None = None  # for a transfer


@dataclass
class _Round:
    response_id: str
    pending: set[str] = field(default_factory=set)  # call ids still without output
    done: bool = False  # the response that made the calls is over


class ToolFlow:
    """Per session: which calls wait for outputs, and when the model may answer them."""

    def __init__(self) -> None:
        self._rounds: dict[str, _Round] = {}  # response id -> its calls
        self._call_round: dict[str, str] = {}  # call id -> response id
        self._after: AfterPlayback | None = None
        self._answer_pending = False  # our response.create is sent, its response not yet done
        self._answer_id: str | None = None
        self._armed = False  # the answer is done: the action waits only for the phone
        self._rounds_in_a_row = 0

    def on_arguments_done(self, event: dict[str, Any]) -> ToolCall | None:
        """The model called a function; None if the event is unusable (the caller logs)."""
        call_id, name = event.get("call_id"), event.get("name")
        rid, arguments = event.get("response_id"), event.get("arguments")
        if not all(isinstance(v, str) and v for v in (call_id, name, rid)):
            return None
        if call_id in self._call_round:
            return None  # delivered twice
        round_ = self._rounds.setdefault(rid, _Round(rid))
        round_.pending.add(call_id)
        self._call_round[call_id] = rid
        return ToolCall(call_id, name, arguments if isinstance(arguments, str) else "")

    def on_response_created(self, response_id: str) -> None:
        if self._answer_pending and self._answer_id is None:
            self._answer_id = response_id

    def on_response_done(self, response_id: str | None) -> list[dict[str, Any]]:
        """Events to send now: the `response.create` if this response's calls are answered."""
        if response_id is not None and response_id == self._answer_id:
            self._answer_pending, self._answer_id = False, None
            self._armed = self._after is not None
        round_ = self._rounds.get(response_id or "")
        if round_ is None:
            if not self._answer_pending:
                self._rounds_in_a_row = 0  # the model spoke without a tool
            return []
        round_.done = True
        return self._answer_if_ready(round_)

    def finished(
        self, call_id: str, output: str, after: AfterPlayback | None = None
    ) -> list[dict[str, Any]]:
        """A tool is done: its output, and the `response.create` if nothing else is owed."""
        rid = self._call_round.pop(call_id, None)
        round_ = self._rounds.get(rid or "")
        if round_ is None or call_id not in round_.pending:
            # Its session was replaced: the new one never saw the call, but a hang-up or
            # transfer the model asked for still happens once the phone is quiet.
            if after is not None and self._after is None:
                self._after, self._armed = after, True
            return []
        round_.pending.discard(call_id)
        if after is not None and self._after is None:
            self._after = after
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        return [{"type": "conversation.item.create", "item": item}, *self._answer_if_ready(round_)]

    def _answer_if_ready(self, round_: _Round) -> list[dict[str, Any]]:
        if round_.pending or not round_.done:
            return []
        del self._rounds[round_.response_id]
        self._rounds_in_a_row += 1
        self._answer_pending, self._answer_id = True, None
        response: dict[str, Any] = {}
        if self._rounds_in_a_row >= MAX_ROUNDS:
            response["tool_choice"] = "none"  # a model looping on tools must speak now
        return [{"type": "response.create", "response": response}]

    def due(self, playback_pending: bool) -> AfterPlayback | None:
        """The held action, once, when its sentence is done and the phone has played it."""
        if not self._armed or playback_pending or self._after is None:
            return None
        after, self._after, self._armed = self._after, None, False
        return after

    def session_replaced(self) -> None:
        """A new session took over: its model never saw these calls; a held action goes on."""
        self._rounds.clear()
        self._call_round.clear()
        self._answer_pending, self._answer_id = False, None
        self._armed = self._after is not None

    @property
    def waiting(self) -> bool:
        """Calls still owed an output or an answer still to come."""
        return bool(self._rounds) or self._answer_pending
