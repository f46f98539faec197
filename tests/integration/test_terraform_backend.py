"""The gateway's Terraform HTTP state backend, spoken to directly with httpx and the per-job
credentials the scheduler would issue. The jobs it checks them against are written straight
into the `jobs` table (no scheduler here), so each rule is tested on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from services.common import codec, state_auth
from tests.stack import Stack
from tests.support import auth_headers

ORG, ENV, MODULE = "acme", "stg", "network"


@dataclass
class Backend:
    stack: Stack
    db: asyncpg.Connection
    http: httpx.AsyncClient

    async def job(
        self,
        build_id: int,
        action: str = "APPLY-AUTO",
        status: str = "WORKING",
        module: str = MODULE,
    ) -> httpx.BasicAuth:
        """Record a job as the gateway would have ingested it; its state credentials."""
        await self.db.execute(
            "INSERT INTO jobs (build_id, organization, environment, module_type, module_name,"
            " action, status, seq, submitted_at, updated_at, stream_seq)"
            " VALUES ($1, $2, $3, 'amd64/terraform', $4, $5, $6, 2, now(), now(), $1)",
            build_id,
            ORG,
            ENV,
            module,
            action,
            status,
        )
        return self.auth(build_id, module)

    def auth(self, build_id: int, module: str = MODULE) -> httpx.BasicAuth:
        creds = state_auth.issue(
            self.stack.settings.state_secret, self.stack.url, build_id, ORG, ENV, module
        )
        return httpx.BasicAuth(creds.username, creds.password)

    async def finish(self, build_id: int, status: str = "SUCCESS") -> None:
        await self.db.execute("UPDATE jobs SET status = $2 WHERE build_id = $1", build_id, status)

    async def call(
        self,
        method: str,
        auth: httpx.BasicAuth | None,
        body: object | None = None,
        module: str = MODULE,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        content = None if body is None else codec.dumps(body)
        return await self.http.request(
            method,
            state_auth.state_path(ORG, ENV, module),
            auth=auth,
            content=content,
            params=params,
        )


@pytest.fixture
async def backend(stack: Stack) -> AsyncIterator[Backend]:
    await stack.start_gateway()
    db = await asyncpg.connect(stack.settings.database_url)
    async with httpx.AsyncClient(
        base_url=stack.url, headers=auth_headers(stack.settings), timeout=10
    ) as http:
        try:
            yield Backend(stack, db, http)
        finally:
            await db.close()


def tf_state(serial: int) -> dict[str, object]:
    return {"version": 4, "serial": serial, "lineage": "l-1", "outputs": {}, "resources": []}


def lock_info(lock_id: str, who: str) -> dict[str, str]:
    return {"ID": lock_id, "Operation": "OperationTypeApply", "Who": who, "Version": "1.11.4"}


async def test_wrong_or_missing_credentials_are_401(backend: Backend) -> None:
    good = await backend.job(1)
    no_auth = await backend.call("GET", None)
    assert no_auth.status_code == 401
    assert no_auth.headers["www-authenticate"].startswith("Basic")
    wrong = await backend.call("GET", httpx.BasicAuth("alice", "nope"))
    assert wrong.status_code == 401
    bad_password = await backend.call("GET", httpx.BasicAuth("build-1", "0" * 64))
    assert bad_password.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthenticated"
    assert (await backend.call("GET", good)).status_code == 204  # no state yet


async def test_credentials_for_another_workspace_are_401(backend: Backend) -> None:
    await backend.job(1, module="other")
    other_ws = backend.auth(1, module="other")
    assert (await backend.call("GET", other_ws, module="other")).status_code == 204
    answer = await backend.call("POST", other_ws, tf_state(1), module=MODULE)
    assert answer.status_code == 401
    assert (await backend.call("LOCK", other_ws, lock_info("x", "a"))).status_code == 401


async def test_a_plan_reads_but_cannot_write(backend: Backend) -> None:
    apply = await backend.job(1)
    assert (await backend.call("POST", apply, tf_state(1))).status_code == 200
    plan = await backend.job(2, action="PLAN")
    read = await backend.call("GET", plan)
    assert read.status_code == 200 and read.json()["serial"] == 1
    for method in ("POST", "DELETE", "LOCK", "UNLOCK"):
        answer = await backend.call(method, plan, tf_state(2))
        assert answer.status_code == 403, method
    assert (await backend.call("GET", apply)).json()["serial"] == 1


async def test_a_final_job_may_no_longer_act(backend: Backend) -> None:
    auth = await backend.job(1)
    await backend.finish(1)
    answer = await backend.call("POST", auth, tf_state(1))
    assert answer.status_code == 403
    assert "ended" in answer.json()["error"]["message"]


async def test_lock_twice_by_two_builds_is_423_with_the_lock_info(backend: Backend) -> None:
    first = await backend.job(1)
    second = await backend.job(2)
    held = lock_info("lock-a", "runner-a")
    assert (await backend.call("LOCK", first, held)).status_code == 200
    refused = await backend.call("LOCK", second, lock_info("lock-b", "runner-b"))
    assert refused.status_code == 423
    assert refused.json() == held
    # Nor may the other build write or unlock while the lock is held.
    assert (await backend.call("POST", second, tf_state(1))).status_code == 423
    assert (await backend.call("UNLOCK", second, lock_info("lock-b", "runner-b"))).status_code == (
        423
    )
    # The holder writes with its lock ID (as Terraform does), then unlocks; then the other
    # build may lock.
    assert (
        await backend.call("POST", first, tf_state(1), params={"ID": "lock-a"})
    ).status_code == 200
    assert (await backend.call("UNLOCK", first, held)).status_code == 200
    assert (await backend.call("LOCK", second, lock_info("lock-b", "runner-b"))).status_code == 200


async def test_a_lock_of_a_final_job_is_taken_over(backend: Backend) -> None:
    killed = await backend.job(1)
    assert (await backend.call("LOCK", killed, lock_info("lock-a", "runner-a"))).status_code == 200
    next_job = await backend.job(2)
    assert (await backend.call("LOCK", next_job, lock_info("lock-b", "b"))).status_code == 423
    await backend.finish(1, "FAILURE")
    assert (await backend.call("LOCK", next_job, lock_info("lock-b", "b"))).status_code == 200
    row = await backend.db.fetchrow("SELECT lock_id, build_id FROM terraform_locks")
    assert (row["lock_id"], row["build_id"]) == ("lock-b", 2)


async def test_every_version_is_kept_and_delete_adds_one_without_data(backend: Backend) -> None:
    first = await backend.job(1)
    assert (await backend.call("POST", first, tf_state(1))).status_code == 200
    assert (await backend.call("POST", first, tf_state(2))).status_code == 200
    second = await backend.job(2, action="DESTROY")
    assert (await backend.call("DELETE", second)).status_code == 200
    assert (await backend.call("GET", second)).status_code == 204

    listed = await backend.http.get(state_auth.state_path(ORG, ENV, MODULE) + "/versions")
    items = listed.json()["items"]
    assert [(i["version"], i["build_id"]) for i in items] == [(3, 2), (2, 1), (1, 1)]
    assert items[0]["size"] == 0 and items[1]["size"] > 0
    rows = await backend.db.fetch(
        "SELECT version, data IS NULL AS gone FROM terraform_states ORDER BY version"
    )
    assert [(r["version"], r["gone"]) for r in rows] == [(1, False), (2, False), (3, True)]


async def test_a_state_that_is_not_json_is_refused(backend: Backend) -> None:
    auth = await backend.job(1)
    answer = await backend.http.post(
        state_auth.state_path(ORG, ENV, MODULE), auth=auth, content=b"not json"
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid"


async def test_a_state_over_64_mib_is_413(backend: Backend) -> None:
    auth = await backend.job(1)
    too_big = b"{" + b" " * (64 * 1024 * 1024) + b"}"
    answer = await backend.http.post(
        state_auth.state_path(ORG, ENV, MODULE), auth=auth, content=too_big
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "too-large"
    assert await backend.db.fetchval("SELECT count(*) FROM terraform_states") == 0
