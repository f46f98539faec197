"""The runner's reaper (services/runner/reaper.py), with real processes: the groups it
holds die when the runner's end of the pipe closes - a SIGKILLed runner included, and the
job's grandchildren with it - and nothing it was told has ended is ever killed."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.runner import process
from services.runner import reaper as reaper_program

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 10.0


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for whoever reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until_gone(*pids: int) -> None:
    """A SIGKILL is delivered at once but the process ends asynchronously: wait for each
    exit on a pidfd (readable once the process has exited, whoever its parent), with a
    deadline."""
    deadline = time.monotonic() + DEADLINE_S
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # already gone and reaped
        try:
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd], [], [], left)
            assert readable or gone(pid), f"still alive: {pid}"
        finally:
            os.close(fd)


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a group of its own, as a job's command is started."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bare_reaper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-S", reaper_program.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )


def tell(reaper: subprocess.Popen[bytes], text: bytes) -> None:
    assert reaper.stdin is not None
    reaper.stdin.write(text)
    reaper.stdin.flush()


def test_end_of_file_kills_the_groups_held(victim: subprocess.Popen[bytes]) -> None:
    reaper = bare_reaper()
    tell(reaper, b"+%d\n" % victim.pid)
    assert reaper.stdin is not None
    reaper.stdin.close()
    assert reaper.wait(DEADLINE_S) == 0
    assert victim.wait(DEADLINE_S) == -signal.SIGKILL


def test_a_group_said_ended_is_not_killed(victim: subprocess.Popen[bytes]) -> None:
    reaper = bare_reaper()
    # Split across writes, as a pipe may deliver it.
    tell(reaper, b"+%d\n-%d" % (victim.pid, victim.pid))
    tell(reaper, b"\n")
    assert reaper.stdin is not None
    reaper.stdin.close()
    assert reaper.wait(DEADLINE_S) == 0
    # It exits only after its kills were sent: one would show by now.
    assert victim.poll() is None


def test_nonsense_and_dangerous_groups_are_ignored() -> None:
    # `-1` would be every process we may signal, 0 our own group: never killed.
    reaper = bare_reaper()
    tell(reaper, b"+0\n+1\n+-1\n+x\nhello\n")
    assert reaper.stdin is not None
    reaper.stdin.close()
    assert reaper.wait(DEADLINE_S) == 0


def test_the_serve_loop_keeps_what_was_not_ended() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"+100\n+200\n-100\n+300\n-300\n+400")  # no newline: incomplete
    os.close(write_end)
    try:
        assert reaper_program.serve(read_end) == {200}
    finally:
        os.close(read_end)


def test_a_clean_close_after_release_kills_nothing(victim: subprocess.Popen[bytes]) -> None:
    reaper = process.Reaper()
    reaper.hold(victim.pid)
    reaper.release(victim.pid)
    reaper.close()
    assert reaper.proc.returncode == 0
    assert victim.poll() is None


def test_the_reaper_ignores_sigterm_and_sigint(victim: subprocess.Popen[bytes]) -> None:
    """A service manager's SIGTERM to every process must not end it before the runner."""
    reaper = process.Reaper()
    reaper.hold(victim.pid)  # Reaper() returned when it said it ignores them
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        reaper.proc.send_signal(sig)
    assert reaper.proc.poll() is None
    reaper.close()
    assert reaper.proc.returncode == 0
    assert victim.wait(DEADLINE_S) == -signal.SIGKILL


# A stand-in runner: starts one job through process.start, prints the pids of the job's
# shell and of the grandchild it left in the background, then waits to be killed.
_RUNNER = """
import asyncio, os, sys
from pathlib import Path
from services.runner import process

async def main():
    proc = await process.start(
        ["sh", "-c", "sleep 300 & echo $$ $!; wait"], Path("."), dict(os.environ)
    )
    line = await proc.stdout.readline()
    sys.stdout.write(f"{process._reaper.proc.pid} {line.decode()}")
    sys.stdout.flush()
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


def test_a_sigkilled_runner_takes_its_job_and_grandchildren_along() -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", _RUNNER], cwd=ROOT, stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert runner.stdout is not None
        reaper_pid, shell_pid, grandchild_pid = map(int, runner.stdout.readline().split())
        assert not gone(grandchild_pid)
        runner.kill()
        runner.wait()
        wait_until_gone(reaper_pid, shell_pid, grandchild_pid)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        assert runner.stdout is not None
        runner.stdout.close()
