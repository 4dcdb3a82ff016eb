"""WhatsApp guardrails over loopback: a signed webhook whose identifiers are not Twilio's is
refused before it costs anything (a captured form re-split into other fields still carries a
valid signature), and a MediaUrl that can never be read (not http(s), a body cut short of its
Content-Length, a host dripping bytes forever) is answered at once with the persona's fixed
reply, fetched once and never retried. Nothing in the gateway is patched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aiohttp import web
from twilio.request_validator import RequestValidator

from gateway.whatsapp import STATUS_PATH, WEBHOOK_PATH
from simulators.realtime import RealtimeSimulator
from simulators.twilio import TwilioSimulator
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    GatewayFactory,
    RunningGateway,
    metric_value,
)
from tests.store_helpers import inbound_record, wait_settled
from tests.test_whatsapp import fixed_reply

USER = "+5516999990001"
FOREIGN_ACCOUNT = "AC" + "cd" * 16
WAIT_S = 10.0  # a bound against hangs, never a speed claim
AT_ONCE_S = 4.0  # a retried message would still be in its retries (2 s, 4 s, ...) by then
DEADLINE_S = 1.0


# ---- the gateway and the person -----------------------------------------------------------


@dataclass
class Guarded:
    gateway: RunningGateway
    sender: WhatsAppSender
    twilio: TwilioSimulator
    realtime: RealtimeSimulator

    def persona_message(self, key: str) -> str:
        return self.gateway.runtime.persona.messages[key]

    async def settled(self, message_sid: str) -> str:
        async with asyncio.timeout(WAIT_S):
            return await wait_settled(self.gateway.runtime.store, message_sid)

    async def errors(self, kind: str) -> float:
        return await metric_value(self.gateway.url, "gateway_errors_total", kind=kind)


@pytest.fixture
async def guarded(
    start_gateway: GatewayFactory,
    live_env: dict[str, str],
    twilio_sim: TwilioSimulator,
    realtime_sim: RealtimeSimulator,
) -> AsyncIterator[Guarded]:
    gateway = await start_gateway({**live_env, "MEDIA_READ_DEADLINE_S": str(DEADLINE_S)})
    sender = WhatsAppSender(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, from_number=USER)
    yield Guarded(gateway, sender, twilio_sim, realtime_sim)
    await sender.close()


# ---- replay-proof webhooks ----------------------------------------------------------------


@dataclass
class Captured:
    """One webhook exactly as the sender put it on the wire."""

    form: list[tuple[str, str]]
    signature: str


async def capture_one_text(public_base_url: str, text: str) -> Captured:
    """The simulator's sender posts a genuine signed webhook to a stand-in that keeps it."""
    kept: list[Captured] = []

    async def keep(request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        form = parse_qsl(body, keep_blank_values=True, strict_parsing=True)
        kept.append(Captured(form, request.headers["X-Twilio-Signature"]))
        return web.Response(text="<Response/>", content_type="text/xml")

    app = web.Application()
    app.router.add_post(WEBHOOK_PATH, keep)
    async with serving(app) as stand_in:
        sender = WhatsAppSender(
            stand_in, public_base_url, AUTH_TOKEN, ACCOUNT_SID, from_number=USER
        )
        async with sender:
            assert (await sender.send_text(text)).status == 200
    [captured] = kept
    return captured


def resplit(form: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """MessageType folded into MessageSid's value; the sorted name+value concatenation that
    Twilio signs is unchanged: `MessageSid`+`SM…` `MessageType`+`text` is
    `MessageSid`+`SM…MessageTypetext`."""
    fields = dict(form)
    glued = fields["MessageSid"] + "MessageType" + fields["MessageType"]
    return [(k, glued if k == "MessageSid" else v) for k, v in form if k != "MessageType"]


async def post_form(url: str, form: list[tuple[str, str]], signature: str) -> tuple[int, str]:
    headers = {"X-Twilio-Signature": signature}
    async with aiohttp.ClientSession() as http, http.post(url, data=form, headers=headers) as r:
        return r.status, await r.text()


async def test_a_captured_webhook_re_split_into_other_fields_is_refused_and_costs_nothing(
    guarded: Guarded, caplog: pytest.LogCaptureFixture
) -> None:
    url = guarded.gateway.url + WEBHOOK_PATH
    captured = await capture_one_text(guarded.gateway.url, "Oi, tudo bem?")
    forged = resplit(captured.form)
    forged_sid = dict(forged)["MessageSid"]
    # The attack is real: Twilio's own validator accepts the re-split form's signature.
    assert RequestValidator(AUTH_TOKEN).validate(url, dict(forged), captured.signature)
    before = await guarded.errors("whatsapp_bad_fields")
    with caplog.at_level(logging.WARNING, logger="gateway.whatsapp"):
        status, text = await post_form(url, forged, captured.signature)
    assert (status, text) == (400, "bad MessageSid")
    assert await guarded.errors("whatsapp_bad_fields") - before == 1
    assert any("MessageSid" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # The genuine webhook is still answered, and it is the only thing answered.
    assert (await post_form(url, captured.form, captured.signature))[0] == 200
    genuine_sid = dict(captured.form)["MessageSid"]
    assert await guarded.settled(genuine_sid) == "done"
    await guarded.twilio.wait_for_messages(2, timeout=WAIT_S, settled=True)
    await asyncio.sleep(0.3)
    assert len(guarded.twilio.messages) == 2 and len(guarded.realtime.sessions) == 1
    assert await inbound_record(guarded.gateway.runtime.store, forged_sid) is None


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("AccountSid", FOREIGN_ACCOUNT),
        ("MessageSid", "SM123"),
        ("MessageSid", "SM" + "A" * 32),  # Twilio's hex is lower case
        ("From", USER.lstrip("+")),
        ("To", "+14155238886"),
    ],
    ids=["foreign-AccountSid", "short-MessageSid", "upper-MessageSid", "From-no-plus", "To-bare"],
)
async def test_a_signed_webhook_with_fields_twilio_never_sends_is_refused(
    guarded: Guarded, caplog: pytest.LogCaptureFixture, field_name: str, value: str
) -> None:
    before = await guarded.errors("whatsapp_bad_fields")
    with caplog.at_level(logging.WARNING, logger="gateway.whatsapp"):
        result = await guarded.sender.send_text("Oi", extra={field_name: value})
    assert (result.status, result.body) == (400, f"bad {field_name}")
    assert await guarded.errors("whatsapp_bad_fields") - before == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(field_name in w for w in warnings)
    assert not any(USER.lstrip("+") in w for w in warnings)  # never a full phone number
    await asyncio.sleep(0.3)
    store = guarded.gateway.runtime.store
    assert await store.person_by_number(USER) is None
    assert guarded.twilio.messages == [] and guarded.realtime.sessions == []
    # The same person with Twilio's real shape is answered.
    genuine = await guarded.sender.send_text("Oi de verdade")
    assert genuine.status == 200 and await guarded.settled(genuine.message_sid) == "done"
    await guarded.twilio.wait_for_messages(2, timeout=WAIT_S, settled=True)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("AccountSid", FOREIGN_ACCOUNT), ("MessageSid", "SM123")],
    ids=["foreign-AccountSid", "short-MessageSid"],
)
async def test_a_status_callback_with_fields_twilio_never_sends_changes_nothing(
    guarded: Guarded, field_name: str, value: str
) -> None:
    result = await guarded.sender.send_text("Oi")
    text, _voice = await guarded.twilio.wait_for_messages(2, timeout=WAIT_S, settled=True)
    assert await guarded.settled(result.message_sid) == "done"
    store = guarded.gateway.runtime.store
    recorded = [o.status for o in await store.outbound_for(result.message_sid)]
    assert "failed" not in recorded
    form = guarded.twilio.status_form(text, "failed") | {"ErrorCode": "30008", field_name: value}
    url = guarded.gateway.url + STATUS_PATH
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    before = await guarded.errors("whatsapp_status_bad_fields")
    status, body = await post_form(url, list(form.items()), signature)
    assert (status, body) == (400, f"bad {field_name}")
    assert await guarded.errors("whatsapp_status_bad_fields") - before == 1
    assert [o.status for o in await store.outbound_for(result.message_sid)] == recorded


