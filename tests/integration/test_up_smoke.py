"""`xoogify up` as a new user runs it: no external servers, ready, a job succeeds, SIGINT
stops everything and leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.client import XoogifyClient
from services.common.config import machine_arch
from services.common.embedded import free_port
from tests.support import eventually


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's 0700 tmp dirs: Postgres runs as an unprivileged user when we are root.
    path = Path(tempfile.mkdtemp(prefix="xoogify-up-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_up_runs_a_job_and_stops_clean(data_dir: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XOOGIFY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--port", str(port)]
        + ["--data-dir", str(data_dir / "state")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    family: set[int] = set()
    try:

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{url}/readyz", timeout=1)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, timeout=60, interval=0.1)
        token = (data_dir / "state" / "admin-token").read_text().strip()
        async with XoogifyClient(url, token) as xo:
            job = await xo.submit(
                organization="acme",
                environment="stg",
                module_name="hello",
                module_type=f"{machine_arch()}/script",
                action="APPLY-AUTO",
            )
            final = await xo.wait_final(job["build_id"], timeout=60)
            assert final["status"] == "SUCCESS"
        family = _descendants(proc.pid)
        assert len(family) >= 5  # nats-server, postgres, gateway, scheduler, runner
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert f"ready at {url}" in out
    assert f"open {url}/?token={token}" in out

    async def all_gone() -> bool:
        return not any(_alive(pid) for pid in family)

    await eventually(all_gone, timeout=10)
