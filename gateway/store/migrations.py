"""Versioned schema migrations: numbered .sql files applied once, in order, in a transaction."""

from __future__ import annotations

import logging
from importlib import resources

import aiosqlite

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


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the schema up to date; returns the version now in force."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
        (current,) = await cur.fetchone()
    for version, name, sql in available():
        if version <= current:
            continue
        # executescript commits first, so wrap the file and its bookkeeping in one transaction.
        await db.executescript(
            f"BEGIN;\n{sql}\nINSERT INTO schema_migrations VALUES "
            f"({version}, '{name}', strftime('%Y-%m-%dT%H:%M:%fZ','now'));\nCOMMIT;"
        )
        log.info("applied migration %s", name)
        current = version
    return current
