import asyncio
import sqlite3

import aiosqlite
import pytest

from gateway.store import Store
from gateway.store.connection import Connection
from gateway.store.migrations import available, migrate
from tests.store_helpers import accept_inbound, inbound_status

pytestmark = pytest.mark.both_stores


@pytest.fixture
async def store(database_url):
    s = await Store.open(database_url)
    yield s
    await s.close()


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


async def test_inbound_queue_is_unique_by_message_sid_and_survives_a_crash(database_url):
    url = database_url
    store = await Store.open(url)
    p = await store.person_for("+5516999990001")
    assert await accept_inbound(store, "SM1", p.id, {"Body": "Olá"})
    assert not await accept_inbound(store, "SM1", p.id, {"Body": "Olá"})
    claimed = await store.claim_inbound()
    assert claimed.message_sid == "SM1" and claimed.attempts == 1
    assert await store.claim_inbound() is None  # in flight, not claimable twice
    await store.close()  # the process dies here, mid-processing

    store = await Store.open(url)
    assert await store.release_stale_processing() == 1
    again = await store.claim_inbound()
    assert again.message_sid == "SM1" and again.payload == {"Body": "Olá"}
    await store.finish_inbound("SM1")
    assert await inbound_status(store, "SM1") == "done"
    assert await store.claim_inbound() is None
    await store.close()


async def test_a_retry_waits_until_it_is_due(store):
    p = await store.person_for("+5516999990001")
    await accept_inbound(store, "SM2", p.id, {})
    await store.claim_inbound()
    await store.finish_inbound("SM2", error="twilio 500", retry_in_s=60)
    assert await inbound_status(store, "SM2") == "pending"
    assert await store.claim_inbound() is None


async def test_ping_fails_on_a_closed_store(database_url):
    s = await Store.open(database_url)
    assert await s.ping()
    await s.close()
    assert not await s.ping()


class Boom(Exception):
    pass


async def test_a_transaction_takes_in_no_other_tasks_statement_and_rolls_back_only_its_own(
    store,
):
    p = await store.person_for("+5516999990001")
    conv = await store.start_conversation(p.id, "call")
    inside = asyncio.Event()

    async def failing_transaction() -> None:
        async with store.transaction():
            await store.add_turn(conv, "user", "rolled back")  # joins the transaction
            inside.set()
            await asyncio.sleep(0.05)  # other tasks ask for statements meanwhile
            raise Boom

    async def neighbour() -> None:
        await inside.wait()
        await store.add_turn(conv, "user", "kept")  # waits for the transaction, then runs

    results = await asyncio.gather(failing_transaction(), neighbour(), return_exceptions=True)
    assert isinstance(results[0], Boom) and results[1] is None
    assert [t.text for t in await store.recent_turns(p.id)] == ["kept"]


async def test_transactions_at_once_each_commit_in_turn(store):
    people = [await store.person_for(f"+55169999900{n:02d}") for n in range(8)]
    counts = await asyncio.gather(*(store.erase_person(p.id) for p in people))
    assert all(c["people"] == 1 for c in counts)
    assert await store.person_by_number("+5516999990001") is None


async def test_a_migration_that_breaks_a_reference_is_rolled_back_whole(tmp_path):
    raw = await aiosqlite.connect(tmp_path / "g.db", isolation_level=None)
    db = Connection(raw)
    shipped = available()
    assert await migrate(db, shipped[:1]) == 1
    broken = (2, "0002_broken.sql", "CREATE TABLE extra (x INTEGER);\n"
              "INSERT INTO conversations (person_id, channel, started_at, last_activity_at) "
              "VALUES (42, 'call', 'now', 'now');")  # fmt: skip
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        await migrate(db, [*shipped[:1], broken])
    assert await migrate(db, shipped[:1]) == 1  # still at version 1
    async with db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'") as cur:
        assert await cur.fetchall() == []
    async with db.execute("SELECT COUNT(*) FROM conversations") as cur:
        assert (await cur.fetchone())[0] == 0
    await db.close()