# ---- media that can never be read ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class BadMediaHost:
    """A media host that misbehaves; counts every request it gets."""

    requests: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/short.ogg", self._counted(short_body))
        app.router.add_get("/drip.ogg", self._counted(slow_drip))
        return app

    def _counted(self, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            return await handler(request)

        return counted


async def short_body(request: web.Request) -> web.StreamResponse:
    """Announces 100 kB, sends 1 kB and closes the connection: the host's last word."""
    response = web.StreamResponse(headers={"Content-Type": "audio/ogg"})
    response.content_length = 100_000
    response.force_close()
    await response.prepare(request)
    await response.write(b"OggS" + bytes(1020))
    return response


async def slow_drip(request: web.Request) -> web.StreamResponse:
    """A few bytes now and then, forever (until the reader hangs up)."""
    response = web.StreamResponse(headers={"Content-Type": "audio/ogg"})
    response.content_length = 100_000
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write(b"OggS")
        while not request.transport or not request.transport.is_closing():
            await asyncio.sleep(0.2)
            await response.write(b"\0\0\0\0")
    return response


@pytest.fixture
async def bad_host() -> AsyncIterator[tuple[BadMediaHost, str]]:
    host = BadMediaHost()
    async with serving(host.app()) as url:
        yield host, url


async def assert_answered_at_once(guarded: Guarded, sid: str, key: str) -> None:
    persona = guarded.gateway.runtime.persona
    await fixed_reply(guarded.twilio, guarded.realtime, persona, key, timeout=AT_ONCE_S)
    assert await guarded.settled(sid) == "done"
    record = await inbound_record(guarded.gateway.runtime.store, sid)
    assert record is not None and record.attempts == 1  # never retried


@pytest.mark.parametrize(
    "media_url",
    ["file:///etc/passwd", "ftp://{host}/short.ogg", "not a url", "http://[::1/x.ogg", "http://"],
    ids=["file", "ftp", "garbage", "broken-ipv6", "no-host"],
)
async def test_a_media_url_that_is_not_http_is_answered_at_once_without_a_download(
    guarded: Guarded, bad_host: tuple[BadMediaHost, str], media_url: str
) -> None:
    host, base = bad_host
    url = media_url.format(host=base.removeprefix("http://"))
    result = await guarded.sender.send_media(url, "audio/ogg")
    assert result.status == 200
    await assert_answered_at_once(guarded, result.message_sid, "corrupt_audio")
    assert host.requests == []


async def test_a_body_shorter_than_its_content_length_is_answered_at_once_fetched_once(
    guarded: Guarded, bad_host: tuple[BadMediaHost, str]
) -> None:
    host, base = bad_host
    result = await guarded.sender.send_media(f"{base}/short.ogg", "audio/ogg")
    await assert_answered_at_once(guarded, result.message_sid, "corrupt_audio")
    assert host.requests == ["/short.ogg"]


async def test_a_slow_drip_is_cut_at_the_read_deadline_and_fetched_once(
    guarded: Guarded, bad_host: tuple[BadMediaHost, str]
) -> None:
    host, base = bad_host
    started = asyncio.get_running_loop().time()
    result = await guarded.sender.send_media(f"{base}/drip.ogg", "audio/ogg")
    await assert_answered_at_once(guarded, result.message_sid, "corrupt_audio")
    assert asyncio.get_running_loop().time() - started >= DEADLINE_S
    await asyncio.sleep(DEADLINE_S)  # long enough for a retry to show up, if there were one
    assert host.requests == ["/drip.ogg"]
