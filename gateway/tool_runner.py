"""Carrying out the clone's tools: the store, the CRM outbox, Twilio's REST API.

`run` never raises for a tool's own failure: the model gets the persona's words for what
happened (`tools.toml [results]`) and speaks them naturally; the failure is logged with the
call's or message's id, and the conversation goes on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from gateway import media
from gateway.observability import ERRORS, TOOL_CALLS
from gateway.phones import mask_number
from gateway.runtime import Runtime
from gateway.store import Erased, Person
from gateway.tool_flow import AfterPlayback
from gateway.tools import (
    END_CALL,
    SAVE_LEAD,
    SEND_WHATSAPP,
    TRANSFER_TO_HUMAN,
    BadArguments,
    Surface,
    ToolCall,
    definitions,
    lead_of,
    offered,
    parse,
)

log = logging.getLogger(__name__)


RECENT_TURNS = 6  # lines of the conversation in a hand-off summary
CHANNEL_NAMES = {"call": "ligação", "whatsapp": "WhatsApp"}


@dataclass
class ToolContext:
    """Where a call to a tool comes from."""

    surface: Surface
    person: Person | None
    conversation_id: int | None
    log_id: str  # "call CA…" / "whatsapp SM…", for the logs
    our_number: str | None  # the number the person reached (E.164), our sender on WhatsApp
    recent: list[tuple[str, str]] = field(default_factory=list)  # (role, text), oldest first


@dataclass(frozen=True)
class ToolOutcome:
    output: str  # what the model reads
    after: AfterPlayback | None = None
    ok: bool = True  # False: the tool could not do its job (the model was told so)


class ToolRunner:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._results = rt.persona.tools["results"]
        self._background: set[asyncio.Task[None]] = set()

    def offered(self, surface: Surface, person: Person | None) -> tuple[str, ...]:
        names = offered(self.rt.settings, surface)
        if person is None:  # no number: nothing to send a message to
            names = tuple(n for n in names if n != SEND_WHATSAPP)
        return names

    def definitions(self, surface: Surface, person: Person | None) -> list[dict[str, Any]]:
        return definitions(self.rt.persona, self.offered(surface, person))

    async def run(self, call: ToolCall, ctx: ToolContext) -> ToolOutcome:
        try:
            arguments = parse(call, self.offered(ctx.surface, ctx.person))
        except BadArguments as err:
            log.warning("%s: tool %s: bad arguments (%s)", ctx.log_id, call.name[:40], err)
            TOOL_CALLS.labels(_known(call.name), "bad_arguments").inc()
            return ToolOutcome(self._results["bad_arguments"].format(problem=str(err)))
        try:
            outcome = await self._run(call.name, arguments, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.error("%s: tool %s failed: %s: %s", ctx.log_id, call.name, type(err).__name__, err)
            ERRORS.labels("tool_failed").inc()
            TOOL_CALLS.labels(call.name, "failed").inc()
            return ToolOutcome(self._results[_FAILED[call.name]])
        TOOL_CALLS.labels(call.name, "ok" if outcome.ok else "failed").inc()
        log.info("%s: tool %s done%s", ctx.log_id, call.name, "" if outcome.ok else " (failed)")
        return outcome

    async def _run(self, name: str, arguments: dict[str, str], ctx: ToolContext) -> ToolOutcome:
        if name == SAVE_LEAD:
            return await self._save_lead(arguments, ctx)
        if name == TRANSFER_TO_HUMAN:
            return await self._transfer(arguments, ctx)
        if name == END_CALL:
            return ToolOutcome(self._results["end_call"], AfterPlayback("hangup"))
        if name == SEND_WHATSAPP:
            return await self._send_whatsapp(arguments["text"], ctx)
        raise AssertionError(f"offered but not carried out: {name}")

    async def _save_lead(self, arguments: dict[str, str], ctx: ToolContext) -> ToolOutcome:
        if ctx.person is None:
            raise LookupError("no caller id: a lead needs a person")
        await self.rt.store.save_lead(
            ctx.person.id, ctx.conversation_id, lead_of(arguments), channel=ctx.surface
        )
        crm = getattr(self.rt, "crm", None)
        if crm is not None:
            crm.wake()
        return ToolOutcome(self._results["lead_saved"])

    async def _transfer(self, arguments: dict[str, str], ctx: ToolContext) -> ToolOutcome:
        settings = self.rt.settings
        if ctx.surface == "call":
            number = settings.human_transfer_number
            return ToolOutcome(self._results["transfer_call"], AfterPlayback("transfer", number))
        summary = self._handoff_summary(arguments["reason"], ctx)
        await self.rt.twilio.messages.create_async(
            to=f"whatsapp:{settings.human_whatsapp_number}",
            from_=f"whatsapp:{ctx.our_number}",
            body=summary,
        )
        log.info("%s: hand-off summary sent to the team", ctx.log_id)
        return ToolOutcome(self._results["transfer_whatsapp"])

    def _handoff_summary(self, reason: str, ctx: ToolContext) -> str:
        persona = self.rt.persona
        labels = {
            "user": persona.prompt["user_label"],
            "assistant": persona.prompt["assistant_label"],
        }
        recent = "\n".join(
            f"{labels.get(role, role)}: {text}" for role, text in ctx.recent[-RECENT_TURNS:]
        )
        person = ctx.person
        return self._results["handoff_summary"].format(
            channel=CHANNEL_NAMES[ctx.surface],
            name=(person.name if person and person.name else "?"),
            phone=person.e164 if person else "?",
            reason=reason,
            recent=recent or "-",
        )

    async def _send_whatsapp(self, text: str, ctx: ToolContext) -> ToolOutcome:
        """The text now (its outcome is the tool's), the voice note of it right after."""
        person = ctx.person
        assert person is not None  # not offered without a number
        try:
            created = await self.rt.twilio.messages.create_async(
                to=f"whatsapp:{person.e164}", from_=f"whatsapp:{ctx.our_number}", body=text
            )
        except Exception as err:
            log.warning("%s: WhatsApp to %s refused: %s", ctx.log_id, mask_number(person.e164), err)
            return ToolOutcome(self._results["whatsapp_failed"], ok=False)
        log.info("%s: WhatsApp text sent as %s", ctx.log_id, created.sid)
        conversation_id = await self._remember(person, text)
        self._spawn(self._voice_note(person, text, ctx, conversation_id))
        return ToolOutcome(self._results["whatsapp_sent"])

    async def _remember(self, person: Person, text: str) -> int | None:
        """The message is a WhatsApp turn of the person's memory, like any reply."""
        store = self.rt.store
        try:
            conversation_id = await store.start_conversation(person.id, "whatsapp")
            await store.add_turn(conversation_id, "assistant", text)
            await store.end_conversation(conversation_id)
        except Erased:
            return None
        return conversation_id

    async def _voice_note(
        self, person: Person, text: str, ctx: ToolContext, conversation_id: int | None
    ) -> None:
        from gateway.whatsapp_turns import read_aloud  # the voice-note machinery lives there

        try:
            notes = await read_aloud(self.rt, person, text, self._results["read_aloud"])
            for note in notes:
                media_id = await media.publish_voice_note(
                    self.rt.store, note, person_id=person.id, ttl_s=self.rt.settings.media_ttl_s
                )
                await self.rt.twilio.messages.create_async(
                    to=f"whatsapp:{person.e164}",
                    from_=f"whatsapp:{ctx.our_number}",
                    media_url=[media.voice_note_url(self.rt.settings.public_base_url, media_id)],
                )
            log.info("%s: WhatsApp voice note sent (%d part(s))", ctx.log_id, len(notes))
        except Exception as err:
            log.warning(
                "%s: WhatsApp voice note not sent: %s: %s", ctx.log_id, type(err).__name__, err
            )
            ERRORS.labels("tool_failed").inc()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Shutdown: voice notes under way get a moment to finish, then are cancelled."""
        if not self._background:
            return
        _, pending = await asyncio.wait(self._background, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


_FAILED = {
    SAVE_LEAD: "lead_failed",
    TRANSFER_TO_HUMAN: "transfer_failed",
    END_CALL: "unavailable",
    SEND_WHATSAPP: "whatsapp_failed",
}


def _known(name: str) -> str:
    """A metric label: a model may call any name; only ours are labels of their own."""
    return name if name in _FAILED else "unknown"
