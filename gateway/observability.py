"""Logs and metrics.

Logs: JSON lines when stderr is not a terminal (for collectors), readable text when it
is. Every line carries the correlation id of the call or message it belongs to, taken
from a context variable that asyncio copies into every task a handler starts, so code
deep in a call never has to pass ids around.

Metrics: one prometheus-client registry per process, served at GET /metrics.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from gateway import background

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")


@contextmanager
def correlated(cid: str) -> Iterator[None]:
    token = correlation_id.set(cid)
    try:
        yield
    finally:
        correlation_id.reset(token)


class _CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.cid = correlation_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = getattr(record, "cid", "")
        if cid:
            line["cid"] = cid
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(cidtag)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        cid = getattr(record, "cid", "")
        record.cidtag = f" [{cid}]" if cid else ""
        return super().format(record)


def setup_logging(level: str = "INFO", json_lines: bool | None = None) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(_CorrelationFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The SDKs log request URLs and headers at DEBUG; keep them quiet so no secret leaks.
    # aiosqlite logs every statement with its parameters (numbers, texts, transcripts, audio).
    noisy_loggers = ("twilio", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "websockets",
                     "aiohttp.access", "aiosqlite")  # fmt: skip
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# Metrics. Buckets span the range that matters for a phone conversation.
REGISTRY = CollectorRegistry()
_LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
_FRAME_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01)

ACTIVE_CALLS = Gauge("gateway_active_calls", "Calls with a live media stream", registry=REGISTRY)
CALLS = Counter("gateway_calls_total", "Calls answered by the voice webhook", registry=REGISTRY)
TURNS = Counter("gateway_turns_total", "Conversation turns recorded", ["channel", "role"],
                registry=REGISTRY)  # fmt: skip
RESPONSE_LATENCY = Histogram(
    "gateway_response_latency_seconds",
    "End of caller speech to first reply frame sent to Twilio",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_FIRST_AUDIO = Histogram(
    "gateway_upstream_first_audio_seconds",
    "Realtime speech_stopped to first audio delta received",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GREETING = Histogram(
    "gateway_greeting_seconds",
    "Media stream start to first greeting frame sent",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
FRAME_FORWARD = Histogram(
    "gateway_frame_forward_seconds",
    "Time spent in the gateway per relayed frame (sampled 1 in 16)",
    ["direction"],
    buckets=_FRAME_BUCKETS,
    registry=REGISTRY,
)
OVER_BUDGET = Counter(
    "gateway_over_budget_total",
    "Turns refused because the person's spend today reached DAILY_BUDGET_USD",
    ["channel"],
    registry=REGISTRY,
)
PEOPLE_OVER_BUDGET = Gauge(
    "gateway_people_over_budget", "People over their daily budget today (an operator alert)",
    registry=REGISTRY,
)  # fmt: skip
WHATSAPP_LIMITED = Counter(
    "gateway_whatsapp_limited_total",
    "WhatsApp messages held by the per-person turn limit (deferred) or answered in a turn "
    "together with an earlier one (merged)",
    ["action"],
    registry=REGISTRY,
)
WHATSAPP_WEBHOOK = Histogram(
    "gateway_whatsapp_webhook_seconds",
    "WhatsApp webhook: request received to 200 answered",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
WHATSAPP_REPLY = Histogram(
    "gateway_whatsapp_reply_seconds",
    "WhatsApp message accepted to reply handed to Twilio",
    buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60),
    registry=REGISTRY,
)
TOOL_CALLS = Counter(
    "gateway_tool_calls_total", "Tools the model called, by outcome", ["tool", "outcome"],
    registry=REGISTRY,
)  # fmt: skip
LEADS_SAVED = Counter(
    "gateway_leads_saved_total", "Leads saved by the clone (a save that updates one counts too)",
    ["channel"], registry=REGISTRY,
)  # fmt: skip
CRM_DELIVERIES = Counter(
    "gateway_crm_deliveries_total",
    "Tries to hand a lead to the CRM webhook: delivered, retry (will be tried again), "
    "failed (given up)",
    ["outcome"],
    registry=REGISTRY,
)
CRM_OUTBOX_PENDING = Gauge(
    "gateway_crm_outbox_pending", "Lead saves not yet taken by the CRM and still being tried",
    registry=REGISTRY,
)  # fmt: skip
ERRORS = Counter("gateway_errors_total", "Errors by kind", ["kind"], registry=REGISTRY)
RECONNECTS = Counter("gateway_upstream_reconnects_total", "Realtime sessions re-opened mid-call",
                     registry=REGISTRY)  # fmt: skip
REJECTED_SIGNATURES = Counter(
    "gateway_rejected_signatures_total",
    "Requests refused for a bad Twilio signature",
    ["route"],
    registry=REGISTRY,
)

GC_PAUSE = Histogram(
    "gateway_gc_pause_seconds",
    "Garbage-collector pauses by generation (every live stream stalls meanwhile)",
    ["generation"],
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
    registry=REGISTRY,
)
GC_FROZEN = Gauge(
    "gateway_gc_frozen_objects",
    "Objects alive at start moved out of the collector's reach (gc.freeze)",
    registry=REGISTRY,
)

LOOP_LAG = Histogram(
    "gateway_event_loop_lag_seconds",
    "How late a 50 ms timer fires: how long any frame may wait for the busy event loop",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)

FRAME_SAMPLE_EVERY = 16  # a histogram observe per frame would cost more than the relay itself


class FrameTimer:
    """Samples per-frame gateway time cheaply: one clock read pair every N frames."""

    __slots__ = ("_count", "_histogram")

    def __init__(self, direction: str) -> None:
        self._histogram = FRAME_FORWARD.labels(direction)
        self._count = 0

    def due(self) -> bool:
        self._count += 1
        return self._count % FRAME_SAMPLE_EVERY == 1  # the first, then every Nth

    def observe_since(self, started: float) -> None:
        self._histogram.observe(time.perf_counter() - started)


class _GcPauseTimer:
    """A gc callback: times each collection into GC_PAUSE."""

    def __init__(self) -> None:
        self._started = 0.0
        self._by_generation = [GC_PAUSE.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)


_GC_TIMER = _GcPauseTimer()
_gc_users = 0  # apps serving in this process (tests run several): the collector is shared


@contextmanager
def collector_tuned() -> Iterator[None]:
    """Freeze what start-up allocated and time every collection, while serving.

    Modules, SDK clients and the persona live as long as the process, yet each full
    collection walked all of them: ~160 000 objects, a 28 ms stall of every live call.
    Frozen, a full collection walks only what calls and messages allocated since.
    The first app to start freezes and the last to stop unfreezes.
    """
    global _gc_users
    _gc_users += 1
    if _gc_users == 1:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(_GC_TIMER)
    GC_FROZEN.set(gc.get_freeze_count())
    try:
        yield
    finally:
        _gc_users -= 1
        if _gc_users == 0:
            gc.callbacks.remove(_GC_TIMER)
            gc.unfreeze()
            GC_FROZEN.set(0)


LOOP_LAG_PERIOD_S = 0.050  # 20 samples a second: enough for a p99, cheap at one call
LOOP_IDLE_CHECK_S = 1.0


@asynccontextmanager
async def loop_lag_watched(busy: Callable[[], bool]) -> AsyncIterator[None]:
    """Time a 50 ms timer into LOOP_LAG while `busy()` (calls are live).

    Only then does a few ms of lag matter, and an idle gateway should stay asleep: on a VM
    every timer wake-up of an idle CPU costs (100 a second added 0.8 % of a core).
    perf_counter, not loop.time(): uvloop's clock has a 1 ms step.
    """

    async def watch() -> None:
        while True:
            if not busy():
                await asyncio.sleep(LOOP_IDLE_CHECK_S)
                continue
            before = time.perf_counter()
            await asyncio.sleep(LOOP_LAG_PERIOD_S)
            LOOP_LAG.observe(max(0.0, time.perf_counter() - before - LOOP_LAG_PERIOD_S))

    async with background.running("loop-lag", watch()):
        yield


async def metrics(request: web.Request) -> web.Response:
    from gateway.runtime import RUNTIME

    labelled = InstanceLabelled(request.app[RUNTIME].settings.instance_id)
    return web.Response(
        body=generate_latest(labelled),  # type: ignore[arg-type]
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


class InstanceLabelled:
    """The registry's metrics with `instance_id` on every sample: with several instances
    behind one scrape target (a load balancer), the series stay apart."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    def collect(self) -> Iterator[Metric]:
        for metric in REGISTRY.collect():
            metric.samples = [
                sample._replace(labels={**sample.labels, "instance_id": self.instance_id})
                for sample in metric.samples
            ]
            yield metric
