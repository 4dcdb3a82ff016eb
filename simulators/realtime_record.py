"""What a session sent and received, as tests and the load test read it, and waits on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from simulators.realtime_state import Timed

if TYPE_CHECKING:
    from simulators.realtime_state import (
        RefusedToolCall,
        SimResponse,
        ToolCallRecord,
        ToolLedger,
        ToolOutput,
        ToolViolation,
    )


class SessionRecord:
    """The record of one session (`sent`, `responses`) read back, and waited on by tests.

    `_notify()` is called by the session at every change; waits re-check then.
    """

    sent: list[Timed]
    responses: list[SimResponse]
    ledger: ToolLedger
    id: str
    closed: bool
    close_code: int | None
    _changed: asyncio.Event | None

    def events(self, event_type: str | None = None) -> list[dict]:
        """Sent server events (optionally of one type), in order."""
        return [t.event for t in self.sent if event_type is None or t.event["type"] == event_type]

    def sent_types(self) -> list[str]:
        return [t.event["type"] for t in self.sent]

    # -- function calls (the `tool_calls` knob) and what followed them --

    @property
    def tool_calls(self) -> list[ToolCallRecord]:
        """Every function call the model made, in order, with the output it got."""
        return self.ledger.calls

    @property
    def tool_outputs(self) -> list[ToolOutput]:
        """Every accepted function_call_output: (call_id, name, output, at)."""
        return self.ledger.outputs

    @property
    def tool_violations(self) -> list[ToolViolation]:
        """What the client got wrong around function calls (kinds: `ToolLedger`)."""
        return self.ledger.violations

    @property
    def tool_calls_refused(self) -> list[RefusedToolCall]:
        """Knobs' calls the session did not offer, so the model did not make them."""
        return self.ledger.refused

    # -- measurement --

    def timings(self) -> dict[str, Any]:
        """When each response was created (for VAD: the stop frame's arrival) and sent its
        first audio, and the first metadata a client gave a response (who the session is)."""
        tags = next((r.metadata for r in self.responses if r.metadata), None)
        responses = [{"created_at": r.created_at, "first_audio_at": r.first_audio_at}
                     for r in self.responses]  # fmt: skip
        return {"session_id": self.id, "metadata": tags or {}, "responses": responses}

    # -- waiting helpers for tests --

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:  # noqa: ASYNC109 (a test helper: the timeout is the point)
        """Wait until `predicate()` is truthy (re-checked on every session change)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    changed = self._changed
                    result = predicate()
                    if result:
                        return result
                    if self.closed:
                        raise ConnectionError(f"session closed (code {self.close_code})")
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {timeout}s; last events sent: {self.sent_types()[-12:]}"
            ) from None

    async def wait_event(
        self,
        event_type: str,
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        match: Callable[[dict], bool] | None = None,
        start: int = 0,
    ) -> dict:
        """The first sent event of `event_type` (at index >= start) matching `match`."""

        def find() -> dict | None:
            for timed in self.sent[start:]:
                ev = timed.event
                if ev["type"] == event_type and (match is None or match(ev)):
                    return ev
            return None

        return await self.wait_for(find, timeout)
