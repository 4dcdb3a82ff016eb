"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl in a temp dir.

Loopback only (listen_addresses=127.0.0.1, trust auth for host 127.0.0.1 and the socket in the
temp dir), a free port, fsync off. Binaries come from PATH or /usr/lib/postgresql/*/bin (Debian's
`postgresql` package). initdb and postgres refuse to run as root: as root, they run as `nobody`
through runuser, in a temp dir that user owns. `TEST_DATABASE_URL` names an existing server
instead; `pg_url` (a pytest session fixture) skips with the reason when neither is available.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV_URL = "TEST_DATABASE_URL"
RUN_AS = "nobody"


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the newest Debian version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
    )
    for candidate in reversed(versions):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    bin_dir: Path
    root: Path
    port: int
    as_user: str | None
    database: str = "almada_test"
    user: str = "postgres"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr or done.stdout}"
            )

    def start(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        # Trust, but only from loopback and the socket in our own temp dir.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        self._run(
            "createdb", "-h", str(self.root), "-p", str(self.port), "-U", self.user,
            self.database,
        )  # fmt: skip

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> Cluster:
    """initdb, start, create the database; the caller stops it (Cluster.stop)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("no PostgreSQL binaries (initdb, pg_ctl) on PATH or under "
                                "/usr/lib/postgresql/*/bin")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="almada-pg-"))
    as_user = None
    if os.geteuid() == 0:
        as_user = RUN_AS
        shutil.chown(root, user=RUN_AS)
    cluster = Cluster(bin_dir=bin_dir, root=root, port=_free_port(), as_user=as_user)
    try:
        cluster.start()
    except BaseException:
        log = root / "log"
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        if detail:
            raise RuntimeError(f"PostgreSQL did not start; its log ends:\n{detail}") from None
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL: $TEST_DATABASE_URL, else a throwaway cluster, else a skip saying why."""
    existing = os.environ.get(ENV_URL)
    if existing:
        yield existing
        return
    if find_bin_dir() is None:
        pytest.skip(
            "PostgreSQL tests skipped: no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin "
            f"(install Debian's postgresql package, or set {ENV_URL})"
        )
    cluster = start_cluster()
    try:
        yield cluster.url
    finally:
        cluster.stop()
