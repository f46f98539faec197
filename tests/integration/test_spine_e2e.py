"""The spine end to end on real processes (gateway, scheduler, runner), real NATS JetStream
and real Postgres: a job's whole life seen on `/ws`, over the API, in the `jobs` table, and
through the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import nats

from services.client import XoogifyClient
from services.common import codec
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually

FINAL = {"SUCCESS", "FAILURE"}


async def _submit(xo: XoogifyClient, module: str, org: str = "acme", env: str = "stg") -> int:
    job = await xo.submit(
        organization=org,
        environment=env,
        module_name=module,
        module_type="amd64/script",
        action="APPLY-AUTO",
    )
    assert job["status"] == "IN-PROGRESS"
    return int(job["build_id"])


async def test_hello_and_broken_whole_life(stack: Stack) -> None:
    await stack.start_all()
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        hello_id = await _submit(xo, "hello")
        broken_id = await _submit(xo, "broken")
        await ws.wait_job_status(hello_id, FINAL)
        await ws.wait_job_status(broken_id, FINAL)

        for build_id, final in ((hello_id, "SUCCESS"), (broken_id, "FAILURE")):
            items = ws.job_items(build_id)
            # Every transition delivered, in order, none merged.
            assert [i["status"] for i in items] == ["IN-PROGRESS", "WORKING", final]
            assert [i["seq"] for i in items] == [1, 2, 3]
            stream_seqs = [i["stream_seq"] for i in items]
            assert stream_seqs == sorted(stream_seqs) and len(set(stream_seqs)) == 3

        broken = ws.job_items(broken_id)[-1]
        assert broken["reason"] == "exit-code" and broken["exit_code"] == 3

        # The API shows the same final jobs, with their event history.
        async def stored(build_id: int) -> dict | None:
            job = await xo.get_job(build_id)
            return job if job["status"] in FINAL else None

        hello = await eventually(lambda: stored(hello_id))
        assert hello["status"] == "SUCCESS" and hello["exit_code"] in (0, None)
        assert [e["status"] for e in hello["events"]] == ["IN-PROGRESS", "WORKING", "SUCCESS"]
        assert hello["runner_id"] == "runner-1"
        assert hello["started_at"] and hello["finished_at"]
        broken_job = await eventually(lambda: stored(broken_id))
        assert (broken_job["status"], broken_job["reason"]) == ("FAILURE", "exit-code")

        # The stored log is complete and in order.
        async def complete_log(build_id: int) -> dict | None:
            part = await xo.read_logs(build_id)
            return part if part["complete"] else None

        log = await eventually(lambda: complete_log(hello_id))
        lines = log["data"].splitlines()
        steps = [line for line in lines if line.startswith("hello: step")]
        assert steps == [f"hello: step {i} of 10" for i in range(1, 11)]
        assert lines[-1] == "hello: apply done"
        assert log["next_offset"] == len(log["data"].encode())
        broken_log = await eventually(lambda: complete_log(broken_id))
        assert "Error: broken module failed on purpose" in broken_log["data"]

    # And in the jobs table itself.
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT build_id, status, seq FROM jobs WHERE build_id = ANY($1) ORDER BY build_id",
            [hello_id, broken_id],
        )
        assert [(r["status"], r["seq"]) for r in rows] == [("SUCCESS", 3), ("FAILURE", 3)]
        events = await conn.fetchval(
            "SELECT count(*) FROM job_events WHERE build_id = ANY($1)", [hello_id, broken_id]
        )
        assert events == 6
    finally:
        await conn.close()


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    # Without XOOGIFY_TOKEN the CLI takes the admin token `xoogify up` leaves in its data
    # dir (<data-dir>/admin-token), as CONTRACT.md says: that path is what runs here.
    env = stack.env()
    env.pop("XOOGIFY_TOKEN", None)
    data_dir = stack.log_dir.parent / "cli-data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "admin-token").write_text(f"{stack.settings.token}\n")
    env["XOOGIFY_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_submit_follow_exit_codes(stack: Stack) -> None:
    await stack.start_all()
    common = ["--org", "acme", "--env", "stg", "--type", "amd64/script", "--action", "APPLY-AUTO"]
    ok = await asyncio.to_thread(_cli, stack, "submit", "--module", "hello", *common, "--follow")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip().isdigit()  # the build ID on stderr
    assert "hello: step 10 of 10" in ok.stdout and "hello: apply done" in ok.stdout

    bad = await asyncio.to_thread(_cli, stack, "submit", "--module", "broken", *common, "--follow")
    assert bad.returncode == 1
    assert "Error: broken module failed on purpose" in bad.stdout

    usage = await asyncio.to_thread(
        _cli, stack, "submit", "--module", "Bad.Name", *common, "--follow"
    )
    assert usage.returncode == 2
    assert "module_name" in usage.stderr

    listed = await asyncio.to_thread(_cli, stack, "jobs", "--org", "acme", "--json")
    assert listed.returncode == 0
    assert listed.stdout.count("\n") == 2

    logs = await asyncio.to_thread(_cli, stack, "logs", ok.stderr.strip())
    assert logs.stdout == ok.stdout


async def test_unknown_module_ends_invalid_module(stack: Stack) -> None:
    await stack.start_all()
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await _submit(xo, "no-such-module")
        final = await ws.wait_job_status(build_id, FINAL)
        assert (final["status"], final["reason"]) == ("FAILURE", "invalid-module")


async def test_gateway_sigkill_loses_no_event(stack: Stack) -> None:
    """Kill the gateway while jobs run; on restart every event of the meantime is stored
    exactly once."""
    await stack.start_all(runners=2)
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        ids = [await _submit(xo, "hello", env=f"e{i}") for i in range(6)]
    stack.kill("gateway")
    # The jobs go on without the gateway; wait for their final events on the stream itself.
    nc = await nats.connect(stack.settings.nats_url)
    try:
        js = nc.jetstream()
        subject = stack.settings.subjects.events_filter()

        async def finals() -> int | None:
            sub = await js.subscribe(subject, ordered_consumer=True)
            done: set[int] = set()
            try:
                while True:
                    msg = await sub.next_msg(timeout=0.5)
                    body = codec.loads(msg.data)
                    if body["status"] in FINAL:
                        done.add(body["build_id"])
            except nats.errors.TimeoutError:
                pass
            finally:
                await sub.unsubscribe()
            return len(done) if done >= set(ids) else None

        await eventually(finals, timeout=60, interval=0.2)
        stream = await js.stream_info(stack.settings.subjects.events_stream)
        published = stream.state.messages
    finally:
        await nc.close()

    await stack.start_gateway()
    conn = await asyncpg.connect(stack.settings.database_url)
    try:

        async def all_stored() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM job_events")
            return n == published

        await eventually(all_stored, timeout=30)
        rows = await conn.fetch("SELECT status, seq FROM jobs WHERE build_id = ANY($1)", ids)
        assert sorted((r["status"], r["seq"]) for r in rows) == [("SUCCESS", 3)] * len(ids)
        dupes = await conn.fetchval(
            "SELECT count(*) FROM (SELECT build_id, seq FROM job_events"
            " GROUP BY build_id, seq HAVING count(*) > 1) d"
        )
        assert dupes == 0
        assert published == 3 * len(ids)
    finally:
        await conn.close()


def test_cli_usage_error_exit_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "submit", "--org", "acme"],
        capture_output=True,
        text=True,
        env={**os.environ, "XOOGIFY_GATEWAY_URL": "http://127.0.0.1:9"},
        check=False,
    )
    assert result.returncode == 2


async def test_client_watch_from_a_sequence_then_live(stack: Stack) -> None:
    await stack.start_all()
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        first = await _submit(xo, "hello", org="globex")
        await xo.wait_final(first, timeout=60)
        second = await _submit(xo, "hello")
        seen: list[dict] = []
        async with asyncio.timeout(60):
            async for event in xo.watch(organization="acme", since=0):
                seen.append(event)
                if event["build_id"] == second and event["status"] in FINAL:
                    break
    assert {e["organization"] for e in seen} == {"acme"}  # globex filtered out
    assert [e["status"] for e in seen] == ["IN-PROGRESS", "WORKING", "SUCCESS"]
    assert [e["stream_seq"] for e in seen] == sorted({e["stream_seq"] for e in seen})
