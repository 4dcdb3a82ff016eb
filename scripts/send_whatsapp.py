"""Send one simulated WhatsApp message to a running gateway, signed as Twilio would sign it.

    python scripts/send_whatsapp.py "Olá, tudo bem?"            # the sandbox of `make run`
    make whatsapp TEXT="Olá, tudo bem?"
    python scripts/send_whatsapp.py --media-url URL --content-type audio/ogg

A thin front over simulators.whatsapp_sender. Defaults fit `make run` in sandbox mode:
gateway http://127.0.0.1:8080 and the sandbox Twilio credentials, unless TWILIO_AUTH_TOKEN
(and TWILIO_ACCOUNT_SID, PUBLIC_BASE_URL) are set in the environment or a .env file.
The reply goes out through the gateway's Twilio (the in-process simulator in the sandbox);
the gateway's log shows it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from dotenv import load_dotenv

from gateway.runtime import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN
from simulators.whatsapp_sender import WebhookResult, WhatsAppSender


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Send one simulated WhatsApp message.")
    parser.add_argument("text", nargs="?", default="", help="the message body")
    parser.add_argument("--gateway", default="http://127.0.0.1:8080", help="where to post")
    parser.add_argument(
        "--public-base-url",
        default=os.environ.get("PUBLIC_BASE_URL"),
        help="the origin the gateway validates signatures against (default: --gateway)",
    )
    parser.add_argument("--from", dest="from_number", default="+5516999990001")
    parser.add_argument("--to", dest="to_number", default="+14155238886")
    parser.add_argument("--name", default="Cliente Teste", help="WhatsApp ProfileName")
    parser.add_argument("--media-url", help="MediaUrl0, e.g. from the Twilio simulator")
    parser.add_argument("--content-type", default="audio/ogg", help="MediaContentType0")
    parser.add_argument("--forge", action="store_true", help="sign with a wrong token")
    args = parser.parse_args(argv)
    if not args.text.strip() and not args.media_url:
        parser.error('give a text ("Olá") and/or --media-url')
    return args


async def send(args: argparse.Namespace) -> WebhookResult:
    # Real credentials when configured; otherwise the sandbox's fixed, non-secret ones.
    token = os.environ.get("TWILIO_AUTH_TOKEN") or SANDBOX_AUTH_TOKEN
    account = os.environ.get("TWILIO_ACCOUNT_SID") or SANDBOX_ACCOUNT_SID
    async with WhatsAppSender(
        args.gateway,
        args.public_base_url or args.gateway,
        token,
        account,
        from_number=args.from_number,
        to_number=args.to_number,
        profile_name=args.name,
    ) as sender:
        if args.media_url:
            return await sender.send_media(
                args.media_url, args.content_type, args.text, forge=args.forge
            )
        return await sender.send_text(args.text, forge=args.forge)


def main(argv: list[str] | None = None) -> None:
    load_dotenv()  # the same .env the gateway reads, so both agree on token and public URL
    args = parse_args(argv)
    try:
        result = asyncio.run(send(args))
    except OSError as err:
        sys.exit(f"cannot reach the gateway at {args.gateway}: {err} (is `make run` running?)")
    print(f"{result.message_sid}: HTTP {result.status} in {result.elapsed_s * 1000:.1f} ms")
    if result.status == 200:
        print("accepted; the reply (text, then a voice note) is on its way: see the gateway log")
    else:
        print(result.body)
    sys.exit(0 if result.status < 400 else 1)


if __name__ == "__main__":
    main()
