"""The Twilio-side simulators over real loopback sockets: REST + media + callbacks, the media
host and its CDN, the WhatsApp sender and the Media Streams caller."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import encode_basic_auth, web
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from yarl import URL

from gateway.twilio_api import (
    TwilioSignatures,
    close_rest_client,
    make_rest_client,
    media_auth_allowed,
)
from simulators.caller import SimulatedCaller, validate_message
from simulators.speech import speech_mulaw
from simulators.twilio import TwilioSimulator
from simulators.whatsapp_sender import WhatsAppSender
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN

SID = "AC" + "1" * 32
TOKEN = "sim-auth-token"
PUBLIC = "https://gw.example.com"
USER = "whatsapp:+5516999990001"
BOT = "whatsapp:+14155238886"
# Enough of an OGG/Opus file for a content sniff: capture pattern, then the Opus ID header.
OGG_OPUS = b"OggS\x00\x02" + bytes(22) + b"\x01\x13OpusHead\x01\x01" + bytes(200)
OGG_VORBIS = b"OggS\x00\x02" + bytes(22) + b"\x01\x1e\x01vorbis" + bytes(200)
MP3 = b"ID3\x04\x00" + bytes(300)

validator = RequestValidator(TOKEN)


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    """Twilio's JSON error body, as the API sends it."""
    more_info = f"https://www.twilio.com/docs/errors/{code}"
    return {"code": code, "message": message, "more_info": more_info, "status": status}


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


class GatewayHttp:
    """What the gateway exposes to Twilio for sending: status callbacks and published media."""

    def __init__(self) -> None:
        self.callbacks: list[tuple[dict[str, str], bool]] = []
        self.media: dict[str, tuple[bytes, str]] = {}
        self.base_url = ""
        self.app = web.Application()
        self.app.router.add_post("/tw/status", self._status)
        self.app.router.add_get("/media/{name}", self._media)
        self.app.router.add_get("/moved/{name}", self._moved)

    async def _status(self, request: web.Request) -> web.Response:
        form = await request.post()
        url = str(request.url)  # loopback: the public URL is the real one here
        valid = validator.validate(url, form, request.headers.get("X-Twilio-Signature", ""))
        self.callbacks.append(({k: str(v) for k, v in form.items()}, valid))
        return web.Response(status=204)

    async def _media(self, request: web.Request) -> web.Response:
        item = self.media.get(request.match_info["name"])
        if item is None:
            return web.Response(status=404)
        return web.Response(body=item[0], headers={"Content-Type": item[1]})

    async def _moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/media/{request.match_info['name']}")


@pytest.fixture
async def sim():
    simulator = TwilioSimulator(SID, TOKEN, status_callback_delay_s=0.01)
    await simulator.start()
    yield simulator
    await simulator.close()


@pytest.fixture
async def rest(sim):
    client = make_rest_client(SID, TOKEN, sim.base_url)
    yield client
    await close_rest_client(client)


@pytest.fixture
async def gw():
    gateway = GatewayHttp()
    runner, gateway.base_url = await serve(gateway.app)
    yield gateway
    await runner.cleanup()


# ---- REST: messages ---------------------------------------------------------------------


async def test_text_message_via_sdk_and_signed_callbacks(sim, rest, gw):
    status_url = gw.base_url + "/tw/status"
    msg = await rest.messages.create_async(
        to=USER, from_=BOT, body="Olá! Tudo bem?", status_callback=status_url
    )
    assert msg.sid.startswith("SM") and len(msg.sid) == 34
    assert (msg.status, msg.direction, msg.num_media, msg.error_code) == (
        "queued",
        "outbound-api",
        "0",
        None,
    )
    assert isinstance(msg.date_created, datetime) and msg.date_created.tzinfo is not None
    assert (msg.to, msg.from_, msg.body, msg.account_sid) == (USER, BOT, "Olá! Tudo bem?", SID)
    assert msg.uri == f"/2010-04-01/Accounts/{SID}/Messages/{msg.sid}.json"

    [sent] = await sim.wait_for_messages(1, timeout=3, settled=True)
    assert sent.statuses == ["queued", "sent", "delivered"]
    assert ("Body", "Olá! Tudo bem?") in sent.form and ("StatusCallback", status_url) in sent.form
    assert [c.http_status for c in sent.callbacks] == [204, 204]
    assert [(f["MessageStatus"], ok) for f, ok in gw.callbacks] == [
        ("sent", True),
        ("delivered", True),
    ]
    delivered = gw.callbacks[1][0]
    assert delivered["MessageSid"] == delivered["SmsSid"] == msg.sid
    assert delivered["ChannelPrefix"] == "whatsapp" and delivered["EventType"] == "DELIVERED"
    assert delivered["ChannelToAddress"] == "+5516999990001" and delivered["AccountSid"] == SID
    fetched = await rest.messages(msg.sid).fetch_async()
    assert fetched.status == "delivered"


