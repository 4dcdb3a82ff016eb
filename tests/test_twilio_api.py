"""gateway.twilio_api over real loopback sockets: signatures, media auth policy, REST client."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from multidict import MultiDict
from twilio.request_validator import RequestValidator

from gateway.twilio_api import (
    LocalTwilioHttpClient,
    TwilioSignatures,
    close_rest_client,
    make_rest_client,
    media_auth_allowed,
)

TOKEN = "test-auth-token"
SID = "AC" + "1" * 32
PUBLIC = "https://gw.example.com"
MM = "MM" + "a" * 32
ME = "ME" + "b" * 32
MEDIA_PATH = f"/2010-04-01/Accounts/{SID}/Messages/{MM}/Media/{ME}"

validator = RequestValidator(TOKEN)


def sign(url: str, params: object) -> dict[str, str]:
    return {"X-Twilio-Signature": validator.compute_signature(url, params)}


@pytest.fixture
async def gateway(aiohttp_client):
    """A minimal gateway using TwilioSignatures exactly as the real handlers do."""

    def build(public: str = PUBLIC):
        signatures = TwilioSignatures(TOKEN, public)

        async def webhook(request: web.Request) -> web.Response:
            return web.Response(status=200 if await signatures.form_ok(request) else 403)

        async def media_stream(request: web.Request) -> web.StreamResponse:
            if not signatures.ws_ok(request):
                return web.Response(status=403)
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str("ok")
            await ws.close()
            return ws

        app = web.Application()
        app.router.add_post("/webhook/whatsapp", webhook)
        app.router.add_get("/media-stream", media_stream)
        return aiohttp_client(app)

    return build


FORM = {"MessageSid": "SM" + "0" * 32, "Body": "Olá, tudo bem?", "From": "whatsapp:+5516999990001"}


async def test_form_signed_over_public_url_passes(gateway):
    client = await gateway()
    url = PUBLIC + "/webhook/whatsapp"
    response = await client.post("/webhook/whatsapp", data=FORM, headers=sign(url, FORM))
    assert response.status == 200


async def test_form_with_explicit_default_port_passes(gateway):
    client = await gateway()
    url = "https://gw.example.com:443/webhook/whatsapp"
    response = await client.post("/webhook/whatsapp", data=FORM, headers=sign(url, FORM))
    assert response.status == 200


@pytest.mark.parametrize(
    "signed_url",
    [
        "http://gw.example.com/webhook/whatsapp",  # wrong scheme
        "https://other.example.com/webhook/whatsapp",  # wrong host
        "https://gw.example.com/webhook/voice",  # wrong path
        "http://127.0.0.1:8080/webhook/whatsapp",  # the internal address
    ],
)
async def test_form_signed_over_another_url_fails(gateway, signed_url):
    client = await gateway()
    response = await client.post("/webhook/whatsapp", data=FORM, headers=sign(signed_url, FORM))
    assert response.status == 403


async def test_forged_missing_and_tampered_signatures_fail(gateway):
    client = await gateway()
    url = PUBLIC + "/webhook/whatsapp"
    forged = {"X-Twilio-Signature": RequestValidator("other").compute_signature(url, FORM)}
    assert (await client.post("/webhook/whatsapp", data=FORM, headers=forged)).status == 403
    assert (await client.post("/webhook/whatsapp", data=FORM)).status == 403
    tampered = FORM | {"Body": "changed"}
    response = await client.post("/webhook/whatsapp", data=tampered, headers=sign(url, FORM))
    assert response.status == 403


async def test_every_field_is_validated_never_a_whitelist(gateway):
    client = await gateway()
    url = PUBLIC + "/webhook/whatsapp"
    extended = FORM | {"SomeNewTwilioField": "x"}
    ok = await client.post("/webhook/whatsapp", data=extended, headers=sign(url, extended))
    assert ok.status == 200
    unsigned_extra = await client.post("/webhook/whatsapp", data=extended, headers=sign(url, FORM))
    assert unsigned_extra.status == 403


async def test_repeated_keys_and_query_string(gateway):
    client = await gateway()
    form = MultiDict([("MediaUrl", "https://a/1"), ("MediaUrl", "https://a/2"), ("To", "x")])
    url = PUBLIC + "/webhook/whatsapp?tenant=7"
    response = await client.post("/webhook/whatsapp?tenant=7", data=form, headers=sign(url, form))
    assert response.status == 200
    one_dropped = MultiDict([("MediaUrl", "https://a/1"), ("To", "x")])
    response = await client.post(
        "/webhook/whatsapp?tenant=7", data=one_dropped, headers=sign(url, form)
    )
    assert response.status == 403


async def test_garbage_body_is_false_not_an_exception(gateway):
    client = await gateway()
    headers = {"X-Twilio-Signature": "abc", "Content-Type": "multipart/form-data; boundary=zz"}
    response = await client.post("/webhook/whatsapp", data=b"--zz\r\nbroken", headers=headers)
    assert response.status == 403


async def test_ws_upgrade_signed_over_wss_url(gateway):
    client = await gateway()
    async with client.ws_connect(
        "/media-stream", headers=sign("wss://gw.example.com/media-stream", {})
    ) as ws:
        assert (await ws.receive_str()) == "ok"


@pytest.mark.parametrize(
    "signed_url",
    ["https://gw.example.com/media-stream", "wss://other.example.com/media-stream", None],
)
async def test_ws_upgrade_with_bad_signature_gets_403(gateway, signed_url):
    client = await gateway()
    headers = sign(signed_url, {}) if signed_url else {}
    with pytest.raises(aiohttp.WSServerHandshakeError) as excinfo:
        await client.ws_connect("/media-stream", headers=headers)
    assert excinfo.value.status == 403


async def test_ws_upgrade_for_http_public_url_uses_ws_scheme(gateway):
    client = await gateway("http://localhost:8080")
    headers = {
        "x-twilio-signature": sign("ws://localhost:8080/media-stream", {})["X-Twilio-Signature"]
    }
    async with client.ws_connect("/media-stream", headers=headers) as ws:
        assert (await ws.receive_str()) == "ok"


def test_stream_url():
    assert TwilioSignatures(TOKEN, "https://gw.example.com/").stream_url() == (
        "wss://gw.example.com/media-stream"
    )
    assert (
        TwilioSignatures(TOKEN, "http://localhost:8080").stream_url("/s") == "ws://localhost:8080/s"
    )
    with pytest.raises(ValueError):
        TwilioSignatures(TOKEN, "gw.example.com")


SIM = "http://127.0.0.1:8766"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        (f"https://api.twilio.com{MEDIA_PATH}", True),
        (f"https://api.twilio.com:443{MEDIA_PATH}", True),
        (f"https://API.twilio.com{MEDIA_PATH}", True),
        (f"{SIM}{MEDIA_PATH}", True),
        (
            f"https://api.twilio.com{MEDIA_PATH.replace(MM, 'SM' + 'c' * 32)}",
            True,
        ),
        (f"http://api.twilio.com{MEDIA_PATH}", False),  # credentials in clear text
        (f"https://evil.example.com{MEDIA_PATH}", False),
        (f"https://api.twilio.com.evil.com{MEDIA_PATH}", False),
        (f"https://api.twilio.com@evil.com{MEDIA_PATH}", False),
        (f"https://user:pw@api.twilio.com{MEDIA_PATH}", False),
        (f"https://mms.twiliocdn.com{MEDIA_PATH}", False),
        (f"http://127.0.0.1:9999{MEDIA_PATH}", False),  # another local port
        (
            f"https://api.twilio.com{MEDIA_PATH.replace(SID, 'AC' + '9' * 32)}",
            False,
        ),  # other account
        (f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json", False),
        (f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Calls/{'CA' + 'a' * 32}", False),
        (f"https://api.twilio.com{MEDIA_PATH}/../../../Calls.json", False),
        (f"https://api.twilio.com{MEDIA_PATH}?x=1", False),
        (f"https://api.twilio.com{MEDIA_PATH}.json", False),
        (f"https://api.twilio.com{MEDIA_PATH[:-1]}", False),
        ("https://api.twilio.com:notaport/x", False),
        ("not a url", False),
    ],
)
def test_media_auth_allowed(url, allowed):
    assert media_auth_allowed(url, SIM, SID) is allowed


def test_media_auth_in_production_only_api_twilio_com():
    url = f"{SIM}{MEDIA_PATH}"
    assert not media_auth_allowed(url, "https://api.twilio.com", SID)


async def test_rewrite_only_twilio_hosts_and_only_when_targeted():
    local = LocalTwilioHttpClient("http://127.0.0.1:8099/")
    production = LocalTwilioHttpClient(None)
    try:
        url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?x=1"
        assert (
            local.rewrite(url) == "http://127.0.0.1:8099/2010-04-01/Accounts/AC1/Messages.json?x=1"
        )
        assert local.rewrite("https://api.sydney.au1.twilio.com/v1/x").startswith(
            "http://127.0.0.1:8099/"
        )
        assert local.rewrite("https://eviltwilio.com/x") == "https://eviltwilio.com/x"
        assert production.rewrite(url) == url
    finally:
        await local.close()
        await production.close()


async def test_make_rest_client_targets_production_by_default():
    client = make_rest_client(SID, TOKEN, "https://api.twilio.com")
    try:
        url = "https://api.twilio.com/2010-04-01/Accounts/x.json"
        assert client.http_client.rewrite(url) == url
    finally:
        await close_rest_client(client)


async def test_rest_client_enforces_timeout():
    """The SDK passes timeout=None; our client must still give up."""

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = make_rest_client(SID, TOKEN, f"http://127.0.0.1:{port}", timeout=0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.messages.create_async(to="whatsapp:+1", from_="whatsapp:+2", body="hi")
        assert loop.time() - started < 2
    finally:
        release.set()
        await close_rest_client(client)
        await runner.cleanup()
