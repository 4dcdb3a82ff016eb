"""Persistence: the only package that holds SQL."""

from gateway.store.store import InboundMessage, Person, Store, Turn, normalize_number, utcnow

__all__ = ["InboundMessage", "Person", "Store", "Turn", "normalize_number", "utcnow"]
