"""The one aiosqlite connection a process shares, and transactions that cannot be misused.

aiosqlite runs statements one after another on one thread, in the order they are asked for.
A transaction that spans awaits would therefore take in every statement other tasks ask for
meanwhile, and roll them back with its own. Here a transaction is exclusive: it starts once
the statements in flight are done, and statements asked for while it runs wait until it ends,
except the transaction's own (those of the task that opened it).

`execute` keeps aiosqlite's shape, awaitable or `async with ... as cursor`, so the queries read
as before; the cursor's rows are fetched inside the statement's turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiosqlite


class Erased(LookupError):
    """A write named a row that no longer exists (its person was erased meanwhile): the
    foreign key refused it. Ids are never reused, so this is never someone else's row."""


@contextlib.contextmanager
def _erasure_named() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as err:
        if "FOREIGN KEY" not in str(err):
            raise
        raise Erased(str(err)) from None


@dataclass(frozen=True)
class Done:
    """What a write reports once it has run."""

    rowcount: int
    lastrowid: int | None


class Connection:
    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._owner: asyncio.Task[Any] | None = None
        self._serial = asyncio.Lock()  # one transaction at a time
        self._open = asyncio.Event()  # set while no transaction runs or waits to run
        self._open.set()
        self._in_flight = 0
        self._drained = asyncio.Event()  # set while no statement is in flight
        self._drained.set()

    def execute(self, sql: str, args: Iterable[Any] = ()) -> _Statement:
        return _Statement(self, sql, tuple(args))

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        async with self._turn():
            with _erasure_named():
                await self.db.executemany(sql, rows)

    async def insert(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run an INSERT (or upsert) and return the id of its row (RETURNING, as PostgreSQL
        does it: lastrowid is wrong for an upsert that updated)."""
        async with self._turn():
            with _erasure_named():
                async with self.db.execute(sql + " RETURNING id", tuple(args)) as cursor:
                    row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def executescript(self, script: str) -> None:
        async with self._turn():
            await self.db.executescript(script)

    async def close(self) -> None:
        await self.db.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception; a transaction opened
        inside one by the same task joins it. Do not await other tasks' statements inside."""
        if self._mine():
            yield
            return
        async with self._serial:
            self._open.clear()
            try:
                await self._drained.wait()
                self._owner = asyncio.current_task()
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    await self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:  # a failed COMMIT leaves it open too
                        await self.db.execute("ROLLBACK")
                    raise
            finally:
                self._owner = None
                self._open.set()

    def _mine(self) -> bool:
        return self._owner is not None and self._owner is asyncio.current_task()

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A statement's turn: inside its own transaction at once, else between transactions."""
        if self._mine():
            yield
            return
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()


class Rows:
    """A fetched result with the cursor methods the store uses: every row is read inside the
    statement's turn and the cursor closed, so no read stays open across the caller's awaits
    (an open SQLite read would pin its snapshot, and the next write on this connection would
    fail "database is locked" once the intake's connection had committed meanwhile)."""

    def __init__(self, records: list[Any]) -> None:
        self._records = records
        self._next = 0
        self.rowcount = len(records)

    async def fetchone(self) -> Any | None:
        if self._next >= len(self._records):
            return None
        self._next += 1
        return self._records[self._next - 1]

    async def fetchall(self) -> list[Any]:
        rest, self._next = self._records[self._next :], len(self._records)
        return rest


class _Statement:
    """`await conn.execute(...)` runs a write; `async with conn.execute(...) as cur` reads."""

    def __init__(self, conn: Connection, sql: str, args: tuple[Any, ...]) -> None:
        self._conn, self._sql, self._args = conn, sql, args

    def __await__(self) -> Generator[Any, None, Done]:
        return self._run().__await__()

    async def _run(self) -> Done:
        async with self._conn._turn():
            with _erasure_named():
                cursor = await self._conn.db.execute(self._sql, self._args)
            done = Done(cursor.rowcount, cursor.lastrowid)
            await cursor.close()
            return done

    async def __aenter__(self) -> Rows:
        async with self._conn._turn():
            with _erasure_named():
                async with self._conn.db.execute(self._sql, self._args) as cursor:
                    return Rows(list(await cursor.fetchall()))

    async def __aexit__(self, *exc: Any) -> None:
        return None
