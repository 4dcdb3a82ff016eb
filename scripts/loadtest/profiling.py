"""py-spy on the gateway while the load runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def profiled(pid: int | None, output: str | None, native: bool) -> AsyncIterator[None]:
    """py-spy on the gateway while the load runs (a dev tool: only if asked for).

    `native` adds C frames (uvloop, orjson, syscalls) but pauses the process per sample.
    """
    if not output or pid is None:
        yield
        return
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(output).suffix, "raw")
    # Next to this interpreter (a venv's bin) or on PATH.
    search = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    py_spy = shutil.which("py-spy", path=search)
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    argv = [py_spy, "record", "--pid", str(pid), "--output", output, "--format", fmt]
    argv += ["--rate", "200", "--native" if native else "--nonblocking"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        await proc.wait()