async def test_media_message_is_fetched_like_twilio(sim, rest, gw):
    gw.media["note.ogg"] = (OGG_OPUS, "audio/ogg")
    url = gw.base_url + "/moved/note.ogg"  # a redirect on the way, which Twilio follows
    msg = await rest.messages.create_async(
        to=USER, from_=BOT, media_url=[url], status_callback=gw.base_url + "/tw/status"
    )
    assert msg.sid.startswith("MM") and msg.num_media == "1"
    [sent] = await sim.wait_for_messages(1, timeout=3, settled=True)
    [fetch] = sent.media
    assert (fetch.status, fetch.content_type, fetch.data, fetch.length) == (
        200,
        "audio/ogg",
        OGG_OPUS,
        len(OGG_OPUS),
    )
    assert fetch.redirects == [302] and fetch.final_url == gw.base_url + "/media/note.ogg"
    assert "Authorization" not in fetch.request_headers
    assert sent.statuses == ["queued", "sent", "delivered"]


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (OGG_OPUS, "application/octet-stream"),  # OGG not served as audio/ogg
        (OGG_OPUS, "audio/opus"),  # not a WhatsApp type
        (MP3, "audio/ogg"),  # header does not match the bytes
        (OGG_VORBIS, "audio/ogg"),  # OGG without Opus
        (None, None),  # 404
    ],
)
async def test_undeliverable_media_fails_with_63019(sim, rest, gw, data, content_type):
    if data is not None:
        gw.media["x"] = (data, content_type)
    await rest.messages.create_async(
        to=USER,
        from_=BOT,
        media_url=[gw.base_url + "/media/x"],
        status_callback=gw.base_url + "/tw/status",
    )
    [sent] = await sim.wait_for_messages(1, timeout=3, settled=True)
    assert sent.statuses == ["queued", "failed"] and sent.error_code == 63019
    [(form, valid)] = gw.callbacks
    assert valid and form["MessageStatus"] == "failed" and form["ErrorCode"] == "63019"


async def test_wrong_credentials_are_401_20003(sim):
    client = make_rest_client(SID, "wrong-token", sim.base_url)
    try:
        with pytest.raises(TwilioRestException) as excinfo:
            await client.messages.create_async(to=USER, from_=BOT, body="hi")
    finally:
        await close_rest_client(client)
    assert (excinfo.value.status, excinfo.value.code) == (401, 20003)
    async with aiohttp.ClientSession() as session:
        url = f"{sim.base_url}/2010-04-01/Accounts/{SID}/Messages.json"
        async with session.post(url, data={"To": USER, "Body": "x"}) as response:
            assert response.status == 401
            assert await response.json() == error_body(401, 20003, "Authenticate")
    assert sim.messages == [] and [r.status for r in sim.rest_requests] == [401, 401]


async def test_other_account_in_path_is_404_and_validation_errors(sim, rest):
    other = rest.api.v2010.accounts("AC" + "9" * 32)
    with pytest.raises(TwilioRestException) as excinfo:
        await other.messages.create_async(to=USER, from_=BOT, body="hi")
    assert (excinfo.value.status, excinfo.value.code) == (404, 20404)
    with pytest.raises(TwilioRestException) as excinfo:
        await rest.messages.create_async(to="", from_=BOT, body="hi")
    assert (excinfo.value.status, excinfo.value.code) == (400, 21604)
    with pytest.raises(TwilioRestException) as excinfo:
        await rest.messages.create_async(to=USER, from_=BOT)
    assert (excinfo.value.status, excinfo.value.code) == (400, 21619)
    assert sim.messages == []


