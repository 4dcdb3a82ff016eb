"""The operators' dashboard: GET / (the page) and GET /dashboard/data.json (what it polls).

Both sit behind ADMIN_TOKEN (gateway/auth.py); the page's `?token=` starts the cookie
session a browser keeps polling with.
"""

from __future__ import annotations

import secrets

import orjson
from aiohttp import web

from gateway.auth import PRIVATE_HEADERS, admin_only
from gateway.dashboard import page, snapshot

DATA_URL = "/dashboard/data.json"


def setup(app: web.Application) -> None:
    app.router.add_get("/", admin_only(dashboard_page, accept_query_token=True))
    app.router.add_get(DATA_URL, admin_only(dashboard_data))


async def dashboard_page(request: web.Request) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    body = page.render(await snapshot.build(request.app), nonce, DATA_URL)
    headers = {**PRIVATE_HEADERS, "Content-Security-Policy": page.content_security_policy(nonce)}
    return web.Response(text=body, content_type="text/html", headers=headers)


async def dashboard_data(request: web.Request) -> web.Response:
    data = await snapshot.build(request.app)
    return web.Response(
        body=orjson.dumps(data), content_type="application/json", headers=PRIVATE_HEADERS
    )
