"""GET /health: is this gateway able to serve, and against what."""

from __future__ import annotations

from aiohttp import web

from gateway import __version__
from gateway.runtime import RUNTIME


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    store_ok = rt.store is not None and await rt.store.ping()
    body = {
        "status": "ok" if store_ok else "degraded",
        "version": __version__,
        "uptime_s": round(rt.uptime_s, 3),
        "store": {"reachable": store_ok},
        "realtime": {"backend": rt.realtime_backend, "model": rt.settings.realtime_model},
        "twilio": {
            "configured": not rt.settings.sandbox_twilio,
            "backend": rt.twilio_backend,
        },
        "sandbox": rt.realtime_sim is not None or rt.twilio_sim is not None,
    }
    return web.json_response(body, status=200 if store_ok else 503)
