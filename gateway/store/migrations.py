"""Versioned schema migrations: numbered .sql files applied once, in order, in a transaction."""

from __future__ import annotations

import logging
from importlib import resources

from gateway.store.connection import Connection

log = logging.getLogger(__name__)


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration file shipped with the package."""
    folder = resources.files("gateway.store") / "migrations"
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


async def migrate(db: Connection, migrations: list[tuple[int, str, str]] | None = None) -> int:
    """Bring the schema up to date (foreign keys off); returns the version now in force."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
        (current,) = await cur.fetchone()
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
