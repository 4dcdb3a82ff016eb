"""The rolling summary: when a conversation ends, a text model folds it into what the
clone knows about the person.

Runs in the background. A failed call loses nothing: the conversation's turns stay in the
store (and still reach the next session as latest turns), and the conversation is tried
again later with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from openai import AsyncOpenAI

from gateway.persona import Persona
from gateway.store import Store
from gateway.store.lifecycle import ConversationRef

log = logging.getLogger(__name__)

RETRY_MAX_S = 3600.0


class Summarizer:
    def __init__(
        self,
        store: Store,
        client: AsyncOpenAI,
        persona: Persona,
        model: str,
        *,
        whatsapp_idle_s: float,
        interval_s: float,
        retry_base_s: float = 30.0,
    ) -> None:
        self.store = store
        # Our own retry schedule replaces the SDK's, so a failure is recorded, not hidden.
        self.client = client.with_options(max_retries=0, timeout=60.0)
        self.persona = persona
        self.model = model
        self.whatsapp_idle_s = whatsapp_idle_s
        self.interval_s = interval_s
        self.retry_base_s = retry_base_s
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """A conversation just ended: summarize now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Sweep every interval, or at once when poked; runs until cancelled (app.py runs it
        as a background task)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.sweep()
            except Exception:
                log.exception("summary sweep failed; will try again")

    async def sweep(self) -> int:
        """Summarize every conversation that is due; returns how many succeeded."""
        idle_before = datetime.now(UTC) - timedelta(seconds=self.whatsapp_idle_s)
        await self.store.end_idle_conversations("whatsapp", idle_before)
        done = 0
        claimed = await self.store.conversations_to_summarize()
        left = [c.id for c in claimed]
        try:
            for conversation in claimed:
                done += await self.summarize(conversation)
                left.remove(conversation.id)
        except asyncio.CancelledError:  # stopping: the leases go back, for the next start
            await asyncio.shield(self.store.release_summaries(left))
            raise
        return done

    async def summarize(self, conversation: ConversationRef) -> bool:
        person = await self.store.person_by_id(conversation.person_id)
        turns = await self.store.conversation_turns(conversation.id)
        said = [t for t in turns if t.role in ("user", "assistant")]
        if person is None or not said:
            await self.store.mark_summarized(conversation.id)
            return False
        try:
            response = await self.client.responses.create(
                model=self.model,
                instructions=self.persona.summarizer,
                input=_summary_input(self.persona, person.summary, conversation, said),
            )
            summary = response.output_text.strip()
        except Exception as err:
            delay = min(RETRY_MAX_S, self.retry_base_s * 2**conversation.summary_attempts)
            log.warning("summary of conversation %d failed (%s); retry in %.0f s",
                        conversation.id, type(err).__name__, delay)  # fmt: skip
            await self.store.summary_failed(conversation.id, retry_in_s=delay)
            return False
        if summary:
            await self.store.set_summary(person.id, summary)
        await self.store.mark_summarized(conversation.id)
        return True


def _summary_input(persona: Persona, previous: str | None, conversation: ConversationRef,
                   turns: list) -> str:  # fmt: skip
    labels = {"user": persona.prompt["user_label"], "assistant": persona.prompt["assistant_label"]}
    labels_by_channel = persona.channel_labels
    channel = labels_by_channel.get(conversation.channel) or labels_by_channel.get(
        f"{conversation.channel}_text", conversation.channel
    )
    lines = [f"{labels[t.role]}: {t.text}" for t in turns]
    heading = persona.prompt["summary_heading"]
    return f"{heading}\n{previous or '-'}\n\n[{channel}]\n" + "\n".join(lines)