async def test_injected_failures(sim, rest):
    sim.fail_next(500)
    sim.fail_next(429, count=2)
    codes = []
    for _ in range(3):
        with pytest.raises(TwilioRestException) as excinfo:
            await rest.messages.create_async(to=USER, from_=BOT, body="hi")
        codes.append((excinfo.value.status, excinfo.value.code))
    assert codes == [(500, 20500), (429, 20429), (429, 20429)]
    assert (await rest.messages.create_async(to=USER, from_=BOT, body="hi")).status == "queued"


async def test_a_lost_answer_still_sends_and_the_read_finds_it(sim, rest):
    other = "whatsapp:+5516999990002"
    await rest.messages.create_async(to=other, from_=BOT, body="not yours")
    sim.lose_next_answers()
    with pytest.raises(aiohttp.ClientError):
        await rest.messages.create_async(to=USER, from_=BOT, body="first")
    await rest.messages.create_async(to=USER, from_=BOT, body="second")
    found = await rest.messages.list_async(to=USER, from_=BOT, limit=20)
    assert [m.body for m in found] == ["second", "first"]  # newest first, To filtered
    assert [m.sid for m in found] == [m.sid for m in reversed(sim.messages[1:])]
    assert all(m.date_created is not None for m in found)
    assert [m.body for m in await rest.messages.list_async(from_=BOT, limit=1)] == ["second"]


async def test_closed_24h_window(sim, rest, gw):
    sim.close_window(USER)
    with pytest.raises(TwilioRestException) as excinfo:
        await rest.messages.create_async(to=USER, from_=BOT, body="hi")
    assert (excinfo.value.status, excinfo.value.code) == (400, 63016)
    template = await rest.messages.create_async(to=USER, from_=BOT, content_sid="HX" + "0" * 32)
    assert template.status == "queued"

    sim.close_window(USER, mode="async")  # accepted, then fails in the callback
    await rest.messages.create_async(
        to=USER, from_=BOT, body="hi", status_callback=gw.base_url + "/tw/status"
    )
    _, late = await sim.wait_for_messages(2, timeout=3, settled=True)
    assert late.statuses == ["queued", "failed"] and late.error_code == 63016
    assert gw.callbacks[-1][0]["ErrorCode"] == "63016"
    sim.open_window(USER)
    assert (await rest.messages.create_async(to=USER, from_=BOT, body="ok")).status == "queued"


# ---- REST: calls ------------------------------------------------------------------------

DIAL = "<Response><Dial><Number>+5516988887777</Number></Dial></Response>"


async def test_call_update_via_sdk_hangs_up_and_redirects(sim, rest):
    call = sim.add_call(from_="+5516999990001", to="+551633334444")
    updated = await rest.calls(call.sid).update_async(twiml=DIAL)
    assert (updated.sid, updated.status, updated.account_sid) == (call.sid, "in-progress", SID)
    assert (updated._from, updated.to, updated.direction) == (
        "+5516999990001",
        "+551633334444",
        "inbound",
    )
    assert isinstance(updated.start_time, datetime) and updated.end_time is None
    assert updated.uri == f"/2010-04-01/Accounts/{SID}/Calls/{call.sid}.json"
    [redirect] = sim.call_updates
    assert (redirect.effect, redirect.twiml, redirect.dial_number) == (
        "redirected",
        DIAL,
        "+5516988887777",
    )
    assert redirect.form == [("Twiml", DIAL)] and call.status == "in-progress"

    kept = await rest.calls(call.sid).update_async(status="canceled")  # answered: goes on
    assert kept.status == "in-progress" and sim.call_updates[-1].effect == "none"

    # The sync client, as `Client(...).calls(sid).update(...)` is usually written.
    sync = Client(SID, TOKEN)
    sync.api.base_url = sim.base_url
    ended = await asyncio.to_thread(sync.calls(call.sid).update, status="completed")
    assert ended.status == "completed" and isinstance(ended.end_time, datetime)
    assert ended.duration == "0" and call.status == "completed"
    assert [u.effect for u in call.updates] == ["redirected", "none", "completed"]
    assert sim.call_updates[-1].at >= redirect.at
    fetched = await rest.calls(call.sid).fetch_async()
    assert fetched.status == "completed"

    with pytest.raises(TwilioRestException) as excinfo:
        await rest.calls(call.sid).update_async(status="completed")  # hanging up twice
    assert (excinfo.value.status, excinfo.value.code) == (400, 21220)
    assert excinfo.value.msg == "Unable to update record: Call is not in-progress. Cannot redirect."


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"status": "busy"}, 400, 20001),
        ({"url": "ftp://gw.example.com/twiml"}, 400, 21205),
        ({"url": "/relative/twiml"}, 400, 21205),
        ({"twiml": "<Response><Say>" + "a" * 4000 + "</Say></Response>"}, 400, 32018),
        ({"twiml": "<Response><Say>oi</Response>"}, 400, 12100),
        ({"twiml": "<Say>oi</Say>"}, 400, 12100),
    ],
)
async def test_call_update_form_is_checked(sim, rest, fields, status, code):
    call = sim.add_call()
    with pytest.raises(TwilioRestException) as excinfo:
        await rest.calls(call.sid).update_async(**fields)
    assert (excinfo.value.status, excinfo.value.code) == (status, code)
    assert sim.call_updates == [] and call.status == "in-progress"


