"""GET /health: is this gateway able to serve, and against what."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.runtime import RUNTIME, Runtime


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    store_ok = rt.store is not None and await rt.store.ping()
    return web.json_response(health_report(rt, store_ok), status=200 if store_ok else 503)


def health_report(rt: Runtime, store_ok: bool) -> dict[str, Any]:
    """What /health answers; the dashboard shows the same."""
    return {
        "status": "ok" if store_ok else "degraded",
        "version": __version__,
        "uptime_s": round(rt.uptime_s, 3),
        "instance": {"id": rt.settings.instance_id, "stream_url": rt.signatures.stream_url()},
        "store": {"reachable": store_ok},
        "realtime": {
            "backend": rt.realtime_backend,
            "model": rt.settings.realtime_model,
            "voice": rt.voice,
        },
        # Which OpenAI API answers calls and WhatsApp (VOICE_BACKEND), and its model.
        "model": {
            "backend": rt.settings.voice_backend,
            "name": rt.settings.live_model
            if rt.settings.voice_backend == "live"
            else rt.settings.realtime_model,
        },
        "twilio": {
            "configured": not rt.settings.sandbox_twilio,
            "backend": rt.twilio_backend,
        },
        "voice": _voice(rt),
        "sandbox": any(
            sim is not None for sim in (rt.realtime_sim, rt.twilio_sim, rt.elevenlabs_sim)
        ),
    }


def _voice(rt: Runtime) -> dict[str, Any]:
    """Who speaks the replies: the Realtime voice, or Endrigo's ElevenLabs voice."""
    s = rt.settings
    if s.voice_provider != "elevenlabs":
        return {"provider": "openai", "backend": rt.realtime_backend}
    backend = "simulator" if rt.elevenlabs_sim is not None else "elevenlabs"
    return {"provider": "elevenlabs", "backend": backend, "model": s.elevenlabs_model}
