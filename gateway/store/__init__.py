"""Persistence: the only package that holds SQL."""

from gateway.store.connection import Erased
from gateway.store.leads import INTERESTS, Lead, LeadRow
from gateway.store.lifecycle import ConversationRef
from gateway.store.store import InboundMessage, Person, Store, Turn, utcnow

__all__ = [
    "INTERESTS",
    "ConversationRef",
    "Erased",
    "InboundMessage",
    "Lead",
    "LeadRow",
    "Person",
    "Store",
    "Turn",
    "utcnow",
]
