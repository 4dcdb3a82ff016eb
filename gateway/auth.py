"""Who may use the admin surface (the dashboard and the admin actions): ADMIN_TOKEN.

A script or curl sends `Authorization: Bearer <token>`; a person opens `/?token=<token>`
once, which sets an HttpOnly, SameSite=Strict cookie holding a value derived from the token
(never the token itself), so the page can keep polling. Without ADMIN_TOKEN the routes
answer 404: the admin surface is off, not merely locked.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.runtime import RUNTIME

COOKIE = "almada_admin"
COOKIE_MAX_AGE_S = 12 * 3600
# Operator data must not sit in shared caches or leak through Referer or framing.
PRIVATE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_only(handler: Handler, *, accept_query_token: bool = False) -> Handler:
    """Wrap a handler so it runs only for the admin; `?token=` also starts a cookie session."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[RUNTIME].settings.admin_token
        if not token:
            return _refuse(404, "admin routes are disabled: set ADMIN_TOKEN to open the dashboard")
        query_token = request.query.get("token") if accept_query_token else None
        if query_token is not None:
            if not _same(query_token, token):
                return _refuse(403, "wrong admin token")
            response = await handler(request)
            _start_session(request, response, token)
            return response
        refusal = _check(request, token)
        return refusal if refusal is not None else await handler(request)

    return guarded


def _check(request: web.Request, token: str) -> web.Response | None:
    """None when the request carries the admin's bearer token or session cookie."""
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not _same(presented.strip(), token):
            return _refuse(403, "wrong admin token")
        return None
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and _same(cookie, _session_value(token)):
        return None
    # No credentials, or a cookie from before the token changed: say how to get in.
    response = _refuse(
        401,
        "admin token required: open /?token=<ADMIN_TOKEN> in a browser, "
        "or send 'Authorization: Bearer <ADMIN_TOKEN>'",
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="almada-admin"'
    return response


def _start_session(request: web.Request, response: web.StreamResponse, token: str) -> None:
    secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
    response.set_cookie(
        COOKIE,
        _session_value(token),
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=secure,
    )


def _session_value(token: str) -> str:
    """Derived from the token: a leaked cookie opens the dashboard but never reveals the token,
    and changing ADMIN_TOKEN ends every session."""
    return hmac.new(token.encode(), b"almada-dashboard-session-v1", hashlib.sha256).hexdigest()


def _same(presented: str, expected: str) -> bool:
    # Bytes, because compare_digest refuses non-ASCII str (a TypeError an attacker could send);
    # surrogateescape, because aiohttp decodes header bytes that are not UTF-8 that way.
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=PRIVATE_HEADERS)
