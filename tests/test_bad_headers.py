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
