import sqlite3

import pytest

from gateway.store import Store, normalize_number
from gateway.store.migrations import available


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(f"sqlite:///{tmp_path}/g.db")
    yield s
    await s.close()


def test_whatsapp_and_phone_numbers_are_one_person():
    assert normalize_number("whatsapp:+5516999990001") == "+5516999990001"
    assert normalize_number(" +55 (16) 99999-0001 ") == "+5516999990001"
    with pytest.raises(ValueError):
        normalize_number("whatsapp:")


async def test_migrations_apply_once_and_record_their_version(tmp_path):
    url = f"sqlite:///{tmp_path}/g.db"
    first = await Store.open(url)
    await first.close()
    again = await Store.open(url)
    assert again.schema_version == max(v for v, _, _ in available())
    await again.close()
    rows = sqlite3.connect(tmp_path / "g.db").execute("SELECT version FROM schema_migrations")
    assert [r[0] for r in rows] == [v for v, _, _ in available()]


async def test_person_conversations_and_turns_across_channels(store):
    p = await store.person_for("whatsapp:+5516999990001", name="Ana")
    same = await store.person_for("+5516999990001")
    assert same.id == p.id and same.name == "Ana"
    wa = await store.start_conversation(p.id, "whatsapp")
    await store.add_turn(wa, "user", "Tenho uma imobiliária em Ribeirão Preto")
    call = await store.start_conversation(p.id, "call", external_id="CA1")
    await store.add_turn(call, "assistant", "Oi Ana!", audio_ms=900, response_latency_ms=420.0)
    turns = await store.recent_turns(p.id)
    assert [(t.channel, t.role) for t in turns] == [("whatsapp", "user"), ("call", "assistant")]
    assert turns[1].audio_ms == 900


async def test_inbound_queue_is_unique_by_message_sid_and_survives_a_crash(tmp_path):
    url = f"sqlite:///{tmp_path}/g.db"
    store = await Store.open(url)
    p = await store.person_for("+5516999990001")
    assert await store.accept_inbound("SM1", p.id, {"Body": "Olá"})
    assert not await store.accept_inbound("SM1", p.id, {"Body": "Olá"})
    claimed = await store.claim_inbound()
    assert claimed.message_sid == "SM1" and claimed.attempts == 1
    assert await store.claim_inbound() is None  # in flight, not claimable twice
    await store.close()  # the process dies here, mid-processing

    store = await Store.open(url)
    assert await store.release_stale_processing() == 1
    again = await store.claim_inbound()
    assert again.message_sid == "SM1" and again.payload == {"Body": "Olá"}
    await store.finish_inbound("SM1")
    assert await store.inbound_status("SM1") == "done"
    assert await store.claim_inbound() is None
    await store.close()


async def test_a_retry_waits_until_it_is_due(store):
    p = await store.person_for("+5516999990001")
    await store.accept_inbound("SM2", p.id, {})
    await store.claim_inbound()
    await store.finish_inbound("SM2", error="twilio 500", retry_in_s=60)
    assert await store.inbound_status("SM2") == "pending"
    assert await store.claim_inbound() is None


async def test_ping_fails_on_a_closed_store(tmp_path):
    s = await Store.open(f"sqlite:///{tmp_path}/g.db")
    assert await s.ping()
    await s.close()
    assert not await s.ping()
