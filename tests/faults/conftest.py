"""Fixtures of the fault tests: the per-test settings point at a modules dir holding the
`trace` module (every execution leaves its build ID in a file, so "none run twice" can be
counted) and a short queue timeout; a Postgres of the test's own for the test that stops
it (the session Postgres is shared by every test and must never stop)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from services.common.config import Settings
from services.common.embedded import EmbeddedPostgres
from tests.faults.modules import Trace, trace_modules


@pytest.fixture
def trace(tmp_path: Path) -> Trace:
    return trace_modules(tmp_path / "modules")


@pytest.fixture
def settings(settings: Settings, trace: Trace) -> Settings:
    return dataclasses.replace(settings, modules_dir=trace.modules_dir)


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A Postgres only this test uses, so it may stop and start it."""
    # Not under pytest's tmp dir (0700): the unprivileged user Postgres runs as when we
    # are root must reach its data dir.
    base = Path(tempfile.mkdtemp(prefix="xoogify-faults-pg-"))
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(base / "pg", log_file=base / "pg.log")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def own_database_url(own_postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    # start() runs its own event loop to create the database: keep it off ours.
    await asyncio.to_thread(own_postgres.start)
    conn = await asyncpg.connect(own_postgres.admin_url())
    await conn.close()
    yield own_postgres.url
