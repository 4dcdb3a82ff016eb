"""Several instances on one store (issue 14): each instance's stream address, a stream that
lands on the wrong instance, claims of a dead instance, work done once, and the two schemas.
The kill test with two processes is tests/test_scale_out.py."""

from __future__ import annotations

import asyncio

import pytest

from gateway.calls import REGISTRY
from gateway.store import Store
from gateway.store.migrations import available
from simulators.caller import SimulatedCaller
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, free_port
from tests.store_helpers import accept_inbound, connect, inbound_record, table_names

pytestmark = pytest.mark.both_stores
CALLER = "+5516999990001"


async def greeted(caller: SimulatedCaller) -> None:
    await caller.wait_until(lambda: caller.first_reply_at is not None, 10)


async def test_the_twiml_names_this_instances_stream_address_and_checks_it(start_gateway, live_env):
    gateway = await start_gateway(
        {**live_env, "INSTANCE_ID": "gw-a", "PUBLIC_STREAM_BASE_URL": "https://a.gw.example"}
    )
    caller = SimulatedCaller(gateway.url, gateway.url, AUTH_TOKEN, ACCOUNT_SID, CALLER)
    async with caller:
        dialled = await caller.dial()
        assert dialled.stream_url == "wss://a.gw.example/media-stream"
        await caller.connect()  # signed over that URL, as Twilio does
        await greeted(caller)
    health = await (await caller._http().get(f"{gateway.url}/health")).json()
    assert health["instance"] == {"id": "gw-a", "stream_url": "wss://a.gw.example/media-stream"}


async def test_a_stream_that_lands_on_another_instance_gets_a_fresh_session(
    start_gateway, live_env, realtime_sim
):
    public = f"http://127.0.0.1:{free_port()}"  # one address for both, as behind a balancer
    env = {**live_env, "PUBLIC_BASE_URL": public, "CALL_CLAIM_TIMEOUT_S": "1"}
    a = await start_gateway({**env, "INSTANCE_ID": "a"})
    b = await start_gateway({**env, "INSTANCE_ID": "b"})
    caller = SimulatedCaller(a.url, public, AUTH_TOKEN, ACCOUNT_SID, CALLER)
    async with caller:
        assert (await caller.dial()).status == 200  # A parks a session for this call
        caller.gateway_url = b.url  # the stream reaches B
        await caller.connect()
        await greeted(caller)  # B opened its own session and greeted: not a failed call
        assert not caller.closed.is_set()
        assert list(b.app[REGISTRY].live) == [caller.call_sid]
        await asyncio.sleep(1.5)  # A's parked session waits out CALL_CLAIM_TIMEOUT_S
        assert len(realtime_sim.sessions) == 2
        assert realtime_sim.sessions[0].closed and not realtime_sim.sessions[1].closed


async def test_a_dead_instances_claim_is_taken_over_and_its_late_outcome_ignored(
    database_url,
):
    a, b = await Store.open(database_url), await Store.open(database_url)
    try:
        a.instance_id, b.instance_id = "a", "b"
        a.instance_timeout_s = b.instance_timeout_s = 0.3
        await a.heartbeat("t0")
        await b.heartbeat("t0")
        ana = await a.person_for(CALLER)
        await accept_inbound(a, "SM1", ana.id, {"Body": "primeira"})
        await accept_inbound(a, "SM2", ana.id, {"Body": "segunda"})
        assert (await a.claim_inbound()).message_sid == "SM1"
        assert await b.claim_inbound() is None  # A is alive; SM2 waits behind SM1
        await asyncio.sleep(0.4)
        await b.heartbeat("t0")  # A stopped beating: presumed dead
        taken = await b.claim_inbound()
        assert taken.message_sid == "SM1" and taken.attempts == 2
        await a.finish_inbound("SM1", error="late")  # A wakes up: not its claim any more
        assert (await inbound_record(b, "SM1")).status == "processing"
        await b.finish_inbound("SM1")
        assert (await b.claim_inbound()).message_sid == "SM2"  # and the order held
    finally:
        await a.close()
        await b.close()


async def test_each_conversation_is_summarised_by_one_instance(database_url):
    stores = [await Store.open(database_url) for _ in range(3)]
    try:
        person = await stores[0].person_for(CALLER)
        other = await stores[0].person_for("+5516999990002")
        ids = []
        for who in (person, other) * 5:
            conversation = await stores[0].start_conversation(who.id, "call")
            await stores[0].end_conversation(conversation)
            ids.append(conversation)
        claims = await asyncio.gather(*(s.conversations_to_summarize() for s in stores))
        claimed = [c.id for batch in claims for c in batch]
        assert sorted(claimed) == sorted(ids)  # each claimed, by one instance only
        assert not any(await asyncio.gather(*(s.conversations_to_summarize() for s in stores)))
        await stores[1].release_summaries(claimed)  # a stop gives them back at once
        again = await stores[2].conversations_to_summarize()
        assert sorted(c.id for c in again) == sorted(ids)
    finally:
        for store in stores:
            await store.close()


def test_from_0009_each_migration_exists_in_both_dialects():
    sqlite = {v for v, _, _ in available() if v >= 9}
    postgres = {v for v, _, _ in available("postgresql")}
    assert sqlite == postgres


async def test_both_schemas_have_the_same_tables_and_columns(database_url, tmp_path):
    other = f"sqlite:///{tmp_path}/other.db"
    for url in (database_url, other):
        await (await Store.open(url)).close()
    with connect(database_url) as db, connect(other) as lite:
        assert _columns(db) == _columns(lite)


def _columns(db) -> dict[str, list[str]]:
    tables = [t for t in table_names(db) if t != "sqlite_sequence"]
    found = {}
    for table in tables:
        rows = db.execute(f"SELECT * FROM {table} LIMIT 0")
        found[table] = sorted(d[0] for d in rows.description)
    return found