async def test_call_update_unknown_call_and_bad_credentials(sim, rest):
    sim.add_call()
    for sid in ("CA" + "0" * 32, "CA123", "CA" + "A" * 32):  # unknown, too short, upper case
        with pytest.raises(TwilioRestException) as excinfo:
            await rest.calls(sid).update_async(status="completed")
        assert (excinfo.value.status, excinfo.value.code) == (404, 20404)
    call = sim.add_call(status="completed")
    wrong = make_rest_client(SID, "wrong-token", sim.base_url)
    try:
        with pytest.raises(TwilioRestException) as excinfo:
            await wrong.calls(call.sid).update_async(status="completed")
    finally:
        await close_rest_client(wrong)
    assert (excinfo.value.status, excinfo.value.code) == (401, 20003)
    async with aiohttp.ClientSession() as session:
        url = f"{sim.base_url}/2010-04-01/Accounts/{SID}/Calls/{call.sid}.json"
        headers = {"Authorization": encode_basic_auth(SID, TOKEN)}
        async with session.post(url, data={"Status": "completed"}, headers=headers) as response:
            assert response.status == 400
            message = "Call is not in-progress. Cannot redirect."
            assert await response.json() == error_body(400, 21220, message)
    assert [r.status for r in sim.rest_requests] == [404, 404, 404, 401, 400]
    assert sim.call_updates == []

    sim.fail_next_call_update(503)
    live = sim.add_call()
    with pytest.raises(TwilioRestException) as excinfo:
        await rest.calls(live.sid).update_async(status="completed")
    assert (excinfo.value.status, excinfo.value.code) == (503, 20503)
    assert (await rest.calls(live.sid).update_async(status="completed")).status == "completed"


# ---- inbound media host and CDN ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning")
async def test_media_host_needs_auth_and_credentials_never_reach_the_cdn(sim):
    url = sim.add_media(OGG_OPUS, "audio/ogg")
    assert media_auth_allowed(url, sim.base_url, SID)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 401 and (await response.json())["code"] == 20003
        async with session.get(url, auth=aiohttp.BasicAuth(SID, "nope")) as response:
            assert response.status == 401
        async with session.get(url, auth=aiohttp.BasicAuth(SID, TOKEN)) as response:
            assert response.status == 200 and await response.read() == OGG_OPUS
            assert response.headers["Content-Type"] == "audio/ogg"
            [hop] = response.history
            cdn_url = URL(hop.headers["Location"])
            assert hop.status == 307 and cdn_url.origin() != URL(sim.base_url).origin()
            assert not media_auth_allowed(str(cdn_url), sim.base_url, SID)
        headers = {"Authorization": encode_basic_auth(SID, TOKEN)}  # the non-deprecated way
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
    assert len(sim.cdn_requests) == 2
    for request in sim.cdn_requests:
        assert "authorization" not in {name.lower() for name in request.headers}
    item = next(iter(sim.media.values()))
    assert [("Authorization" in r["headers"]) for r in item.requests] == [False, True, True, True]


