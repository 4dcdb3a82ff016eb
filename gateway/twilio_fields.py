"""Twilio's identifiers, checked by format before a webhook may cost anything.

Twilio's signature concatenates field names and values with no separator, so a captured
webhook can be re-split into differently named fields that still validate
(`MessageSid=SM…MessageTypetext`). A signature proves the bytes came from Twilio, not which
field holds what: every identifier we act on must also have Twilio's own shape, and the
account must be ours. Pure functions, no I/O: the handlers answer 400 on any problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")
CALL_SID = re.compile(r"CA[0-9a-f]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
WHATSAPP_ADDRESS = re.compile(r"whatsapp:\+[1-9][0-9]{6,14}")
# What Twilio puts in a voice call's From when the caller id is not a number.
WITHHELD_CALLERS = frozenset({"", "anonymous", "restricted", "unknown", "private", "unavailable"})


class BadFields(ValueError):
    """A webhook whose identifiers are not Twilio's; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def _value(form: Mapping[str, Any], name: str) -> str:
    return str(form.get(name, ""))


def _match(form: Mapping[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = _value(form, name)
    if not pattern.fullmatch(value):
        raise BadFields(name, "not in Twilio's format")
    return value


def _account(form: Mapping[str, Any], account_sid: str) -> None:
    value = _match(form, "AccountSid", ACCOUNT_SID)
    if value != account_sid:
        raise BadFields("AccountSid", "not this gateway's account")


def check_whatsapp_message(form: Mapping[str, Any], account_sid: str) -> str:
    """An inbound WhatsApp message; returns its MessageSid."""
    sid = _match(form, "MessageSid", MESSAGE_SID)
    _account(form, account_sid)
    _match(form, "From", WHATSAPP_ADDRESS)
    _match(form, "To", WHATSAPP_ADDRESS)
    return sid


def check_message_status(form: Mapping[str, Any], account_sid: str) -> str:
    """A status callback for a message we sent; returns its MessageSid."""
    sid = _match(form, "MessageSid", MESSAGE_SID)
    _account(form, account_sid)
    return sid


def check_voice_call(form: Mapping[str, Any], account_sid: str) -> str:
    """An incoming call; returns its CallSid. A withheld caller id is allowed (no memory)."""
    sid = _match(form, "CallSid", CALL_SID)
    _account(form, account_sid)
    caller = _value(form, "From")
    if caller.lower() not in WITHHELD_CALLERS and not E164.fullmatch(caller):
        raise BadFields("From", "neither a phone number nor a withheld caller id")
    _match(form, "To", E164)
    return sid
