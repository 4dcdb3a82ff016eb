"""Versioned schema migrations: numbered .sql files applied once, in order, in a transaction.

SQLite replays its whole history (`migrations/`); PostgreSQL starts from one schema script
at the version it was written for (`migrations/postgres/`), and from then on each migration
exists in both folders under one number (tests/test_instances.py holds them to that).
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import TYPE_CHECKING

from gateway.store.connection import Connection

if TYPE_CHECKING:
    from gateway.store.postgres import PgConnection

log = logging.getLogger(__name__)

# Any fixed number: instances starting together take it in turn, so one of them migrates.
_MIGRATION_LOCK = 0x414C4D41


def available(dialect: str = "sqlite") -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file shipped for a dialect."""
    folder = resources.files("gateway.store") / "migrations"
    if dialect == "postgresql":
        folder = folder / "postgres"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


# Run with foreign keys off (a migration may rebuild a table the others point at), so each
# migration proves before its COMMIT that every reference still holds: the CHECK fails the
# script, and the transaction is rolled back, if any row points at nothing.
_REFERENCES_HOLD = (
    "CREATE TEMP TABLE _fk_check (broken INTEGER CHECK (broken = 0));\n"
    "INSERT INTO _fk_check SELECT COUNT(*) FROM pragma_foreign_key_check;\n"
    "DROP TABLE _fk_check;"
)
_BOOKKEEPING = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


async def migrate(db: Connection, migrations: list[tuple[int, str, str]] | None = None) -> int:
    """Bring the schema up to date (foreign keys off); returns the version now in force."""
    await db.execute(_BOOKKEEPING)
    current = await _current(db)
    for version, name, sql in available() if migrations is None else migrations:
        if version <= current:
            continue
        # executescript commits first, so wrap the file and its bookkeeping in one transaction.
        try:
            await db.executescript(
                f"BEGIN;\n{sql}\n{_REFERENCES_HOLD}\nINSERT INTO schema_migrations VALUES "
                f"({version}, '{name}', strftime('%Y-%m-%dT%H:%M:%fZ','now'));\nCOMMIT;"
            )
        except Exception:
            if db.db.in_transaction:
                await db.execute("ROLLBACK")
            raise
        log.info("applied migration %s", name)
        current = version
    return current


async def migrate_postgres(
    db: PgConnection, migrations: list[tuple[int, str, str]] | None = None
) -> int:
    """The same on PostgreSQL: one transaction, under a lock every instance takes first, so
    instances starting together migrate once (DDL is transactional there)."""
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        await db.execute(_BOOKKEEPING)
        current = await _current(db)
        for version, name, sql in available("postgresql") if migrations is None else migrations:
            if version <= current:
                continue
            await db.executescript(sql)
            await db.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, "
                "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))",
                (version, name),
            )
            log.info("applied migration postgres/%s", name)
            current = version
    return current


async def _current(db: Connection | PgConnection) -> int:
    async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
        row = await cur.fetchone()
    return int(row[0])