async def test_media_404_first_n_times(sim):
    url = sim.add_media(b"\x00" * 10, "image/png", not_found_first=2)
    headers = {"Authorization": encode_basic_auth(SID, TOKEN)}
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(url, headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [404, 404, 200]


# ---- WhatsApp sender --------------------------------------------------------------------


async def test_whatsapp_sender_signs_exact_twilio_form():
    signatures = TwilioSignatures(TOKEN, PUBLIC)
    seen: list[tuple[dict[str, str], bool]] = []

    async def webhook(request: web.Request) -> web.Response:
        ok = await signatures.form_ok(request)
        seen.append(({k: str(v) for k, v in (await request.post()).items()}, ok))
        if not ok:
            return web.Response(status=403)
        return web.Response(text="<Response/>", content_type="text/xml")

    app = web.Application()
    app.router.add_post("/webhook/whatsapp", webhook)
    runner, base = await serve(app)
    try:
        async with WhatsAppSender(base, PUBLIC, TOKEN, SID) as sender:
            text = await sender.send_text("Olá")
            note = await sender.send_media(f"https://api.twilio.com/x/ME{'0' * 32}", "audio/ogg")
            forged = await sender.send_text("Olá", forge=True)
    finally:
        await runner.cleanup()
    assert (text.status, note.status, forged.status) == (200, 200, 403)
    assert text.body == "<Response/>" and text.content_type.startswith("text/xml")
    form = seen[0][0]
    assert list(form) == [
        "SmsMessageSid", "NumMedia", "ProfileName", "MessageType", "SmsSid", "WaId", "SmsStatus",
        "Body", "To", "NumSegments", "ReferralNumMedia", "MessageSid", "AccountSid", "From",
        "ApiVersion",
    ]  # fmt: skip
    assert form["MessageSid"].startswith("SM") and form["From"] == "whatsapp:+5516999990001"
    assert (form["WaId"], form["To"], form["Body"]) == ("5516999990001", BOT, "Olá")
    media_form = seen[1][0]
    assert media_form["MessageSid"].startswith("MM") and media_form["NumMedia"] == "1"
    assert (media_form["MessageType"], media_form["MediaContentType0"]) == ("audio", "audio/ogg")


# ---- simulated caller against a fake gateway --------------------------------------------

Script = Callable[["FakeVoiceGateway"], Awaitable[None]]
TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{url}">'
    '<Parameter name="token" value="tok-1"/><Parameter name="from" value="{caller}"/>'
    "</Stream></Connect><Say>Desculpe.</Say></Response>"
)


