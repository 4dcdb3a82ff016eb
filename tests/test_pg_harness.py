"""The throwaway PostgreSQL harness (tests/pg.py) and the two PostgreSQL features the store
will rest on: FOR UPDATE SKIP LOCKED claims and transaction-scoped advisory locks."""

import pytest

from tests.pg import find_bin_dir, pg_url  # noqa: F401  (pg_url is a fixture)

asyncpg = pytest.importorskip("asyncpg")


async def test_the_cluster_answers_on_loopback(pg_url):  # noqa: F811
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert pg_url.startswith("postgresql://")
    finally:
        await conn.close()


async def test_skip_locked_claims_give_two_connections_different_rows(pg_url):  # noqa: F811
    a, b = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        await a.execute("DROP TABLE IF EXISTS harness_queue")
        await a.execute(
            "CREATE TABLE harness_queue (id bigserial PRIMARY KEY, status text NOT NULL)"
        )
        await a.execute(
            "INSERT INTO harness_queue (status) SELECT 'queued' FROM generate_series(1, 3)"
        )
        claim = (
            "SELECT id FROM harness_queue WHERE status = 'queued'"
            " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        first, second = await a.fetchval(claim), await b.fetchval(claim)
        assert first is not None and second is not None
        assert first != second
        await a.execute("UPDATE harness_queue SET status = 'running' WHERE id = $1", first)
        await b.execute("UPDATE harness_queue SET status = 'running' WHERE id = $1", second)
        await ta.commit()
        await tb.commit()
        assert await a.fetchval("SELECT count(*) FROM harness_queue WHERE status = 'queued'") == 1
    finally:
        await a.close()
        await b.close()


async def test_an_advisory_xact_lock_held_by_one_connection_is_refused_to_another(
    pg_url,  # noqa: F811
):
    a, b = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        person_key = 14_000_001
        async with a.transaction():
            assert await a.fetchval("SELECT pg_try_advisory_xact_lock($1)", person_key)
            async with b.transaction():
                assert not await b.fetchval("SELECT pg_try_advisory_xact_lock($1)", person_key)
        # Released with a's transaction: b gets it now.
        async with b.transaction():
            assert await b.fetchval("SELECT pg_try_advisory_xact_lock($1)", person_key)
    finally:
        await a.close()
        await b.close()


def test_the_binaries_are_found_where_debian_puts_them_too():
    # On this machine or CI: PATH, or /usr/lib/postgresql/<version>/bin.
    found = find_bin_dir()
    if found is None:
        pytest.skip("no PostgreSQL binaries here")
    assert (found / "initdb").exists() and (found / "pg_ctl").exists()
