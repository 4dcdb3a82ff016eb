"""A simulated WhatsApp user: posts Twilio's signed inbound-message webhook to the gateway.

The form fields, their order and the signature are exactly what Twilio sends for a WhatsApp
message, so the gateway's production webhook handler is exercised unchanged.

    python -m simulators.whatsapp_sender --gateway http://127.0.0.1:8080 --text "Olá"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from twilio.request_validator import RequestValidator

from gateway.runtime import SANDBOX_ACCOUNT_SID

API_VERSION = "2010-04-01"
WEBHOOK_PATH = "/webhook/whatsapp"


def new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


@dataclass
class WebhookResult:
    """How the gateway answered one webhook POST."""

    status: int
    body: str
    content_type: str
    elapsed_s: float
    message_sid: str
    form: dict[str, str]


def _message_type(content_type: str) -> str:
    major = content_type.split("/", 1)[0]
    return major if major in ("audio", "image", "video") else "document"


class WhatsAppSender:
    """One WhatsApp user talking to the gateway through (simulated) Twilio."""

    def __init__(
        self,
        gateway_url: str,
        public_base_url: str,
        auth_token: str,
        account_sid: str,
        from_number: str = "+5516999990001",
        to_number: str = "+14155238886",
        profile_name: str = "Cliente Teste",
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.public_url = public_base_url.rstrip("/") + WEBHOOK_PATH
        self._validator = RequestValidator(auth_token)
        self._forger = RequestValidator(auth_token + "-forged")
        self.account_sid = account_sid
        self.from_number = from_number
        self.to_number = to_number
        self.profile_name = profile_name
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> WhatsAppSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_text(
        self,
        body: str,
        message_sid: str | None = None,
        *,
        forge: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> WebhookResult:
        sid = message_sid or new_sid("SM")
        form = self._form(sid, body, num_media=0, message_type="text")
        return await self.post(form | dict(extra or {}), forge=forge)

    async def send_media(
        self,
        media_url: str,
        content_type: str,
        body: str = "",
        message_sid: str | None = None,
        *,
        forge: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> WebhookResult:
        sid = message_sid or new_sid("MM")
        form = self._form(sid, body, num_media=1, message_type=_message_type(content_type))
        form["MediaContentType0"] = content_type
        form["MediaUrl0"] = media_url
        return await self.post(form | dict(extra or {}), forge=forge)

    def _form(self, sid: str, body: str, num_media: int, message_type: str) -> dict[str, str]:
        # Field order as Twilio sends it (order does not affect the signature).
        return {
            "SmsMessageSid": sid,
            "NumMedia": str(num_media),
            "ProfileName": self.profile_name,
            "MessageType": message_type,
            "SmsSid": sid,
            "WaId": self.from_number.lstrip("+"),
            "SmsStatus": "received",
            "Body": body,
            "To": f"whatsapp:{self.to_number}",
            "NumSegments": "1",
            "ReferralNumMedia": "0",
            "MessageSid": sid,
            "AccountSid": self.account_sid,
            "From": f"whatsapp:{self.from_number}",
            "ApiVersion": API_VERSION,
        }

    def sign(self, form: Mapping[str, str], *, forge: bool = False) -> str:
        validator = self._forger if forge else self._validator
        return validator.compute_signature(self.public_url, dict(form))

    async def post(self, form: dict[str, str], *, forge: bool = False) -> WebhookResult:
        """POST an arbitrary (already built) webhook form, signed over the public URL."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {
            "X-Twilio-Signature": self.sign(form, forge=forge),
            "User-Agent": "TwilioProxy/1.1",
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=15)  # Twilio gives a webhook 15 s in total
        async with self._session.post(
            self.gateway_url + WEBHOOK_PATH, data=form, headers=headers, timeout=timeout
        ) as response:
            text = await response.text()
            return WebhookResult(
                status=response.status,
                body=text,
                content_type=response.headers.get("Content-Type", ""),
                elapsed_s=time.monotonic() - started,
                message_sid=form.get("MessageSid", ""),
                form=form,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Send one simulated WhatsApp message.")
    parser.add_argument("--gateway", default="http://127.0.0.1:8080")
    parser.add_argument("--public-base-url", default=os.environ.get("PUBLIC_BASE_URL"))
    parser.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"))
    parser.add_argument(
        "--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", SANDBOX_ACCOUNT_SID)
    )
    parser.add_argument("--from", dest="from_number", default="+5516999990001")
    parser.add_argument("--to", dest="to_number", default="+14155238886")
    parser.add_argument("--text", help="text body")
    parser.add_argument("--media-url", help="MediaUrl0 (e.g. from the Twilio simulator)")
    parser.add_argument("--content-type", default="audio/ogg")
    parser.add_argument("--forge", action="store_true", help="send a bad signature")
    args = parser.parse_args(argv)
    if not args.public_base_url or not args.auth_token:
        parser.error("PUBLIC_BASE_URL and TWILIO_AUTH_TOKEN are required (env or arguments)")
    if not args.text and not args.media_url:
        parser.error("give --text and/or --media-url")
    result = asyncio.run(_send(args))
    print(f"{result.message_sid}: HTTP {result.status} in {result.elapsed_s * 1000:.0f} ms")
    print(result.body)
    sys.exit(0 if result.status < 400 else 1)


async def _send(args: argparse.Namespace) -> WebhookResult:
    async with WhatsAppSender(
        args.gateway,
        args.public_base_url,
        args.auth_token,
        args.account_sid,
        from_number=args.from_number,
        to_number=args.to_number,
    ) as sender:
        if args.media_url:
            return await sender.send_media(
                args.media_url, args.content_type, args.text or "", forge=args.forge
            )
        return await sender.send_text(args.text, forge=args.forge)


if __name__ == "__main__":
    main()