class FakeVoiceGateway:
    """Voice webhook + media stream, checking signatures with the production helper."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.signatures = TwilioSignatures(TOKEN, PUBLIC)
        self.inbox: list[tuple[float, dict[str, Any]]] = []
        self.queue: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.ws: web.WebSocketResponse | None = None
        self.stream_sid = ""
        self.script_error: BaseException | None = None
        self.app = web.Application()
        self.app.router.add_post("/webhook/voice", self._voice)
        self.app.router.add_get("/media-stream", self._stream)

    async def _voice(self, request: web.Request) -> web.Response:
        if not await self.signatures.form_ok(request):
            return web.Response(status=403)
        form = await request.post()
        twiml = TWIML.format(url=self.signatures.stream_url(), caller=form["From"])
        return web.Response(text=twiml, content_type="text/xml")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if not self.signatures.ws_ok(request):
            return web.Response(status=403)
        self.ws = web.WebSocketResponse()
        await self.ws.prepare(request)
        script = asyncio.create_task(self.script(self))
        loop = asyncio.get_running_loop()
        async for msg in self.ws:
            item = (loop.time(), json.loads(msg.data))
            self.inbox.append(item)
            self.queue.put_nowait(item)
        if script.done() and not script.cancelled() and script.exception() is not None:
            self.script_error = script.exception()
        script.cancel()
        await asyncio.gather(script, return_exceptions=True)
        return self.ws

    async def expect(self, event: str, within_s: float = 2.0) -> tuple[float, dict[str, Any]]:
        async with asyncio.timeout(within_s):
            while True:
                at, message = await self.queue.get()
                if message["event"] == event:
                    return at, message

    async def send(self, message: dict[str, Any] | str) -> float:
        assert self.ws is not None
        await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))
        return asyncio.get_running_loop().time()

    async def send_audio(self, mulaw: bytes) -> float:
        for i in range(0, len(mulaw), 160):
            payload = base64.b64encode(mulaw[i : i + 160]).decode()
            sent = await self.send(
                {"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}
            )
        return sent

    async def mark(self, name: str) -> float:
        return await self.send(
            {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}
        )


async def run_call(
    script: Script,
    body: Callable[[SimulatedCaller, FakeVoiceGateway], Awaitable[None]],
    token: str = TOKEN,
    *,
    account_sid: str = SID,
    twilio: TwilioSimulator | None = None,
):
    gateway = FakeVoiceGateway(script)
    runner, base = await serve(gateway.app)
    caller = SimulatedCaller(base, PUBLIC, token, account_sid, twilio=twilio)
    try:
        await body(caller, gateway)
    finally:
        await caller.close()
        await runner.cleanup()
    if gateway.script_error is not None:
        raise gateway.script_error
    return caller, gateway


async def started(gw: FakeVoiceGateway) -> None:
    _, start = await gw.expect("start")
    gw.stream_sid = start["streamSid"]


async def test_caller_dials_streams_paced_frames_with_exact_shapes():
    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        dialed = await caller.dial()
        assert dialed.status == 200 and dialed.stream_url == "wss://gw.example.com/media-stream"
        assert dialed.parameters == {"token": "tok-1", "from": "+5516999990001"}
        await caller.connect()
        await asyncio.sleep(1.0)
        caller.speak(speech_mulaw(200))
        await asyncio.sleep(0.4)
        await caller.send_dtmf("5")
        await caller.hangup()

    caller, gw = await run_call(started, body)
    messages = [m for _, m in gw.inbox]
    assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = messages[1]
    assert start == {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": caller.stream_sid,
        "start": {
            "accountSid": SID,
            "streamSid": caller.stream_sid,
            "callSid": caller.call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"token": "tok-1", "from": "+5516999990001"},
        },
    }
    assert caller.stream_sid.startswith("MZ") and caller.call_sid.startswith("CA")
    numbered = messages[1:]
    assert [m["sequenceNumber"] for m in numbered] == [str(i) for i in range(1, len(numbered) + 1)]
    media = [(at, m) for at, m in gw.inbox if m["event"] == "media"]
    assert len(media) >= 65
    for chunk, (_, m) in enumerate(media, start=1):
        assert set(m) == {"event", "sequenceNumber", "streamSid", "media"}
        assert m["media"]["chunk"] == str(chunk) and m["media"]["timestamp"] == str(20 * chunk)
        assert (
            m["media"]["track"] == "inbound" and len(base64.b64decode(m["media"]["payload"])) == 160
        )
    arrivals = [at for at, _ in media]
    per_frame = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    assert 0.019 < per_frame < 0.021  # ~50 frames/s with no drift
    # A stalled box may bunch a few frames (the backlog goes out at once, like Twilio's);
    # a pacer that sends everything at once or stops for whole seconds fails either way.
    assert max(b - a for a, b in itertools.pairwise(arrivals)) < 0.25
    payloads = [base64.b64decode(m["media"]["payload"]) for _, m in media]
    assert set(payloads[0]) == {0xFF}  # silence until the caller speaks
    assert sum(p != b"\xff" * 160 for p in payloads) == 10  # 200 ms of speech
    assert messages[-2] == {
        "event": "dtmf",
        "streamSid": caller.stream_sid,
        "sequenceNumber": messages[-2]["sequenceNumber"],
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    assert messages[-1] == {
        "event": "stop",
        "sequenceNumber": str(len(numbered)),
        "streamSid": caller.stream_sid,
        "stop": {"accountSid": SID, "callSid": caller.call_sid},
    }
    [turn] = caller.turns
    # 200 ms of speech on the frame clock (10 frames above); wall time may bunch on a busy box.
    assert turn.speech_end is not None and turn.speech_end >= turn.speech_start
    assert caller.violations == [] and not caller.closed_by_server


async def test_marks_echo_after_playback_and_clear_flushes_them():
    echoes: dict[str, float] = {}
    sent: dict[str, float] = {}

    async def script(gw: FakeVoiceGateway) -> None:
        await started(gw)
        sent["empty"] = await gw.mark("empty")
        echoes["empty"] = (await gw.expect("mark"))[0]
        await gw.send_audio(b"\x10" * 3200)  # 400 ms, sent at once
        sent["m1"] = await gw.mark("m1")
        at, echo = await gw.expect("mark")
        assert echo["mark"] == {"name": "m1"}
        echoes["m1"] = at
        await gw.send_audio(b"\x20" * 16000)  # 2 s
        await gw.mark("m2")
        await gw.mark("m3")
        await asyncio.sleep(0.3)
        sent["clear"] = await gw.send({"event": "clear", "streamSid": gw.stream_sid})
        for name in ("m2", "m3"):
            at, echo = await gw.expect("mark")
            assert echo == {
                "event": "mark",
                "sequenceNumber": echo["sequenceNumber"],
                "streamSid": gw.stream_sid,
                "mark": {"name": name},
            }
            echoes[name] = at

    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        await caller.dial()
        await caller.connect()
        await caller.wait_until(lambda: len(caller.clears) == 1 and len(echoes) == 4, timeout=3)

    caller, _ = await run_call(script, body)
    assert echoes["empty"] - sent["empty"] < 0.05
    assert 0.37 < echoes["m1"] - sent["m1"] < 0.5
    assert echoes["m2"] - sent["clear"] < 0.05 and echoes["m3"] - sent["clear"] < 0.05
    marks = {m.name: m for m in caller.marks}
    assert abs(marks["m1"].played_bytes - 3200) <= 16 and not marks["m1"].cleared
    assert marks["m2"].cleared and marks["m3"].cleared
    [clear] = caller.clears
    assert clear.marks_flushed == ["m2", "m3"]
    assert abs(clear.discarded_bytes - 8000 * 1.7) < 800  # 2 s queued, ~0.3 s played
    assert caller.first_reply_at is not None and len(caller.audio_received) == 19200
    assert abs(caller.bytes_played() - (19200 - clear.discarded_bytes)) <= 16
    assert caller.violations == []


async def test_malformed_messages_are_recorded_as_violations():
    async def script(gw: FakeVoiceGateway) -> None:
        await started(gw)
        sid = gw.stream_sid
        good = base64.b64encode(b"\x00" * 160).decode()
        await gw.send(
            {"event": "media", "streamSid": sid, "media": {"payload": good, "track": "outbound"}}
        )
        await gw.send({"event": "media", "streamSid": sid, "media": {"payload": "@@not base64@@"}})
        await gw.send({"event": "media", "streamSid": "MZwrong", "media": {"payload": good}})
        await gw.send({"event": "clear", "streamSid": sid, "extra": 1})
        await gw.send({"event": "stop", "streamSid": sid})
        await gw.send("not json")
        assert gw.ws is not None
        await gw.ws.send_bytes(b"\x00\x01")
        await gw.send({"event": "media", "streamSid": sid, "media": {"payload": good}})

    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        await caller.dial()
        await caller.connect()
        await caller.wait_until(lambda: len(caller.audio_received) == 160, timeout=3)

    caller, _ = await run_call(script, body)
    assert [v.code for v in caller.violations] == [31951] * 6 + [31950]
    assert "wrong streamSid" in caller.violations[2].reason


async def test_turn_latency_and_server_hangup():
    async def script(gw: FakeVoiceGateway) -> None:
        await started(gw)
        heard_speech, quiet_frames = False, 0
        while quiet_frames < 5:  # a crude VAD: 100 ms of silence after speech ends the turn
            _, frame = await gw.expect("media")
            silent = set(base64.b64decode(frame["media"]["payload"])) == {0xFF}
            heard_speech |= not silent
            quiet_frames = quiet_frames + 1 if heard_speech and silent else 0
        await asyncio.sleep(0.05)
        await gw.send_audio(b"\x30" * 800)
        await gw.mark("reply-1")
        await gw.expect("mark")
        assert gw.ws is not None
        await gw.ws.close()

    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        await caller.dial()
        await caller.connect()
        turn = await caller.speak_and_wait(speech_mulaw(300), reply_timeout=3)
        assert turn.latency_s is not None and 0.12 < turn.latency_s < 0.3
        assert turn.first_reply_audible_at == turn.first_reply_at  # buffer was empty
        async with asyncio.timeout(3):
            await caller.closed.wait()
        frames = caller.media_frames_sent
        await asyncio.sleep(0.1)
        assert caller.media_frames_sent == frames  # a dead line sends nothing

    caller, _ = await run_call(script, body)
    assert caller.closed_by_server and caller.violations == []


async def test_unsigned_caller_is_refused():
    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        assert (await caller.dial()).status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
            await caller.connect("wss://gw.example.com/media-stream", {})
        assert excinfo.value.status == 403

    await run_call(started, body, token="not-the-token")


def test_validate_message_shapes():
    sid = "MZ1"
    assert validate_message('{"event":"clear","streamSid":"MZ1"}', sid)[1] is None
    assert (
        validate_message('{"event":"mark","streamSid":"MZ1","mark":{"name":"a"}}', sid)[1] is None
    )
    assert validate_message('{"event":"mark","streamSid":"MZ1","mark":{"name":1}}', sid)[1]
    assert validate_message('{"event":["media"],"streamSid":"MZ1"}', sid)[1]
    assert validate_message("[1]", sid)[1]


# ---- a call updated over REST ends the caller's stream ----------------------------------


def playing(audio_ms: int, mark: str) -> Script:
    """The fake gateway plays `audio_ms` of audio, then a mark."""

    async def script(gw: FakeVoiceGateway) -> None:
        await started(gw)
        await gw.send_audio(b"\x10" * (8 * audio_ms))
        await gw.mark(mark)

    return script


async def test_hangup_after_the_last_marks_ends_the_stream(sim, rest):
    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        await caller.dial()
        await caller.connect()
        assert caller.twilio_call is sim.call(caller.call_sid)
        assert caller.twilio_call.status == "in-progress"
        await caller.wait_until(lambda: caller.marks and caller.marks[0].echoed_at, timeout=3)
        call = await rest.calls(caller.call_sid).update_async(status="completed")
        assert call.status == "completed"
        async with asyncio.timeout(3):
            await caller.closed.wait()

    caller, gw = await run_call(playing(300, "goodbye"), body, twilio=sim)
    [update] = sim.call_updates
    [mark] = caller.marks
    assert mark.echoed_at is not None and update.at >= mark.echoed_at
    end = caller.ended_by_update
    assert end is not None and (end.reason, end.unplayed_bytes, end.pending_marks) == (
        "completed",
        0,
        [],
    )
    assert end.at >= update.at and not caller.closed_by_server and not caller.stream_live
    assert [m for _, m in gw.inbox][-1] == {
        "event": "stop",
        "sequenceNumber": gw.inbox[-1][1]["sequenceNumber"],
        "streamSid": caller.stream_sid,
        "stop": {"accountSid": SID, "callSid": caller.call_sid},
    }
    assert sim.call(caller.call_sid).status == "completed"


async def test_redirect_to_dial_cuts_the_stream_and_the_call_goes_on(twilio_sim):
    # The conftest fixture adopts callers of its account: nothing to wire.
    rest = make_rest_client(ACCOUNT_SID, AUTH_TOKEN, twilio_sim.base_url)

    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        await caller.dial()
        await caller.connect()
        await caller.wait_until(lambda: caller.marks and caller.first_reply_at, timeout=3)
        call = await rest.calls(caller.call_sid).update_async(twiml=DIAL)
        assert call.status == "in-progress"
        async with asyncio.timeout(3):
            await caller.closed.wait()

    try:
        caller, _ = await run_call(playing(2000, "long"), body, account_sid=ACCOUNT_SID)
    finally:
        await close_rest_client(rest)
    end = caller.ended_by_update
    assert end is not None and end.reason == "redirect" and end.pending_marks == ["long"]
    assert 8 * 1000 < end.unplayed_bytes <= 8 * 2000  # most of the 2 s was never heard
    assert caller.marks[0].echoed_at is None  # Twilio echoes nothing after stop
    call = twilio_sim.call(caller.call_sid)
    assert (call.status, call.dial_number, call.twiml) == ("in-progress", "+5516988887777", DIAL)


async def test_a_caller_that_hung_up_is_a_completed_call(sim, rest):
    async def body(caller: SimulatedCaller, gw: FakeVoiceGateway) -> None:
        await caller.dial()
        await caller.connect()
        await caller.hangup()
        with pytest.raises(TwilioRestException) as excinfo:
            await rest.calls(caller.call_sid).update_async(twiml=DIAL)
        assert excinfo.value.code == 21220

    with sim.adopting_callers():
        caller, _ = await run_call(started, body)
    assert sim.call(caller.call_sid).status == "completed" and caller.ended_by_update is None
    assert sim.call_updates == []
