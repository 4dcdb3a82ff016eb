"""Almada voice gateway: Endrigo Almada's digital clone on Twilio calls and WhatsApp."""

__version__ = "0.1.0"
