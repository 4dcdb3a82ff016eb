"""LGPD: recognising a person's request to delete their data.

The persona tells the person how it will be done; this records the request for the
admin, whatever the channel. Recognition is deliberately simple and conservative:
a verb of erasing near a word for personal data, in Portuguese or English.
"""

from __future__ import annotations

import logging
import re
import unicodedata

from gateway.memory import MemoryHolders
from gateway.store import Person, Store

log = logging.getLogger(__name__)

_ERASE = r"(apag|exclu|delet|remov|elimin|esquec|erase|delete|remove|forget)\w*"
_DATA = r"(dados|informa\w*|historico|conversas?|numero|cadastro|data|information|history)"
_PATTERN = re.compile(
    rf"\b{_ERASE}\b(?:\W+\w+){{0,6}}?\W+{_DATA}\b|\b{_DATA}\b(?:\W+\w+){{0,4}}?\W+{_ERASE}\b"
)


def _plain(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in folded if not unicodedata.combining(ch))


def is_erasure_request(text: str) -> bool:
    """'Quero que vocês apaguem meus dados' -> True; 'apaguei a luz' -> False."""
    return bool(_PATTERN.search(_plain(text)))


async def note_erasure_request(store: Store, person: Person, channel: str, text: str) -> bool:
    """Record the request for the admin when `text` asks to erase the person's data."""
    if not text or not is_erasure_request(text):
        return False
    await store.record_privacy_request(person.id, person.e164, channel, "erase", text)
    log.warning("privacy: erasure request recorded for person %d on %s", person.id, channel)
    return True


async def erase_person(store: Store, holders: MemoryHolders, person: Person) -> dict[str, int]:
    """LGPD erasure: every holder lets go of the person first (sessions closed, calls
    detached, writes in flight finished), then their rows go in one transaction. Rows
    removed per table; all zero when someone else erased them first."""
    await holders.forget(person.id)
    return await store.erase_person(person.id)
