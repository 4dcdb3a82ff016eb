"""The database a benchmark runs on: `--store sqlite|postgres` (issue 14).

sqlite: a file in the caller's temp dir, with the store's own pragmas (WAL, synchronous=NORMAL).
postgres: a fresh database, made for the run, on the throwaway cluster of tests/pg.py (loopback
TCP, fsync/synchronous_commit/full_page_writes off, as in tests) or on $TEST_DATABASE_URL's
server; the database is dropped and the cluster stopped at the end. Not a benchmark itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STORES = ("sqlite", "postgres")


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        choices=STORES,
        default="sqlite",
        help="sqlite: a temp file; postgres: a fresh database on a throwaway cluster "
        "(tests/pg.py) or on $TEST_DATABASE_URL's server",
    )


@contextlib.asynccontextmanager
async def database_url(store: str, tmp: Path) -> AsyncIterator[tuple[str, str]]:
    """(DATABASE_URL, what it is, for the report) for the run; cleaned up on exit."""
    if store == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}", "SQLite file (WAL, synchronous=NORMAL)"
        return
    import asyncpg

    from tests.pg import ENV_URL, start_cluster

    server_url = os.environ.get(ENV_URL)
    cluster = None
    if server_url:
        where = f"${ENV_URL}"
    else:
        cluster = await asyncio.to_thread(start_cluster)
        server_url = cluster.url
        where = "throwaway cluster (tests/pg.py: loopback TCP, fsync and synchronous_commit off)"
    name = f"bench_{secrets.token_hex(4)}"
    try:
        admin = await asyncpg.connect(server_url)
        try:
            version = await admin.fetchval("SHOW server_version")
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        url = urlsplit(server_url)._replace(path=f"/{name}").geturl()
        try:
            yield url, f"PostgreSQL {version.split()[0]}, {where}, database {name}"
        finally:
            if cluster is None:  # someone else's server: leave nothing behind
                admin = await asyncpg.connect(server_url)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await admin.close()
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
