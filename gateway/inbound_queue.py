"""The durable inbound queue's worker: claim a row, run the pipeline, retry, resume after a crash.

Rows live in the store (`inbound_messages`), written by the webhook before Twilio gets its 200,
so nothing accepted is lost when the process dies. On start the worker puts rows left in
'processing' by the previous process back to 'pending' (nothing is in flight yet), so a message
accepted but not answered before a crash is answered exactly once.

The worker never polls: it sleeps until a webhook wakes it (an asyncio.Event) or until the
earliest retry falls due, or until a message ends (the next one of its person may now go).
Messages of one person run one at a time, in the order received, and a message waiting for
its retry holds back the later ones of its person; different people run concurrently, up to
`concurrency`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway import background
from gateway.store import InboundMessage, Store
from gateway.store.store import Arrival

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
# Longest sleep without news, a safety net should a wake-up ever be missed; not a poll.
MAX_IDLE_WAIT_S = 60.0
# An instance's claims are released when it starts again or taken over when its heartbeat
# stops (INSTANCE_TIMEOUT_S); a claim of a live instance is taken over only after this long,
# for a hung worker (never while a slow reply is still in flight).
STALE_AFTER_S = 3600.0

Handler = Callable[[InboundMessage], Awaitable[None]]


class RetryLater(Exception):
    """A transient failure (network, Realtime, Twilio 5xx/429): try the message again later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GiveUp(Exception):
    """A permanent failure (e.g. Twilio 63016, outside the 24-hour window): do not retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Defer(Exception):
    """A limit holds the message (not a failure): pending again after `delay_s`, no attempt
    counted; the person's later messages keep waiting behind it."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with a little jitter, so retries of many messages do not align."""

    base_s: float = 2.0
    factor: float = 2.0
    cap_s: float = 120.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        raw = min(self.cap_s, self.base_s * self.factor ** max(0, attempt - 1))
        return raw * (1 + random.uniform(0, self.jitter))


class _PersonLocks:
    """One FIFO lock per person, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, person_id: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(person_id, (asyncio.Lock(), 0))
        self._locks[person_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[person_id]
            if users <= 1:
                del self._locks[person_id]
            else:
                self._locks[person_id] = (lock, users - 1)


class Intake:
    """Webhook acceptance with group commit: webhooks arriving together share one batch.

    Each webhook must be stored before it is answered; one write per webhook costs three
    database round trips and commits, and a burst queues them all behind each other. Here
    the first webhook of an event-loop tick starts a flush, the others of that tick (and
    those arriving while it runs) join the batch, and each batch is one transaction.
    The intake has its own store connection (and thread): its transactions stay its own,
    and webhooks never wait behind the worker's queries.
    """

    def __init__(self, store: Store, on_accepted: Callable[[], None]) -> None:
        self.store = store
        self.on_accepted = on_accepted
        self._pending: list[tuple[Arrival, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, database_url: str, on_accepted: Callable[[], None]) -> Intake:
        return cls(await Store.open(database_url), on_accepted)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.store.close()

    async def accept(self, arrival: Arrival) -> bool:
        """Store the message durably; False if its MessageSid was already accepted."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((arrival, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:  # one batch at a time: the duplicate check relies on it
            batch, self._pending = self._pending, []
            await self._store_batch(batch)

    async def _store_batch(self, batch: list[tuple[Arrival, asyncio.Future[bool]]]) -> None:
        try:
            fresh = await self.store.accept_inbound_batch([a for a, _ in batch])
        except Exception as err:
            if len(batch) > 1:  # one odd message must not fail its neighbours: one by one
                for single in batch:
                    await self._store_batch([single])
                return
            log.exception("whatsapp %s: could not be stored", batch[0][0].message_sid)
            if not batch[0][1].done():
                batch[0][1].set_exception(err)
            return
        for (_, future), new in zip(batch, fresh, strict=True):
            if not future.done():  # a webhook whose client went away: stored anyway
                future.set_result(new)
        if any(fresh):
            self.on_accepted()


