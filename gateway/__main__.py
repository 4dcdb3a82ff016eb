"""python -m gateway: settings -> app -> serve on uvloop."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web
from dotenv import load_dotenv

from gateway.app import create_app
from gateway.observability import setup_logging
from gateway.persona import PersonaError
from gateway.settings import Settings, SettingsError


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # Windows has no uvloop; asyncio still works
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    load_dotenv()  # a .env file may supply settings; the real environment wins
    try:
        settings = Settings.from_env()
        app = create_app(settings)
    except (SettingsError, PersonaError) as err:
        print(f"configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level)
    print(f"gateway listening on http://{settings.host}:{settings.port}", file=sys.stderr)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        loop=new_event_loop(),
        print=None,
        access_log=None,
        shutdown_timeout=2.0,  # calls and WhatsApp are already stopped, each bounded
    )


if __name__ == "__main__":
    main()
