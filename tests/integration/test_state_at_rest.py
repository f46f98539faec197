"""Terraform state at rest (services/gateway/state_at_rest.py) across key rotation and rows
stored before encryption; and services that lack a key they need refuse to start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from services.common import codec, state_auth
from services.common.crypto import StateCipher, generate_state_key
from tests.stack import Stack
from tests.support import auth_headers, eventually, parses_as_json

WS = ("acme", "stg", "network")


def tf_state(serial: int, secret: str) -> dict[str, Any]:
    resources = [{"type": "null_resource", "instances": [{"attributes": {"pw": secret}}]}]
    return {"version": 4, "serial": serial, "lineage": "l-1", "resources": resources}


@pytest.fixture
async def db(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    await stack.start_gateway()  # migrates
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO jobs (build_id, organization, environment, module_type, module_name,"
            " action, status, seq, submitted_at, updated_at, stream_seq)"
            " VALUES (1, $1, $2, 'amd64/terraform', $3, 'APPLY-AUTO', 'WORKING', 2, now(),"
            " now(), 1)",
            *WS,
        )
        yield conn
    finally:
        await conn.close()


def client(stack: Stack) -> httpx.AsyncClient:
    creds = state_auth.issue(stack.settings.state_secret, stack.url, 1, *WS)
    return httpx.AsyncClient(
        base_url=stack.url,
        auth=httpx.BasicAuth(creds.username, creds.password),
        headers=auth_headers(stack.settings),
        timeout=10,
    )


async def rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT version, key_id, data FROM terraform_states ORDER BY version")


async def test_rotation_and_rows_from_before_encryption(
    stack: Stack, db: asyncpg.Connection
) -> None:
    old_key, new_key = stack.settings.state_key, generate_state_key()
    old, new = StateCipher(old_key), StateCipher(f"{new_key},{old_key}")
    path = state_auth.state_path(*WS)
    async with client(stack) as http:
        assert (
            await http.post(path, content=codec.dumps(tf_state(1, "pw-one")))
        ).status_code == 200
    # A version stored in clear before this change (the migration left key_id NULL).
    await db.execute(
        "INSERT INTO terraform_states (organization, environment, module_name, version,"
        " build_id, size, data) VALUES ($1, $2, $3, 2, 1, 10, $4)",
        *WS,
        codec.dumps(tf_state(2, "pw-two")),
    )
    first, legacy = await rows(db)
    assert first["key_id"] == old.current and b"pw-one" not in bytes(first["data"])
    assert legacy["key_id"] is None

    # The new key first, the old one kept: every version moves under the new key.
    await stack.stop("gateway")
    await stack.start_gateway(XOOGIFY_STATE_KEY=f"{new_key},{old_key}")

    async def moved() -> list[asyncpg.Record] | None:
        now = await rows(db)
        return now if all(r["key_id"] == new.current for r in now) else None

    for row in await eventually(moved, timeout=30):
        blob = bytes(row["data"])
        assert not parses_as_json(blob) and b"pw-" not in blob

    # Only the new key now: Terraform still reads the latest state, and writes a new one.
    await stack.stop("gateway")
    await stack.start_gateway(XOOGIFY_STATE_KEY=new_key)
    async with client(stack) as http:
        got = await http.get(path)
        assert got.status_code == 200 and codec.loads(got.content) == tf_state(2, "pw-two")
        assert (await http.post(path, content=codec.dumps(tf_state(3, "pw-3")))).status_code == 200
        assert codec.loads((await http.get(path)).content) == tf_state(3, "pw-3")
    assert [r["key_id"] for r in await rows(db)] == [new.current] * 3


@pytest.mark.parametrize(
    ("role", "missing", "args"),
    [
        ("gateway", "XOOGIFY_SECRETS_PUBLIC_KEY", ["gateway", "--port", "0"]),
        ("gateway", "XOOGIFY_STATE_KEY", ["gateway", "--port", "0"]),
        ("runner", "XOOGIFY_SECRETS_PRIVATE_KEY", ["runner", "--kinds", "script"]),
    ],
)
async def test_a_service_without_its_key_refuses_to_start(
    stack: Stack, role: str, missing: str, args: list[str]
) -> None:
    proc = stack.spawn(f"{role}-keyless", args, **{missing: ""})
    code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
    assert code == 2
    assert f"xoogify {role}: {missing} is not set" in stack.logs(f"{role}-keyless")
