"""Persistence: the only package that holds SQL."""

from gateway.store.connection import Erased
from gateway.store.lifecycle import ConversationRef
from gateway.store.store import InboundMessage, Person, Store, Turn, utcnow

__all__ = [
    "ConversationRef",
    "Erased",
    "InboundMessage",
    "Person",
    "Store",
    "Turn",
    "utcnow",
]
