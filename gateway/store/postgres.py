"""The PostgreSQL connection: an asyncpg pool behind the same interface as the SQLite one.

The store's SQL is written once, with `?` placeholders and features both engines share
(RETURNING, ON CONFLICT, IS DISTINCT FROM); `?` becomes `$n` here. A transaction holds one
pooled connection for the task that opened it, and that task's statements go to it; every
other statement borrows a connection for its own turn, so readers and writers of several
instances run side by side (row locks, not one writer).

asyncpg was measured against psycopg 3 on the store's hot paths (BENCHMARKS.md, "PostgreSQL
drivers"): faster on every query; the pool's reset on release is off because nothing here
leaves session state behind (only transaction-scoped advisory locks are taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Generator, Iterable
from decimal import Decimal
from typing import Any

import asyncpg

from gateway.store.connection import Done, Erased, Rows

_POOL_SIZE = 10
_STATEMENT_TIMEOUT_S = 30.0
# Strings and quoted names pass through; every `?` outside them is a parameter.
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?")


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1 … $n`."""
    count = 0

    def renumber(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() != "?":
            return match.group()
        count += 1
        return f"${count}"

    return _TOKENS.sub(renumber, sql)


def _numeric(text: str) -> int | float:
    """SUM over integers is `numeric` in PostgreSQL; the store's callers expect int or float,
    as SQLite gives them (a Decimal would not even serialise to JSON)."""
    value = Decimal(text)
    return int(value) if value == value.to_integral_value() and "." not in text else float(value)


async def _setup(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "numeric", encoder=str, decoder=_numeric, schema="pg_catalog", format="text"
    )


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Skip the pool's reset round trip on release: no session state is ever left behind."""


@contextlib.contextmanager
def _erasure_named() -> Generator[None]:
    try:
        yield
    except asyncpg.ForeignKeyViolationError as err:
        raise Erased(str(err)) from None


def _rowcount(status: str) -> int:
    """asyncpg reports a write as its command tag: "UPDATE 3", "INSERT 0 1", "DELETE 0"."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PgConnection:
    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # Keyed by task, not a ContextVar: tasks started inside a transaction inherit
        # context, and must not share its connection.
        self._held: dict[asyncio.Task[Any], asyncpg.Connection] = {}

    @classmethod
    async def open(cls, url: str) -> PgConnection:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=_POOL_SIZE,
            init=_setup,
            reset=_no_reset,
            command_timeout=_STATEMENT_TIMEOUT_S,
        )
        return cls(pool)

    def execute(self, sql: str, args: Iterable[Any] = ()) -> _PgStatement:
        return _PgStatement(self, numbered(sql), tuple(args))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        batch = [tuple(row) for row in rows]
        if not batch:
            return
        async with self._connection() as conn:
            with _erasure_named():
                await conn.executemany(numbered(sql), batch)

    async def executescript(self, script: str) -> None:
        async with self._connection() as conn:
            await conn.execute(script)

    async def insert(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run an INSERT (or upsert) and return the id of its row."""
        async with self._connection() as conn:
            with _erasure_named():
                return int(await conn.fetchval(numbered(sql + " RETURNING id"), *args))

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN … COMMIT, or ROLLBACK on any exception; nested in the same task = joins."""
        task = asyncio.current_task()
        assert task is not None
        if task in self._held:
            yield
            return
        async with self.pool.acquire() as conn:
            self._held[task] = conn
            try:
                async with conn.transaction():
                    yield
            finally:
                del self._held[task]

    def holding(self) -> asyncpg.Connection | None:
        """The connection of the current task's transaction, if it is in one."""
        task = asyncio.current_task()
        return self._held.get(task) if task is not None else None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        held = self.holding()
        if held is not None:
            yield held
            return
        async with self.pool.acquire() as conn:
            yield conn


class _PgStatement:
    """`await conn.execute(...)` runs a write; `async with conn.execute(...) as cur` reads
    (or writes with RETURNING)."""

    def __init__(self, conn: PgConnection, sql: str, args: tuple[Any, ...]) -> None:
        self._conn, self._sql, self._args = conn, sql, args

    def __await__(self) -> Generator[Any, None, Done]:
        return self._run().__await__()

    async def _run(self) -> Done:
        async with self._conn._connection() as conn:
            with _erasure_named():
                status = await conn.execute(self._sql, *self._args)
        return Done(_rowcount(status), None)

    async def __aenter__(self) -> Rows:
        async with self._conn._connection() as conn:
            with _erasure_named():
                return Rows(await conn.fetch(self._sql, *self._args))

    async def __aexit__(self, *exc: Any) -> None:
        return None
