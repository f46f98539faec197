"""A SIGKILLed runner's job dies with it, down to the processes the job's script left in
the background: the runner's reaper kills the job's whole process group. (The death
signal setpriv used to set reached only the runner's direct child.)"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from services.common.config import Settings
from tests.integration.test_runner_jobs import (  # the fake scheduler and its fixtures
    FakeScheduler,
    job_pids,
    modules_dir,
    nc,
    poll,
    rsettings,
    runner_logs_on,
    sched,
    unique_org,
)
from tests.stack import Stack

__all__ = ["modules_dir", "nc", "rsettings", "runner_logs_on", "sched"]


async def test_a_killed_runners_job_and_its_grandchildren_die(
    rsettings: Settings, sched: FakeScheduler, modules_dir: Path, tmp_path: Path
) -> None:
    module = modules_dir / "orphans"
    module.mkdir()
    (module / "module.toml").write_text('[script]\nAPPLY-AUTO = "sh ./run.sh"\n')
    # A background sleep and a pipeline: grandchildren of the runner.
    (module / "run.sh").write_text("sleep 300 &\nsleep 301 | cat &\necho orphans started\nwait\n")
    org = unique_org()
    stack = Stack(rsettings, tmp_path / "logs")
    await stack.start_runner("runner-r", arch="amd64", kinds="script")
    try:
        await sched.dispatch(40, "orphans", organization=org)
        await sched.wait_for(lambda: "orphans started" in sched.log_text(40))
        # The shell, `sleep 300`, and `sleep 301 | cat` (the subshell may fork or exec).
        assert len(job_pids(org)) >= 4
        stack.kill("runner-r")  # SIGKILL: no drain, no cleanup of its own

        async def all_gone() -> bool:
            return job_pids(org) == []

        await poll(all_gone, timeout=10)
    finally:
        await stack.stop_all()
        for pid in job_pids(org):
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