async def test_the_greeting_latency_moves_to_its_own_column_and_whatsapp_turns_stay(tmp_path):
    raw = await aiosqlite.connect(tmp_path / "g.db", isolation_level=None)
    db = Connection(raw)
    await migrate(db, [m for m in available() if m[0] <= 4])  # the schema before issue 11
    await db.executescript(
        "INSERT INTO people (id, e164, first_seen, last_seen) VALUES (7, '+5516999990001', "
        "'t', 't');"
        "INSERT INTO conversations (id, person_id, channel, started_at, last_activity_at) "
        "VALUES (3, 7, 'call', 't', 't'), (4, 7, 'whatsapp', 't', 't');"
        "INSERT INTO turns (conversation_id, role, text, at, response_latency_ms) VALUES "
        "(3, 'assistant', 'Oi!', 't', 250.0), (3, 'user', 'oi', 't', NULL), "
        "(3, 'assistant', 'Claro.', 't', 900.0);"
        "INSERT INTO inbound_messages (message_sid, person_id, payload, next_try_at, "
        "received_at, updated_at) VALUES ('SM1', 7, '{}', 't', 't', 't');"
        "INSERT INTO whatsapp_replies (message_sid, person_id, conversation_id, kind, "
        "user_text, text, created_at) VALUES ('SM1', 7, 4, 'model', 'Olá', 'Oi!', 't');"
    )
    await migrate(db)
    async with db.execute("SELECT greeting_latency_ms FROM conversations WHERE id = 3") as cur:
        assert (await cur.fetchone())[0] == 250.0
    async with db.execute(
        "SELECT conversation_id, text, response_latency_ms FROM turns ORDER BY id"
    ) as cur:
        rows = [tuple(r) for r in await cur.fetchall()]
    # The call's greeting turn keeps its text, not the latency; the trigger's turns are kept.
    assert rows == [
        (3, "Oi!", None), (3, "oi", None), (3, "Claro.", 900.0), (4, "Olá", None), (4, "Oi!", None)
    ]  # fmt: skip
    await db.close()


async def test_an_erased_id_is_never_handed_out_again_and_migration_keeps_the_ids(tmp_path):
    raw = await aiosqlite.connect(tmp_path / "g.db", isolation_level=None)
    db = Connection(raw)
    await migrate(db, [m for m in available() if m[0] <= 5])  # before ids were kept
    await db.executescript(
        "INSERT INTO people (id, e164, first_seen, last_seen) VALUES "
        "(3, '+5516999990003', 't', 't'), (9, '+5516999990009', 't', 't');"
        "INSERT INTO conversations (id, person_id, channel, started_at, last_activity_at) "
        "VALUES (5, 9, 'call', 't', 't');"
        "INSERT INTO turns (id, conversation_id, role, text, at) VALUES (11, 5, 'user', 'oi', 't');"
    )
    await db.close()
    store = await Store.open(f"sqlite:///{tmp_path}/g.db")
    try:
        assert (await store.person_by_number("+5516999990009")).id == 9  # ids kept
        assert [t.id for t in await store.recent_turns(9)] == [11]
        await store.erase_person(9)  # the newest person, conversation and turn
        newcomer = await store.person_for("+5516999990010")
        conversation = await store.start_conversation(newcomer.id, "whatsapp")
        turn = await store.add_turn(conversation, "user", "olá")
        assert (newcomer.id, conversation, turn) == (10, 6, 12)  # none of 9, 5, 11 again
    finally:
        await store.close()


async def test_the_public_read_helper_only_reads(store):
    await store.person_for("+5516999990001")
    assert [r["e164"] for r in await store.rows("SELECT e164 FROM people")] == ["+5516999990001"]
    with pytest.raises(ValueError):
        await store.rows("DELETE FROM people")
    assert len(await store.rows("SELECT id FROM people")) == 1


async def test_a_write_beside_a_read_never_finds_the_database_locked(database_url):
    """The webhook intake writes on a connection of its own; the worker's store reads and
    writes on another. A read left open across an await pinned its snapshot, and the next
    write on that connection failed "database is locked" (found by bench_whatsapp)."""
    main, intake = await Store.open(database_url), await Store.open(database_url)
    try:
        ana = await main.person_for("+5516999990001")
        async with main._db.execute("SELECT id FROM people") as cur:
            await intake.person_for("+5516999990002")  # commits meanwhile
            await main.set_summary(ana.id, "Corretor em Ribeirão Preto")
            assert [row[0] for row in await cur.fetchall()] == [ana.id]
        assert (await main.person_by_id(ana.id)).summary == "Corretor em Ribeirão Preto"
    finally:
        await main.close()
        await intake.close()
