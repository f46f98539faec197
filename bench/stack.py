"""The servers and services one benchmark run needs, started by the run itself.

Postgres is started once per process (initdb takes seconds) and every run gets a fresh
database on it; `XOOGIFY_BENCH_DATABASE_ADMIN_URL` points at a running server instead.
NATS is a fresh embedded JetStream server per run (it starts in milliseconds). The
services are real processes (`python -m services.cli.main …`, via tests.stack.Stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from services.common.config import EXAMPLE_MODULES_DIR, Settings, machine_arch
from services.common.crypto import generate_sealing_pair, generate_state_key
from services.common.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.gateway import migrate, token_store
from tests.stack import Stack

ADMIN_URL_ENV = "XOOGIFY_BENCH_DATABASE_ADMIN_URL"


def _tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    # Postgres runs as an unprivileged user when we are root: it must reach its data dir.
    os.chmod(path, 0o755)
    return path


class Servers:
    """Postgres for every run in this process, started on first use."""

    def __init__(self) -> None:
        self._pg: EmbeddedPostgres | None = None
        self._dir: Path | None = None

    async def admin_url(self) -> str:
        external = os.environ.get(ADMIN_URL_ENV)
        if external:
            return external
        if self._pg is None:
            self._dir = _tempdir("xoogify-bench-pg-")
            pg = EmbeddedPostgres(self._dir / "pg", log_file=self._dir / "pg.log")
            self._pg = await asyncio.to_thread(pg.start)
        return self._pg.admin_url()

    async def new_database(self) -> str:
        admin = await self.admin_url()
        name = f"bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"{admin.rsplit('/', 1)[0]}/{name}"

    async def drop_database(self, url: str) -> None:
        admin = await self.admin_url()
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def close(self) -> None:
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class BenchStack:
    settings: Settings
    stack: Stack
    workdir: Path
    keep: bool = False  # set on failure: the service logs stay for a person to read

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    @property
    def ws_url(self) -> str:
        return self.stack.ws_url

    @property
    def headers(self) -> dict[str, str]:
        """What every client of the benchmark sends: the run's admin token."""
        return {"Authorization": f"Bearer {self.settings.token}"}

    @property
    def gateway_pid(self) -> int:
        return self.stack.procs["gateway"].pid

    async def wait_runners(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` runners are registered and idle (so no run pays their start)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers) as http:
            while True:
                items = (await http.get("/api/runners")).json()["items"]
                if sum(1 for r in items if r["state"] == "idle") >= count:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count} runners not registered in {timeout}s")
                await asyncio.sleep(0.05)


def noop_modules(directory: Path) -> Path:
    """A modules dir with `noop`: a script module whose every action is `true`."""
    module = directory / "noop"
    module.mkdir(parents=True, exist_ok=True)
    actions = ("PLAN", "APPLY-AUTO", "DESTROY")
    (module / "module.toml").write_text("[script]\n" + "".join(f'{a} = "true"\n' for a in actions))
    return directory


async def _admin_token(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate.apply(conn)
        _, secret = await token_store.create(conn, "bench", "admin", [])
    finally:
        await conn.close()
    return secret


@contextlib.asynccontextmanager
async def running_stack(
    servers: Servers,
    *,
    scheduler: bool = False,
    runners: int = 0,
    modules_dir: Path | None = None,
    log_cap_bytes: int = 64 * 1024 * 1024,
) -> AsyncIterator[BenchStack]:
    """A gateway (always), optionally the scheduler and `runners` script runners of this
    machine's architecture, on a fresh NATS and a fresh database."""
    workdir = _tempdir("xoogify-bench-run-")
    nats = EmbeddedNats(workdir / "nats", log_file=workdir / "nats.log").start()
    database_url = await servers.new_database()
    private_key, public_key = generate_sealing_pair()
    settings = Settings(
        nats_url=nats.url,
        database_url=database_url,
        gateway_url=f"http://127.0.0.1:{free_port()}",
        modules_dir=modules_dir or EXAMPLE_MODULES_DIR,
        state_secret=uuid.uuid4().hex,
        log_cap_bytes=log_cap_bytes,
        secrets_public_key=public_key,
        secrets_private_key=private_key,
        state_key=generate_state_key(),
        token=await _admin_token(database_url),
    )
    bench = BenchStack(settings, Stack(settings, workdir / "logs"), workdir)
    try:
        await bench.stack.start_gateway()
        if scheduler:
            await bench.stack.start_scheduler()
        for i in range(runners):
            await bench.stack.start_runner(f"runner-{i + 1}", arch=machine_arch(), kinds="script")
        if runners:
            await bench.wait_runners(runners)
        yield bench
    except BaseException:
        bench.keep = True
        raise
    finally:
        # All at once: each service drains on SIGTERM, and nothing here needs an order.
        await asyncio.gather(*(bench.stack.stop(name) for name in list(bench.stack.procs)))
        nats.stop()
        with contextlib.suppress(Exception):
            await servers.drop_database(database_url)
        if bench.keep:
            print(f"service logs kept in {workdir / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def rss_mb(pid: int) -> float:
    """Resident set size of a process (VmRSS in /proc/<pid>/status), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
