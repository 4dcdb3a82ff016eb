"""asyncpg vs psycopg 3 (AsyncConnectionPool) vs aiosqlite on the store's hot paths (issue 14).

The operations the store does most: a turn (one-row INSERT in a transaction), a queue claim
(SELECT ... FOR UPDATE SKIP LOCKED + UPDATE; on SQLite an UPDATE ... RETURNING in BEGIN IMMEDIATE),
the last 20 turns of a person, and a burst of 200 turn inserts from 20 concurrent tasks.
PostgreSQL is the throwaway cluster of tests/pg.py (fsync off, as in tests), or
$TEST_DATABASE_URL; SQLite is a temp file with the store's pragmas (WAL, synchronous=NORMAL).

    .venv/bin/python scripts/bench_postgres.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.stats import percentile  # noqa: E402
from tests.pg import ENV_URL, start_cluster  # noqa: E402

PEOPLE = 50
SEED_TURNS = 40  # per person, so the last-20 read has something to skip
TEXT = "Olá, queria saber mais sobre o curso de inglês para a minha filha."

PG_SCHEMA = [
    "DROP TABLE IF EXISTS bench_turns, bench_queue",
    "CREATE TABLE bench_turns (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " person_id bigint NOT NULL, role text NOT NULL, text text NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX ON bench_turns (person_id, id)",
    "CREATE TABLE bench_queue (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " person_id bigint NOT NULL, status text NOT NULL DEFAULT 'queued', claimed_at timestamptz)",
    "CREATE INDEX ON bench_queue (status, id)",
]
SQLITE_SCHEMA = [
    "CREATE TABLE bench_turns (id INTEGER PRIMARY KEY AUTOINCREMENT, person_id INTEGER NOT NULL,"
    " role TEXT NOT NULL, text TEXT NOT NULL, created_at TEXT NOT NULL DEFAULT (datetime('now')))",
    "CREATE INDEX bench_turns_person ON bench_turns (person_id, id)",
    "CREATE TABLE bench_queue (id INTEGER PRIMARY KEY AUTOINCREMENT, person_id INTEGER NOT NULL,"
    " status TEXT NOT NULL DEFAULT 'queued', claimed_at TEXT)",
    "CREATE INDEX bench_queue_status ON bench_queue (status, id)",
]
PG_CLAIM = (
    "SELECT id FROM bench_queue WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
PG_LAST20 = (
    "SELECT role, text, created_at FROM bench_turns WHERE person_id = $1 ORDER BY id DESC LIMIT 20"
)


async def _timed(n: int, op: Callable[[int], Awaitable[None]]) -> list[float]:
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await op(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def _burst(op: Callable[[int], Awaitable[None]]) -> tuple[list[float], float]:
    """200 inserts from 20 tasks: per-insert latency and the wall time of the whole burst."""
    samples: list[float] = []

    async def task(t: int) -> None:
        for k in range(10):
            start = time.perf_counter()
            await op(t * 10 + k)
            samples.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(20)))
    return samples, (time.perf_counter() - start) * 1000


async def _no_reset(_conn) -> None:
    return None


async def bench_asyncpg(url: str, n: int, reset: bool = True) -> dict:
    """reset=False skips the pool's reset on release (a round trip: advisory unlock-all,
    CLOSE ALL, UNLISTEN *, RESET ALL); safe only if nothing session-scoped is left behind."""
    import asyncpg

    extra = {} if reset else {"reset": _no_reset}
    pool = await asyncpg.create_pool(url, min_size=20, max_size=20, **extra)
    async with pool.acquire() as c:
        for sql in PG_SCHEMA:
            await c.execute(sql)
        await c.execute(
            "INSERT INTO bench_turns (person_id, role, text)"
            " SELECT p, 'user', $1 FROM generate_series(1, $2) p, generate_series(1, $3)",
            TEXT, PEOPLE, SEED_TURNS,
        )  # fmt: skip
        await c.execute(
            "INSERT INTO bench_queue (person_id) SELECT g % $1 FROM generate_series(1, $2) g",
            PEOPLE, n + 10,
        )  # fmt: skip

    async def turn(i: int) -> None:
        async with pool.acquire() as c, c.transaction():
            await c.execute(
                "INSERT INTO bench_turns (person_id, role, text) VALUES ($1, 'user', $2)",
                i % PEOPLE, TEXT,
            )  # fmt: skip

    async def claim(_: int) -> None:
        async with pool.acquire() as c, c.transaction():
            row_id = await c.fetchval(PG_CLAIM)
            await c.execute(
                "UPDATE bench_queue SET status = 'running', claimed_at = now() WHERE id = $1",
                row_id,
            )

    async def last20(i: int) -> None:
        async with pool.acquire() as c:
            rows = await c.fetch(PG_LAST20, i % PEOPLE + 1)
            assert len(rows) == 20

    out = await _run_all(n, turn, claim, last20)
    await pool.close()
    return out


async def bench_psycopg(url: str, n: int) -> dict:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=20, max_size=20, open=False)
    await pool.open(wait=True)
    async with pool.connection() as c:
        for sql in PG_SCHEMA:
            await c.execute(sql)
        await c.execute(
            "INSERT INTO bench_turns (person_id, role, text)"
            " SELECT p, 'user', %s FROM generate_series(1, %s) p, generate_series(1, %s)",
            (TEXT, PEOPLE, SEED_TURNS),
        )
        await c.execute(
            "INSERT INTO bench_queue (person_id) SELECT g %% %s FROM generate_series(1, %s) g",
            (PEOPLE, n + 10),
        )

    # pool.connection() commits on exit: one transaction per block, as the store would use it.
    async def turn(i: int) -> None:
        async with pool.connection() as c:
            await c.execute(
                "INSERT INTO bench_turns (person_id, role, text) VALUES (%s, 'user', %s)",
                (i % PEOPLE, TEXT),
            )

    async def claim(_: int) -> None:
        async with pool.connection() as c:
            cur = await c.execute(PG_CLAIM)
            (row_id,) = await cur.fetchone()
            await c.execute(
                "UPDATE bench_queue SET status = 'running', claimed_at = now() WHERE id = %s",
                (row_id,),
            )

    async def last20(i: int) -> None:
        async with pool.connection() as c:
            cur = await c.execute(PG_LAST20.replace("$1", "%s"), (i % PEOPLE + 1,))
            assert len(await cur.fetchall()) == 20

    out = await _run_all(n, turn, claim, last20)
    await pool.close()
    return out


async def bench_sqlite(path: str, n: int) -> dict:
    import aiosqlite

    db = await aiosqlite.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "busy_timeout=5000", "synchronous=NORMAL"):
        await db.execute(f"PRAGMA {pragma}")
    for sql in SQLITE_SCHEMA:
        await db.execute(sql)
    await db.execute("BEGIN")
    await db.executemany(
        "INSERT INTO bench_turns (person_id, role, text) VALUES (?, 'user', ?)",
        [(p, TEXT) for p in range(1, PEOPLE + 1) for _ in range(SEED_TURNS)],
    )
    await db.executemany(
        "INSERT INTO bench_queue (person_id) VALUES (?)", [(g % PEOPLE,) for g in range(n + 10)]
    )
    await db.execute("COMMIT")
    lock = asyncio.Lock()  # the store's one shared connection: one transaction at a time

    async def turn(i: int) -> None:
        async with lock:
            await db.execute("BEGIN")
            await db.execute(
                "INSERT INTO bench_turns (person_id, role, text) VALUES (?, 'user', ?)",
                (i % PEOPLE, TEXT),
            )
            await db.execute("COMMIT")

    async def claim(_: int) -> None:
        async with lock:
            await db.execute("BEGIN IMMEDIATE")
            cur = await db.execute(
                "UPDATE bench_queue SET status = 'running', claimed_at = datetime('now')"
                " WHERE id = (SELECT id FROM bench_queue WHERE status = 'queued'"
                " ORDER BY id LIMIT 1) RETURNING id"
            )
            assert await cur.fetchone()
            await db.execute("COMMIT")

    async def last20(i: int) -> None:
        cur = await db.execute(
            "SELECT role, text, created_at FROM bench_turns WHERE person_id = ?"
            " ORDER BY id DESC LIMIT 20",
            (i % PEOPLE + 1,),
        )
        assert len(await cur.fetchall()) == 20

    out = await _run_all(n, turn, claim, last20)
    await db.close()
    return out


async def _run_all(n: int, turn, claim, last20) -> dict:
    await _timed(min(200, n), last20)  # warm-up: connections, plans, caches
    out = {
        "turn insert": await _timed(n, turn),
        "queue claim": await _timed(n, claim),
        "last 20 turns": await _timed(n, last20),
    }
    burst, wall = await _burst(turn)
    out["200 inserts / 20 tasks"] = burst
    out["_burst_wall_ms"] = wall
    return out


def _report(results: dict[str, dict]) -> str:
    ops = ["turn insert", "queue claim", "last 20 turns", "200 inserts / 20 tasks"]
    lines = [f"{'operation':<24} {'driver':<11} {'median ms':>10} {'p99 ms':>8}"]
    for op in ops:
        for name, res in results.items():
            s = res[op]
            lines.append(
                f"{op:<24} {name:<11} {percentile(s, 50):>10.3f} {percentile(s, 99):>8.3f}"
            )
    for name, res in results.items():
        lines.append(f"burst wall time, {name}: {res['_burst_wall_ms']:.1f} ms for 200 inserts")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per sequential operation")
    args = parser.parse_args()
    cluster = None
    url = os.environ.get(ENV_URL)
    if not url:
        cluster = start_cluster()
        url = cluster.url
    try:
        results = {}
        results["psycopg"] = await bench_psycopg(url, args.n)
        results["asyncpg"] = await bench_asyncpg(url, args.n)
        results["asyncpg-nr"] = await bench_asyncpg(url, args.n, reset=False)
        with tempfile.TemporaryDirectory() as tmp:
            results["aiosqlite"] = await bench_sqlite(str(Path(tmp) / "bench.db"), args.n)
        print(_report(results))
    finally:
        if cluster:
            cluster.stop()


if __name__ == "__main__":
    asyncio.run(main())
