"""Phone numbers: the one rule for who a number is, and how much of it anyone may see.

A person is their E.164 number, whichever channel they come from (Twilio writes WhatsApp
senders as 'whatsapp:+55…'). Logs, the dashboard and the model's prompt see only a mask.
"""

from __future__ import annotations


def normalize_number(raw: str) -> str:
    """'whatsapp:+55 16 99999-0001' and '+5516999990001' are the same person."""
    number = raw.strip().removeprefix("whatsapp:").strip()
    digits = "".join(ch for ch in number if ch.isdigit())
    if not digits or len(digits) > 15:
        raise ValueError(f"not an E.164 number: {raw!r}")
    return "+" + digits


def mask_number(e164: str) -> str:
    """Enough of a phone number to tell people apart in logs, not enough to call them."""
    digits = e164.removeprefix("whatsapp:")
    return f"{digits[:3]}…{digits[-4:]}" if len(digits) > 7 else "…"


def phone_hint(e164: str) -> str:
    """The number as the prompt names it: masked like the logs, because the model must
    not read a full number aloud or leak it into a reply."""
    return mask_number(e164)
