"""Issue 3's log promises end to end: a sensitive value never reaches the stored log, a
`/ws` log frame or the job's variables, even when the module prints it in two writes; and
the per-job log cap truncates with one line while the job goes on to succeed."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.client import XoogifyClient
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.runner.logtext import truncation_line
from tests.integration.test_runners_e2e import FINAL, stored_final, submit
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually

SECRET = "hunter2-s3cr3t-value"
LOG_CAP = 10_000

# Prints the token whole, then in two writes with a pause between (so the halves reach the
# runner in different reads), then next to other text on one line.
LEAK_SH = """#!/bin/sh
token="$XOOGIFY_VAR_token"
half=$(( ${#token} / 2 ))
first=$(printf '%s' "$token" | cut -c1-$half)
rest=$(printf '%s' "$token" | cut -c$((half + 1))-)
echo "leak: start, region $XOOGIFY_VAR_region"
echo "leak: whole $token"
printf 'leak: split %s' "$first"
sleep 0.5
printf '%s end\\n' "$rest"
echo "leak: inline[$token][$token]"
echo "leak: done"
"""

# About 200 KB of numbered lines, far over the cap.
CHATTY_SH = """#!/bin/sh
i=1
while [ "$i" -le 4000 ]; do
  echo "chatty: line $i of 4000 .........................................."
  i=$((i + 1))
done
echo "chatty: done"
"""


def _script_module(root: Path, name: str, script: str) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "module.toml").write_text(
        '[script]\nPLAN = "./run.sh"\nAPPLY-AUTO = "./run.sh"\nDESTROY = "./run.sh"\n'
    )
    run = folder / "run.sh"
    run.write_text(script)
    run.chmod(0o755)


@pytest.fixture
def log_stack(settings: Settings, tmp_path: Path) -> Stack:
    modules = tmp_path / "modules"
    shutil.copytree(EXAMPLE_MODULES_DIR, modules)
    _script_module(modules, "leak", LEAK_SH)
    _script_module(modules, "chatty", CHATTY_SH)
    tuned = dataclasses.replace(settings, modules_dir=modules, log_cap_bytes=LOG_CAP)
    return Stack(tuned, tmp_path / "logs")


async def _complete_log(xo: XoogifyClient, build_id: int) -> str:
    async def probe() -> str | None:
        text, offset = "", 0
        while True:
            part = await xo.read_logs(build_id, offset)
            text += part["data"]
            if not part["data"]:
                return text if part["complete"] else None
            offset = part["next_offset"]

    return await eventually(probe, timeout=30)


def _ws_log(ws: WsRecorder, build_id: int) -> tuple[str, list[dict[str, Any]]]:
    frames = [m for m in ws.messages if m.get("type") == "log" and m["build_id"] == build_id]
    return "".join(f["data"] for f in sorted(frames, key=lambda f: f["offset"])), frames


async def test_sensitive_value_never_shown(log_stack: Stack) -> None:
    stack = log_stack
    try:
        await stack.start_all()
        async with (
            WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
            XoogifyClient(stack.url, stack.settings.token) as xo,
        ):
            build_id = await submit(
                xo,
                "leak",
                variables={"token": SECRET, "region": "eu-west-1"},
                sensitive=["token"],
            )
            await ws.send({"type": "follow_logs", "build_id": build_id, "offset": 0})
            await ws.wait_for(lambda m: m.get("type") == "log_end" and m["build_id"] == build_id)
            final = await ws.wait_job_status(build_id, FINAL)
            assert final["status"] == "SUCCESS"

            # Every /ws log frame, and their text joined, is masked.
            streamed, frames = _ws_log(ws, build_id)
            assert frames
            for frame in frames:
                assert SECRET not in frame["data"]
            for message in ws.messages:
                assert SECRET not in str(message)

            # The stored log is too, and it is the same text.
            stored = await _complete_log(xo, build_id)
            assert stored == streamed
            assert SECRET not in stored
            lines = stored.splitlines()
            assert "leak: start, region eu-west-1" in lines  # not sensitive: shown
            assert "leak: whole ***" in lines
            assert "leak: split *** end" in lines
            assert "leak: inline[***][***]" in lines
            assert lines[-1] == "leak: done"

            # The job's variables show *** for the sensitive one only.
            job = await stored_final(xo, build_id)
            assert job["variables"] == {"token": "***", "region": "eu-west-1"}
            listed = await xo.list_jobs(organization="acme")
            assert SECRET not in str(listed)
        # Nor anywhere in Postgres (jobs, events, log chunks, ...).
        conn = await asyncpg.connect(stack.settings.database_url)
        try:
            tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            seen = ""
            for table in tables:
                rows = await conn.fetch(f'SELECT t::text AS row FROM "{table[0]}" t')
                assert not [r for r in rows if SECRET in r["row"]], table[0]
                seen += "".join(r["row"] for r in rows)
            # The search did see the job: its plain variable and its log are there.
            assert "eu-west-1" in seen and "leak: whole ***" in seen
        finally:
            await conn.close()
        # Nor in the services' own logs.
        for name in ("gateway", "scheduler", "runner-1"):
            assert stack.logs(name), name
            assert SECRET not in stack.logs(name), name
    finally:
        await stack.stop_all()


async def test_log_cap_truncates_and_the_job_succeeds(log_stack: Stack) -> None:
    stack = log_stack
    try:
        await stack.start_all()
        async with (
            WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
            XoogifyClient(stack.url, stack.settings.token) as xo,
        ):
            build_id = await submit(xo, "chatty")
            final = await ws.wait_job_status(build_id, FINAL)
            assert final["status"] == "SUCCESS" and final["exit_code"] == 0
            stored = await _complete_log(xo, build_id)
        line = truncation_line(LOG_CAP)
        assert stored.endswith(line)
        assert stored.count(line) == 1
        assert len(stored.encode()) <= LOG_CAP + len(line.encode())
        assert stored.startswith("chatty: line 1 of 4000")
        assert "chatty: done" not in stored
    finally:
        await stack.stop_all()
