"""Real servers for the tests: one Postgres per session (a fresh database per test) and a
fresh JetStream `nats-server` per test, both started here on free ports.

`XOOGIFY_TEST_DATABASE_URL` / `XOOGIFY_TEST_NATS_URL` point the tests at running servers
instead; then each test gets its own database and its own subject prefix.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.common.crypto import generate_sealing_pair, generate_state_key
from services.common.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.common.subjects import Subjects
from tests import message_audit
from tests.openapi_audit import Audit
from tests.stack import Stack
from tests.support import admin_token


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Kept on the item so that a fixture's teardown knows whether the test failed.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    item.stash.setdefault(REPORTS, {})[report.when] = report


REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def failed(node: pytest.Item) -> bool:
    return any(r.failed for r in node.stash.get(REPORTS, {}).values())


@pytest.fixture(autouse=True)
def openapi_audit(monkeypatch: pytest.MonkeyPatch) -> Iterator[Audit]:
    """Check every gateway answer a test receives through httpx against the OpenAPI
    document; a test whose answers break the document fails."""
    audit = Audit()
    original = httpx.AsyncClient.send

    async def send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        response = await original(self, request, **kwargs)
        if not kwargs.get("stream"):
            audit.see(request, response)
        return response

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    yield audit
    assert audit.found == [], "answers that break the OpenAPI document:\n" + "\n".join(audit.found)


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    # 0755 so that the unprivileged user Postgres runs as (when we are root) can reach it.
    with tempfile.TemporaryDirectory(prefix="xoogify-test-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


@pytest.fixture(scope="session")
def postgres_admin_url(servers_dir: Path) -> Iterator[str]:
    external = os.environ.get("XOOGIFY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(servers_dir / "pg", log_file=servers_dir / "pg.log").start()
    try:
        yield server.admin_url()
    finally:
        server.stop()


@pytest.fixture
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = postgres_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    conn = await asyncpg.connect(postgres_admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats | None]:
    if os.environ.get("XOOGIFY_TEST_NATS_URL"):
        yield None
        return
    store = tmp_path / "nats"
    server = EmbeddedNats(store, log_file=tmp_path / "nats.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def settings(nats_server: EmbeddedNats | None, database_url: str, tmp_path: Path) -> Settings:
    """The test's settings, with an admin token (`settings.token`) every client sends
    through `tests.support.auth_headers`."""
    nats_url = nats_server.url if nats_server else os.environ["XOOGIFY_TEST_NATS_URL"]
    prefix = "xoogify" if nats_server else f"t{uuid.uuid4().hex[:10]}"
    private_key, public_key = generate_sealing_pair()
    return Settings(
        nats_url=nats_url,
        database_url=database_url,
        gateway_url=f"http://127.0.0.1:{free_port()}",
        modules_dir=EXAMPLE_MODULES_DIR,
        subjects=Subjects(prefix),
        heartbeat_s=1.0,
        cancel_grace_s=2.0,
        state_secret=uuid.uuid4().hex,
        secrets_public_key=public_key,
        secrets_private_key=private_key,
        state_key=generate_state_key(),
        token=await admin_token(database_url),
    )


@pytest.fixture
async def stack(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """The services as real processes (gateway, scheduler, one amd64 runner unless a test
    starts others), with helpers to kill and restart them."""
    s = Stack(settings, tmp_path / "logs")
    try:
        yield s
    finally:
        if failed(request.node):
            # Shown under the failure ("Captured stderr teardown").
            print(s.failure_report(), file=sys.stderr)
        await s.stop_all()
    if request.node.get_closest_marker("bad_messages") is None:
        bad = await message_audit.problems(settings)
        assert bad == [], "messages that break their schema:\n" + "\n".join(bad)
