"""The app factory: routes, and the resources opened and closed around serving."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import admin, background, calls, dashboard, whatsapp
from gateway.crm import CrmOutbox
from gateway.elevenlabs import ElevenLabsVoice
from gateway.health import health
from gateway.instances import Heartbeat
from gateway.observability import collector_tuned, loop_lag_watched, metrics
from gateway.persona import load_persona
from gateway.runtime import RUNTIME, SANDBOX_ELEVENLABS_KEY, SANDBOX_OPENAI_KEY, Runtime
from gateway.settings import Settings, SettingsError, redacted_url
from gateway.store import Store
from gateway.summaries import Summarizer
from gateway.usage import Prices, PriceTableError, load_prices

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=2 * 1024 * 1024)
    # A broken persona folder stops the start here, naming the file, not mid-call.
    app[RUNTIME] = Runtime(
        settings, persona=load_persona(settings.persona), prices=_prices(settings)
    )
    app[RUNTIME].holders.register(app[RUNTIME].limits)
    app.cleanup_ctx.extend(
        [_store_ctx, _instance_ctx, _sandbox_ctx, _clients_ctx, _summaries_ctx, _crm_ctx]
    )
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    calls.setup(app, settings.call_claim_timeout_s)
    whatsapp.setup(app)  # also serves the published voice notes (gateway.media)
    dashboard.setup(app)  # GET / behind ADMIN_TOKEN
    admin.setup(app)  # /admin/...: usage and LGPD export/erase, behind ADMIN_TOKEN
    app.cleanup_ctx.append(_process_ctx)  # after every setup() above has added its own
    app.on_shutdown.append(_stop_channels)
    return app


async def _stop_channels(app: web.Application) -> None:
    """SIGTERM: live calls and WhatsApp stop together, each bounded, so the gateway exits in
    seconds even when the upstream does not answer."""
    await asyncio.gather(app[calls.REGISTRY].close_all(), app[whatsapp.WHATSAPP].stop())


def _simulators_present(settings: Settings) -> None:
    """The test doubles are their own package, absent from a production image: without it,
    missing credentials are a configuration error, not a sandbox."""
    if importlib.util.find_spec("simulators") is None:
        missing = "OPENAI_API_KEY" if settings.sandbox_realtime else "TWILIO_ACCOUNT_SID"
        raise SettingsError(missing, "not set, and the simulators (the sandbox) are not installed")


def _prices(settings: Settings) -> dict[str, Prices]:
    try:
        return load_prices(settings.prices_file)
    except PriceTableError as err:
        raise SettingsError("PRICES_FILE", str(err)) from None


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.store = await Store.open(rt.settings.database_url)
    where = redacted_url(rt.settings.database_url)
    log.info("store open at %s (schema v%d)", where, rt.store.schema_version)
    yield
    await rt.store.close()


async def _instance_ctx(app: web.Application) -> AsyncIterator[None]:
    """This instance's name on its queue claims, and its heartbeat (gateway.instances)."""
    rt = app[RUNTIME]
    s = rt.settings
    rt.store.instance_id, rt.store.instance_timeout_s = s.instance_id, s.instance_timeout_s
    heartbeat = Heartbeat(rt.store, s.instance_timeout_s, lambda: app[whatsapp.WHATSAPP].wake())
    await heartbeat.beat()  # before the queue worker starts: it looks at who is alive
    log.info("instance %s, media streams at %s", s.instance_id, rt.signatures.stream_url())
    async with background.running("heartbeat", heartbeat.run()):
        yield
    try:
        await rt.store.instance_gone()
    except Exception as err:
        log.warning("instance row not removed (%s); others wait out its timeout", err)


async def _sandbox_ctx(app: web.Application) -> AsyncIterator[None]:
    """Without credentials, the simulators stand in for OpenAI and Twilio, in process."""
    rt = app[RUNTIME]
    settings = rt.settings
    if settings.sandbox_realtime or settings.sandbox_twilio or settings.sandbox_elevenlabs:
        _simulators_present(settings)
    if settings.sandbox_realtime:
        from simulators.live_config import LiveSimConfig
        from simulators.realtime import RealtimeSimConfig, RealtimeSimulator

        # One simulated OpenAI, both APIs on its base URL (GPT-Live too, VOICE_BACKEND=live).
        first_audio = settings.sim_first_audio_ms
        rt.realtime_sim = RealtimeSimulator(
            RealtimeSimConfig(first_audio_latency_ms=first_audio),
            LiveSimConfig(first_audio_latency_ms=first_audio),
        )
        await rt.realtime_sim.start(host="127.0.0.1", port=0)
    if settings.sandbox_twilio:
        from simulators.twilio import TwilioSimulator

        rt.twilio_sim = TwilioSimulator(rt.twilio_account_sid, rt.twilio_auth_token)
        await rt.twilio_sim.start(host="127.0.0.1", port=0)
    if settings.sandbox_elevenlabs:
        from simulators.elevenlabs import ElevenLabsSimConfig, ElevenLabsSimulator

        # Any key will do: the sandbox's voice speaks for whoever asks.
        rt.elevenlabs_sim = ElevenLabsSimulator(ElevenLabsSimConfig(api_key=None))
        await rt.elevenlabs_sim.start(host="127.0.0.1", port=0)
    if rt.realtime_sim or rt.twilio_sim or rt.elevenlabs_sim:
        _announce_sandbox(rt)
    yield
    for sim in (rt.elevenlabs_sim, rt.twilio_sim, rt.realtime_sim):
        if sim is not None:
            await sim.close()


