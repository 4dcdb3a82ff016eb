"""Header bytes that are not UTF-8 on the admin routes: a 4xx, never a 500."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest


async def raw_get(url: str, path: str, header: bytes) -> int:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
                 b"Connection: close\r\n\r\n")  # fmt: skip
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "header",
    [
        b"Authorization: Bearer \xff\xfe\xc3",
        b"Cookie: almada_admin=\xff\xfe",
        b"Authorization: \xe9",
    ],
)
@pytest.mark.parametrize("path", ["/", "/dashboard/data.json", "/admin/privacy-requests"])
async def test_non_utf8_credentials_get_a_4xx(header, path, start_gateway, live_env):
    gateway = await start_gateway({**live_env, "ADMIN_TOKEN": "s3cret-admin-token"})
    status = await raw_get(gateway.url, path, header)
    assert 400 <= status < 500


async def raw_request(url: str, request: bytes) -> int:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


def post(path: str, headers: list[bytes], body: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: x", b"Connection: close",
            b"Content-Length: " + str(len(body)).encode(), *headers]  # fmt: skip
    return b"\r\n".join(head) + b"\r\n\r\n" + body


FORM = b"Content-Type: application/x-www-form-urlencoded"
BAD_REQUESTS = {
    "signature not utf-8": ([FORM, b"X-Twilio-Signature: \xff\xfe=="], b"MessageSid=SM1"),
    "content type not utf-8": (
        [b"Content-Type: text/\xff; charset=\xfe", b"X-Twilio-Signature: a"],
        b"MessageSid=SM1",
    ),
    "charset unknown": (
        [
            b"Content-Type: application/x-www-form-urlencoded; charset=klingon",
            b"X-Twilio-Signature: a",
        ],
        b"Body=%FF",
    ),
    "form value not utf-8": ([FORM, b"X-Twilio-Signature: a"], b"Body=%FF%FE&From=%C3"),
    "raw body not utf-8": ([FORM, b"X-Twilio-Signature: a"], b"\xff\xfe\x00=\x80"),
    "multipart broken": (
        [b"Content-Type: multipart/form-data; boundary=\xff", b"X-Twilio-Signature: a"],
        b"--\xff\r\n\r\n",
    ),
    "host not utf-8": ([FORM, b"X-Twilio-Signature: a", b"X-Forwarded-Host: \xff"], b"a=b"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
@pytest.mark.parametrize(
    "path", ["/webhook/whatsapp", "/webhook/whatsapp/status", "/webhook/voice"]
)
async def test_bad_header_or_form_bytes_on_a_webhook_get_a_4xx(case, path, start_gateway, live_env):
    gateway = await start_gateway(live_env)
    headers, body = BAD_REQUESTS[case]
    status = await raw_request(gateway.url, post(path, headers, body))
    assert 400 <= status < 500, status


@pytest.mark.parametrize(
    "header", [b"X-Twilio-Signature: \xff\xfe", b"Sec-WebSocket-Key: \xff", b"Upgrade: \xff"]
)
async def test_bad_header_bytes_on_the_media_stream_get_a_4xx(header, start_gateway, live_env):
    gateway = await start_gateway(live_env)
    upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    request = b"GET /media-stream HTTP/1.1\r\nHost: x\r\n" + upgrade + header + b"\r\n\r\n"
    assert 400 <= await raw_request(gateway.url, request) < 500
