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
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiosqlite

T = TypeVar("T")


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


BUSY_RETRY_S = (0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # ~4 s, under busy_timeout


def _busy(err: sqlite3.OperationalError) -> bool:
    return getattr(err, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY  # and its kinds


async def _retrying_busy(run: Callable[[], Awaitable[T]], in_transaction: bool) -> T:
    """SQLite may answer SQLITE_BUSY at once instead of calling the busy handler when waiting
    could deadlock (seen under load: a statement of this connection against the intake's
    transaction). A statement outside a transaction that failed so wrote nothing: run it
    again after the other connection's transaction ends. Inside one, BEGIN IMMEDIATE already
    holds the write lock, and a retry would not be one statement."""
    for delay in (*BUSY_RETRY_S, None):
        try:
            return await run()
        except sqlite3.OperationalError as err:
            if in_transaction or delay is None or not _busy(err):
                raise
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


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
        rows = [tuple(row) for row in rows]

        async def run() -> None:
            with _erasure_named():
                await self.db.executemany(sql, rows)

        async with self._turn():
            await _retrying_busy(run, self._mine())

    async def insert(self, sql: str, args: Iterable[Any] = ()) -> int:
        """Run an INSERT (or upsert) and return the id of its row (RETURNING, as PostgreSQL
        does it: lastrowid is wrong for an upsert that updated)."""

        async def run() -> Any:
            with _erasure_named():
                async with self.db.execute(sql + " RETURNING id", tuple(args)) as cursor:
                    return await cursor.fetchone()

        async with self._turn():
            row = await _retrying_busy(run, self._mine())
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
            return await _retrying_busy(self._write, self._conn._mine())

    async def _write(self) -> Done:
        with _erasure_named():
            cursor = await self._conn.db.execute(self._sql, self._args)
        done = Done(cursor.rowcount, cursor.lastrowid)
        await cursor.close()
        return done

    async def __aenter__(self) -> Rows:
        async with self._conn._turn():
            return await _retrying_busy(self._read, self._conn._mine())

    async def _read(self) -> Rows:
        with _erasure_named():
            async with self._conn.db.execute(self._sql, self._args) as cursor:
                return Rows(list(await cursor.fetchall()))

    async def __aexit__(self, *exc: Any) -> None:
        return None