async def _clients_ctx(app: web.Application) -> AsyncIterator[None]:
    # Imported here, at start, so the first call's session open does not pay ~70 ms for them.
    import openai.resources.realtime  # noqa: F401
    import websockets.asyncio.client  # noqa: F401
    from openai import AsyncOpenAI

    from gateway.bridge import check_sdk_socket
    from gateway.twilio_api import close_rest_client, make_rest_client

    check_sdk_socket()
    rt = app[RUNTIME]
    api_key = rt.settings.openai_api_key or SANDBOX_OPENAI_KEY
    rt.openai = AsyncOpenAI(api_key=api_key, base_url=rt.openai_base_url)
    rt.twilio = make_rest_client(
        rt.twilio_account_sid, rt.twilio_auth_token, rt.twilio_api_base_url
    )
    rt.elevenlabs = _elevenlabs_voice(rt)
    yield
    if rt.elevenlabs is not None:
        await rt.elevenlabs.close()
    await close_rest_client(rt.twilio)
    await rt.openai.close()


def _elevenlabs_voice(rt: Runtime) -> ElevenLabsVoice | None:
    """Endrigo's ElevenLabs voice when chosen: the real API, or the sandbox's simulator."""
    s = rt.settings
    if s.voice_provider != "elevenlabs":
        return None
    if rt.elevenlabs_sim is not None:
        return ElevenLabsVoice.from_settings(s, rt.elevenlabs_sim.base_url, SANDBOX_ELEVENLABS_KEY)
    assert s.elevenlabs_api_key is not None, "checked by Settings"
    return ElevenLabsVoice.from_settings(s, s.elevenlabs_base_url, s.elevenlabs_api_key)


async def _summaries_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    s = rt.settings
    rt.summarizer = Summarizer(
        rt.store,
        rt.openai,
        rt.persona,
        s.summary_model,
        whatsapp_idle_s=s.conversation_idle_s,
        interval_s=s.summary_interval_s,
        retry_base_s=s.summary_retry_s,
    )
    async with background.running("summarizer", rt.summarizer.run()):
        yield


async def _crm_ctx(app: web.Application) -> AsyncIterator[None]:
    """With CRM_WEBHOOK_URL, each lead save is queued and this worker sends it; without,
    nothing is queued (rows queued while a CRM was set wait for one to be set again)."""
    rt = app[RUNTIME]
    s = rt.settings
    if s.crm_webhook_url is None or s.crm_webhook_secret is None:
        yield
        return
    rt.store.leads_to_crm = True
    rt.crm = CrmOutbox(rt.store, s.crm_webhook_url, s.crm_webhook_secret, retry_s=s.crm_retry_s)
    try:
        async with background.running("crm-outbox", rt.crm.run()):
            yield
    finally:
        rt.crm = None


async def _process_ctx(app: web.Application) -> AsyncIterator[None]:
    with collector_tuned():  # last: everything opened above is frozen with the modules
        async with loop_lag_watched(lambda: app[calls.REGISTRY].live_count > 0):
            yield


def _announce_sandbox(rt: Runtime) -> None:
    s = rt.settings
    lines = ["SANDBOX MODE: no real calls, no real WhatsApp, no OpenAI bill."]
    if rt.realtime_sim:
        lines.append(f"  OpenAI Realtime -> in-process SIMULATOR at {rt.realtime_sim.base_url}")
        lines.append("  (set OPENAI_API_KEY to use the real API)")
    if rt.twilio_sim:
        lines.append(f"  Twilio          -> in-process SIMULATOR at {rt.twilio_sim.base_url}")
        lines.append("  (set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN to use real Twilio)")
    if rt.elevenlabs_sim:
        lines.append(f"  ElevenLabs      -> in-process SIMULATOR at {rt.elevenlabs_sim.base_url}")
        lines.append("  (set ELEVENLABS_API_KEY and ELEVENLABS_VOICE_ID for Endrigo's own voice)")
    lines += [
        "Try it from another terminal:",
        f"  make call      # a simulated phone call to http://127.0.0.1:{s.port}",
        f'  make whatsapp TEXT="Olá, tudo bem?"   # a simulated WhatsApp message to :{s.port}',
    ]
    width = max(len(line) for line in lines) + 4
    banner = "\n".join(["*" * width, *(f"* {line}" for line in lines), "*" * width])
    print(banner, file=sys.stderr, flush=True)
    log.warning("sandbox: realtime=%s twilio=%s", rt.realtime_backend, rt.twilio_backend)