class InboundWorker:
    def __init__(
        self,
        store: Store,
        handler: Handler,
        *,
        concurrency: int = 16,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        self.handler = handler
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._people = _PersonLocks()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        released = await self.store.release_stale_processing()
        if released:
            log.warning("queue: %d message(s) cut off by a restart are pending again", released)
        self._loop_task = background.start("inbound-worker", self._run())

    async def stop(self) -> None:
        """Stop claiming, cancel work in flight; its rows stay 'processing' until the next start."""
        await background.stop(self._loop_task, *self._tasks)
        self._loop_task = None

    def wake(self) -> None:
        """A webhook stored a row: claim it now."""
        self._wake.set()

    # the claim loop
    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                message = await self._next_message()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._process(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_message(self) -> InboundMessage:
        while True:
            self._wake.clear()  # before claiming: a wake-up during the claim is not lost
            try:
                message = await self.store.claim_inbound(STALE_AFTER_S)
            except Exception as err:  # the store is unreachable: said once a second, not a crash
                log.warning("queue: claiming failed (%s: %s); retrying", type(err).__name__, err)
                message = None
                await asyncio.sleep(1.0)
            if message is not None:
                return message
            wait = await self._until_next_due()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _until_next_due(self) -> float:
        try:
            due = await self.store.next_inbound_due()
        except Exception:
            return 1.0
        if due is None:
            return MAX_IDLE_WAIT_S
        return min(MAX_IDLE_WAIT_S, max(0.0, (due - datetime.now(UTC)).total_seconds()) + 0.01)

    # one message
    async def _process(self, message: InboundMessage) -> None:
        try:
            # First await of the task, and tasks start in claim order: the FIFO lock keeps each
            # person's messages in the order they arrived.
            async with self._people.hold(message.person_id):
                await self._handle(message)
        except Exception:  # the store itself failed
            log.exception("whatsapp %s: could not record the outcome", message.message_sid)
            await self._release(message)
        finally:
            self._slots.release()
            self.wake()  # the person's next message, held back behind this one, may go

    async def _handle(self, message: InboundMessage) -> None:
        sid = message.message_sid
        try:
            await self.handler(message)
        except GiveUp as stop:
            log.warning("whatsapp %s: not answered: %s", sid, stop.reason)
            await self.store.finish_inbound(sid, error=stop.reason)
        except RetryLater as err:
            await self._retry(message, err.reason)
        except Defer as held:
            log.info("whatsapp %s: %s; waiting %.1f s", sid, held.reason, held.delay_s)
            await self.store.defer_inbound(sid, held.delay_s, held.reason)
            self.wake()  # the claim loop may be sleeping past the new due time
        except Exception as err:  # a bug must not kill the worker; the message is retried
            log.exception("whatsapp %s: unexpected error", sid)
            await self._retry(message, f"unexpected {type(err).__name__}")
        else:
            await self.store.finish_inbound(sid)

    async def _retry(self, message: InboundMessage, reason: str) -> None:
        sid = message.message_sid
        if message.attempts >= self.max_attempts:
            log.error("whatsapp %s: giving up after %d attempts: %s", sid, message.attempts, reason)
            await self.store.finish_inbound(sid, error=f"gave up: {reason}")
            return
        delay = self.backoff.delay(message.attempts)
        log.warning(
            "whatsapp %s: attempt %d failed (%s); retry in %.1f s",
            sid,
            message.attempts,
            reason,
            delay,
        )
        await self.store.finish_inbound(sid, error=reason, retry_in_s=delay)
        self.wake()  # the claim loop may be sleeping past the new due time

    async def _release(self, message: InboundMessage) -> None:
        """Best effort: back to pending, or the row stays 'processing' (and holds back the
        person's later messages) until the next start or STALE_AFTER_S. A reply already
        sent is not sent again: the handler resumes from what it recorded."""
        delay = self.backoff.delay(message.attempts)
        try:
            await self.store.finish_inbound(message.message_sid, error="store", retry_in_s=delay)
        except Exception as err:
            log.error("whatsapp %s: still 'processing' (%s)", message.message_sid, err)
