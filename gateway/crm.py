"""Leads to the CRM: a durable outbox worker that POSTs each lead save to CRM_WEBHOOK_URL.

`Store.save_lead` writes the lead and, in the same transaction, an outbox row holding the
JSON body (gateway/store/leads.py `crm_body`: lead id, created_at, updated_at, the person's
E.164 number, conversation id, channel and the lead's fields). This worker sends the rows:

- `POST CRM_WEBHOOK_URL` with the body's bytes and `Content-Type: application/json`,
  `X-Almada-Signature: sha256=<hex HMAC-SHA256(CRM_WEBHOOK_SECRET, body)>`,
  `X-Almada-Delivery: <outbox id>` (the receiver's idempotency key: a delivery whose answer
  was lost is sent again with the same id) and `X-Almada-Timestamp: <unix seconds>`.
- A 2xx is delivered. Anything else (another status, no connection, no answer in 10 s) is
  tried again after CRM_RETRY_S, twice as long each time, at most 5 minutes apart, for
  72 hours from the save; then, or at once on 410 Gone, the row is given up (kept, and
  counted on the dashboard). Redirects are not followed.
- A lead's saves go out in the order they were made: a row waits while an earlier one of
  its lead is unsent. Different leads do not wait for each other's retries.
- Nothing lives only in memory: a row changes only once its answer is known, so a stop
  mid-delivery (SIGTERM cancels the worker at once) leaves it to be sent again at the next
  start. Without CRM_WEBHOOK_URL there is no worker and nothing is queued.

Logs name outbox and lead ids only: never the URL, the secret, the body or a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from datetime import UTC, datetime

import aiohttp

from gateway.inbound_queue import Backoff
from gateway.observability import CRM_DELIVERIES, CRM_OUTBOX_PENDING
from gateway.store import Store
from gateway.store.leads import Delivery

log = logging.getLogger(__name__)

RETRY_CAP_S = 300.0
GIVE_UP_AFTER_S = 72 * 3600.0
TIMEOUT_S = 10.0
# Longest sleep without news, a safety net should a wake-up ever be missed; not a poll.
MAX_IDLE_WAIT_S = 60.0
AFTER_ERROR_S = 1.0  # a pass that failed (the store, not the CRM) is not retried in a spin


def signature(secret: str, body: bytes) -> str:
    """The X-Almada-Signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class CrmOutbox:
    """The worker: `run()` in the background, `wake()` after a save (as `rt.crm`)."""

    def __init__(
        self,
        store: Store,
        url: str,
        secret: str,
        *,
        retry_s: float,
        timeout_s: float = TIMEOUT_S,
        give_up_after_s: float = GIVE_UP_AFTER_S,
    ) -> None:
        self.store = store
        self._url = url
        self._secret = secret
        self.backoff = Backoff(base_s=retry_s, cap_s=RETRY_CAP_S, jitter=0.0)
        self.timeout_s = timeout_s
        self.give_up_after_s = give_up_after_s
        self._wake = asyncio.Event()

    def __repr__(self) -> str:  # the URL may carry a token; the secret never shows
        return "CrmOutbox()"

    def wake(self) -> None:
        """A lead was just saved: send it now rather than at the next due time."""
        self._wake.set()

    async def run(self) -> None:
        """Send what is due, then sleep until the next row falls due or `wake()`; runs until
        cancelled (app.py runs it as a background task)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                self._wake.clear()  # before the pass: a save during it wakes the next one
                try:
                    await self.deliver_due(http)
                    wait = await self._until_due()
                except Exception as err:
                    log.warning("crm: outbox pass failed (%s); will try again", type(err).__name__)
                    wait = AFTER_ERROR_S
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)

    async def deliver_due(self, http: aiohttp.ClientSession) -> int:
        """Try every row that is due (and those its delivery frees); returns how many the
        CRM took."""
        delivered = 0
        while due := await self.store.crm_due():
            left = [d.id for d in due]
            try:
                for delivery in due:
                    delivered += await self._deliver(http, delivery)
                    left.remove(delivery.id)
            except asyncio.CancelledError:  # stopping: the leases go back, for the next start
                await asyncio.shield(self.store.crm_release(left))
                raise
        CRM_OUTBOX_PENDING.set((await self.store.crm_outbox_counts()).pending)
        return delivered

    async def _until_due(self) -> float:
        """Seconds until the next row falls due, at most MAX_IDLE_WAIT_S."""
        due = await self.store.crm_next_due()
        if due is None:
            return MAX_IDLE_WAIT_S
        return min(MAX_IDLE_WAIT_S, (due - datetime.now(UTC)).total_seconds())

    async def _deliver(self, http: aiohttp.ClientSession, delivery: Delivery) -> bool:
        error, final = await self._post(http, delivery)
        if error is None:
            await self.store.crm_delivered(delivery.id)
            CRM_DELIVERIES.labels("delivered").inc()
            log.info("crm: lead %d delivered (delivery %d)", delivery.lead_id, delivery.id)
            return True
        tries = delivery.attempts + 1
        age_s = (datetime.now(UTC) - datetime.fromisoformat(delivery.created_at)).total_seconds()
        if final or age_s >= self.give_up_after_s:
            await self.store.crm_failed(delivery.id, error, retry_in_s=None)
            CRM_DELIVERIES.labels("failed").inc()
            log.error("crm: delivery %d of lead %d given up after %d tries (%s)",
                      delivery.id, delivery.lead_id, tries, error)  # fmt: skip
            return False
        delay = self.backoff.delay(tries)
        await self.store.crm_failed(delivery.id, error, retry_in_s=delay)
        CRM_DELIVERIES.labels("retry").inc()
        log.warning("crm: delivery %d of lead %d not taken (%s); retry in %.1f s",
                    delivery.id, delivery.lead_id, error, delay)  # fmt: skip
        return False

    async def _post(
        self, http: aiohttp.ClientSession, delivery: Delivery
    ) -> tuple[str | None, bool]:
        """(None, _) when the CRM took the body, else (why not, whether that is final)."""
        headers = {
            "Content-Type": "application/json",
            "X-Almada-Signature": signature(self._secret, delivery.body),
            "X-Almada-Delivery": str(delivery.id),
            "X-Almada-Timestamp": str(int(time.time())),
        }
        try:
            async with http.post(
                self._url, data=delivery.body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return type(err).__name__, False
        if 200 <= status < 300:
            return None, True
        return f"HTTP {status}", status == 410
