"""A burst of signed WhatsApp webhooks, and how long each sender waited for a reply."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

import aiohttp

from simulators.speech import speech_pcm24k
from simulators.whatsapp_sender import WebhookResult, WhatsAppSender, new_sid

from .config import LoadConfig
from .procstats import MachineReport, ProcessReport
from .summary import Summary


@dataclass
class SentReply:
    to: str
    at: float  # time.monotonic() when the simulator accepted (or we first saw) it
    has_media: bool


class TwilioView(Protocol):
    """Where the Twilio simulator is: hosts inbound media, shows what the gateway sent."""

    resolution_ms: float

    async def host_media(self, data: bytes, content_type: str, message_sid: str) -> str: ...

    async def replies(self) -> list[SentReply]: ...


class LocalTwilio:
    """The simulator object in this process: exact acceptance times."""

    resolution_ms = 0.0

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    async def host_media(self, data: bytes, content_type: str, message_sid: str) -> str:
        return self.sim.add_media(data, content_type, message_sid)

    async def replies(self) -> list[SentReply]:
        return [SentReply(m.to, m.accepted_at, bool(m.media_urls)) for m in self.sim.messages]


class RemoteTwilio:
    """A simulator in another process, through its loopback-only /_sim routes (polled)."""

    resolution_ms = 100.0  # the poll period: /_sim/messages has only whole-second dates

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._seen: dict[str, SentReply] = {}

    async def host_media(self, data: bytes, content_type: str, message_sid: str) -> str:
        url = f"{self.base_url}/_sim/media?message_sid={message_sid}"
        headers = {"Content-Type": content_type}
        async with self.session.post(url, data=data, headers=headers) as response:
            response.raise_for_status()
            return (await response.json())["media_url"]

    async def replies(self) -> list[SentReply]:
        async with self.session.get(f"{self.base_url}/_sim/messages") as response:
            rows = await response.json()
        now = time.monotonic()
        for row in rows:
            if row["sid"] not in self._seen:
                has_media = row.get("num_media", "0") != "0"
                self._seen[row["sid"]] = SentReply(row["to"], now, has_media)
        return list(self._seen.values())


@dataclass
class WhatsAppReport:
    messages: int
    kind: str
    statuses: dict[str, int]
    webhook_ms: Summary
    channel: bool  # POST /webhook/whatsapp answered 2xx, not 404
    reply_ms: Summary | None = None  # webhook POST -> first reply message accepted
    voice_reply_ms: Summary | None = None  # webhook POST -> first reply with media
    replied: int = 0
    voice_replied: int = 0
    reply_resolution_ms: float | None = None
    errors: list[str] = field(default_factory=list)
    gateway_process: ProcessReport | None = None
    simulator_process: ProcessReport | None = None
    machine: MachineReport | None = None


def wa_number(index: int) -> str:
    return f"+55119{index % 10**8:08d}"


@cache
def voice_note() -> bytes:
    from gateway.transcode import encode_ogg_opus

    return encode_ogg_opus(speech_pcm24k(2000, seed=11))


async def run_whatsapp_burst(cfg: LoadConfig, twilio: TwilioView | None) -> WhatsAppReport:
    """`cfg.whatsapp` signed webhooks at once; then wait for each sender's replies."""
    kind = cfg.whatsapp_kind if twilio is not None else "text"
    senders = [
        WhatsAppSender(
            cfg.gateway_url,
            cfg.public_base_url,
            cfg.auth_token,
            cfg.account_sid,
            from_number=wa_number(i),
        )
        for i in range(cfg.whatsapp)
    ]
    try:
        posts = await _post_burst(senders, kind, twilio)
    finally:
        await asyncio.gather(*(s.close() for s in senders))
    report = _webhook_report(kind, posts)
    if report.channel and twilio is not None:
        await _wait_replies(cfg, twilio, senders, posts, report)
    return report


async def _post_burst(
    senders: list[WhatsAppSender], kind: str, twilio: TwilioView | None
) -> list[tuple[float, WebhookResult | BaseException]]:
    sids = [new_sid("MM") for _ in senders]  # fresh: the gateway's queue drops a seen MessageSid
    urls: list[str | None] = [None] * len(senders)
    if kind == "voice" and twilio is not None:
        data = voice_note()
        urls = [await twilio.host_media(data, "audio/ogg", sid) for sid in sids]

    async def post(sender: WhatsAppSender, url: str | None, sid: str) -> tuple[float, Any]:
        started = time.monotonic()
        if url is None:
            return started, await sender.send_text("Olá, tudo bem? Uma pergunta rápida.")
        return started, await sender.send_media(url, "audio/ogg", message_sid=sid)

    results = await asyncio.gather(
        *(post(*job) for job in zip(senders, urls, sids, strict=True)), return_exceptions=True
    )
    return [r if isinstance(r, tuple) else (0.0, r) for r in results]


def _webhook_report(kind: str, posts: list[tuple[float, Any]]) -> WhatsAppReport:
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    for _, result in posts:
        if isinstance(result, BaseException):
            statuses["error"] += 1
            errors.append(f"{type(result).__name__} {result}".strip())
        else:
            statuses[str(result.status)] += 1
    answered = [r for _, r in posts if isinstance(r, WebhookResult)]
    return WhatsAppReport(
        messages=len(posts),
        kind=kind,
        statuses=dict(statuses),
        webhook_ms=Summary.of(r.elapsed_s * 1000 for r in answered),
        channel=any(200 <= r.status < 300 for r in answered),
        errors=sorted(set(errors))[:5],
    )


async def _wait_replies(
    cfg: LoadConfig,
    twilio: TwilioView,
    senders: list[WhatsAppSender],
    posts: list[tuple[float, Any]],
    report: WhatsAppReport,
) -> None:
    sent_at = {f"whatsapp:{s.from_number}": at for s, (at, _) in zip(senders, posts, strict=True)}
    want_media = report.kind == "voice"
    deadline = time.monotonic() + cfg.whatsapp_timeout_s
    first: dict[str, float] = {}
    voice: dict[str, float] = {}
    while time.monotonic() < deadline:
        for reply in await twilio.replies():
            if reply.to in sent_at:
                first.setdefault(reply.to, reply.at - sent_at[reply.to])
                if reply.has_media:
                    voice.setdefault(reply.to, reply.at - sent_at[reply.to])
        if len(voice if want_media else first) >= len(sent_at):
            break
        await asyncio.sleep(0.1)
    report.replied, report.voice_replied = len(first), len(voice)
    report.reply_ms = Summary.of(v * 1000 for v in first.values())
    report.voice_reply_ms = Summary.of(v * 1000 for v in voice.values())
    report.reply_resolution_ms = twilio.resolution_ms
