"""GET /static/audio/{id}.ogg: the voice notes we send, served from the store.

Twilio fetches a voice note from its public URL once, when it sends the message. The file
lives in the store's `media` table, not on local disk, so any gateway instance can serve it;
ids are `secrets.token_urlsafe` (unguessable), files expire after `MEDIA_TTL_S` and a periodic
sweep deletes them. Unknown and expired ids are both a plain 404.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import background
from gateway.runtime import RUNTIME
from gateway.store import Store

log = logging.getLogger(__name__)

OGG_PATH = "/static/audio/{media_id}.ogg"
ID_BYTES = 24  # 32 url-safe characters
MAX_SWEEP_INTERVAL_S = 300.0


def new_media_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def voice_note_url(public_base_url: str, media_id: str) -> str:
    return public_base_url + OGG_PATH.format(media_id=media_id)


async def publish_voice_note(
    store: Store, data: bytes, *, person_id: int | None, ttl_s: float
) -> str:
    """Store an OGG/Opus voice note; returns its id for `voice_note_url`."""
    media_id = new_media_id()
    await store.put_media(media_id, data, "audio/ogg", person_id=person_id, ttl_s=ttl_s)
    return media_id


async def serve_voice_note(request: web.Request) -> web.Response:
    store = request.app[RUNTIME].store
    found = await store.get_media(request.match_info["media_id"])
    if found is None:
        raise web.HTTPNotFound()
    data, content_type = found
    return web.Response(
        body=data,
        headers={
            # WhatsApp requires exactly audio/ogg (with Opus inside) for a playable voice note.
            "Content-Type": content_type,
            "Cache-Control": "private, max-age=300",
            "X-Content-Type-Options": "nosniff",
        },
    )


def setup(app: web.Application) -> None:
    # The id pattern keeps odd paths away from the store: they 404 in the router.
    app.router.add_get("/static/audio/{media_id:[A-Za-z0-9_-]{16,128}}.ogg", serve_voice_note)
    app.cleanup_ctx.append(_sweeper)


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    interval = min(MAX_SWEEP_INTERVAL_S, rt.settings.media_ttl_s / 2)
    async with background.running("media-sweeper", _sweep_forever(rt.store, interval)):
        yield


async def _sweep_forever(store: Store, interval_s: float) -> None:
    while True:
        try:
            deleted = await store.delete_expired_media()
        except Exception:
            log.exception("media sweep failed; will try again")
        else:
            if deleted:
                log.info("media sweep: %d expired voice note(s) deleted", deleted)
        await asyncio.sleep(interval_s)
