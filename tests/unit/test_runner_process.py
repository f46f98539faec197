"""Starting a job's process: it leads a group of its own that the runner's reaper holds
until it ended (or, without a reaper, it carries setpriv's death signal); its exit code
and output come through unchanged, and a missing program is an error in the runner, as
with a plain exec."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from services.runner import process

# prctl(PR_GET_PDEATHSIG) and the process group, from inside the child.
_READ_PDEATHSIG = (
    "import ctypes, os; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v));"
    " print(v.value, os.getpgid(0) == os.getpid())"
)


@pytest.fixture(params=["reaper", "setpriv"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a command may be started: with the reaper, and the fallback without."""
    if request.param == "setpriv":
        monkeypatch.setattr(process, "_reaper", None)
        monkeypatch.setattr(process, "_reaper_failed", True)
    return str(request.param)


async def run(argv: list[str], tmp_path: Path) -> tuple[int, bytes]:
    proc = await process.start(argv, tmp_path, dict(os.environ))
    try:
        assert proc.stdout is not None
        out = await proc.stdout.read()
        return await proc.wait(), out
    finally:
        process.release(proc)


async def test_the_reaper_holds_the_group_until_released(tmp_path: Path) -> None:
    proc = await process.start([sys.executable, "-c", _READ_PDEATHSIG], tmp_path, dict(os.environ))
    assert proc.stdout is not None
    # No setpriv in between: no death signal, the command itself leads the group.
    assert (await proc.stdout.read()).split() == [b"0", b"True"]
    await proc.wait()
    reaper = process._reaper
    assert reaper is not None and proc.pid in reaper.held
    process.release(proc)
    assert proc.pid not in reaper.held


async def test_without_the_reaper_the_child_carries_the_death_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "_reaper", None)
    monkeypatch.setattr(process, "_reaper_failed", True)
    code, out = await run([sys.executable, "-c", _READ_PDEATHSIG], tmp_path)
    assert code == 0 and out.split() == [str(int(signal.SIGKILL)).encode(), b"True"]


async def test_exit_code_output_and_cwd_pass_through(tmp_path: Path, mode: str) -> None:
    code, out = await run(["sh", "-c", "pwd; echo oops >&2; exit 3"], tmp_path)
    assert code == 3
    assert out.decode().splitlines() == [str(tmp_path), "oops"]


async def test_a_missing_program_is_an_error_not_an_exit_code(tmp_path: Path, mode: str) -> None:
    with pytest.raises(FileNotFoundError):
        await run(["no-such-program-xoogify"], tmp_path)


async def test_a_dead_reaper_is_replaced_and_given_the_groups_still_held(
    tmp_path: Path,
) -> None:
    first = process.start_reaper()
    assert first is not None
    first.hold(123456)  # a job still running, as far as the reaper knows
    first.proc.kill()
    first.proc.wait()
    code, _ = await run(["true"], tmp_path)
    second = process._reaper
    assert code == 0 and second is not None and second is not first
    assert second.held == {123456}
    second.release(123456)


async def test_a_reaper_that_cannot_start_falls_back_to_setpriv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(process, "_reaper", None)
    monkeypatch.setattr(process, "_reaper_failed", False)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with caplog.at_level(logging.ERROR, logger="services.runner.process"):
        code, out = await run(["/bin/sh", "-c", "echo fine"], tmp_path)
    assert (code, out) == (0, b"fine\n")
    assert process._reaper is None and process._reaper_failed
    assert "could not start the reaper" in caplog.text


def _run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_exit_codes_signals_and_stopping_on_either_loop(tmp_path: Path, loop: str) -> None:
    """The runner runs on uvloop, the tests' servers on asyncio: the command's output, its
    exit and the group's stop are watched the same way on both."""

    async def main() -> None:
        assert await run(["sh", "-c", "echo out; echo err >&2; exit 3"], tmp_path) == (
            3,
            b"out\nerr\n",
        )
        code, _ = await run(["sh", "-c", "kill -9 $$"], tmp_path)
        assert (code, process.shell_exit_code(code)) == (-signal.SIGKILL, 137)

        # Deaf to SIGINT (inherited by sleep): only the SIGKILL after the grace ends it.
        proc = await process.start(
            ["sh", "-c", "trap '' INT; echo up; sleep 60"], tmp_path, dict(os.environ)
        )
        try:
            assert await proc.stdout.readline() == b"up\n"
            assert await process.stop_group(proc, 0.1)
            # The grace's timed-out wait did not take the exit from a later waiter.
            assert await proc.wait() == -signal.SIGKILL
            assert await proc.stdout.read() == b""
        finally:
            process.release(proc)

    _run_on(loop, main())


async def test_without_pidfds_the_exit_still_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert await run(["sh", "-c", "echo fine; exit 5"], tmp_path) == (5, b"fine\n")


async def test_release_closes_a_pipe_still_held_outside_the_group(tmp_path: Path) -> None:
    """A process that left the command's group keeps the pipe's write end: the runner
    still lets go of its read end (and sees the end of the output) once it releases."""
    proc = await process.start(
        ["sh", "-c", "setsid sleep 60 & echo $!"], tmp_path, dict(os.environ)
    )
    holder = int(await proc.stdout.readline())
    try:
        assert await proc.wait() == 0
        process.kill_leftovers(proc)
        process.release(proc)
        assert await asyncio.wait_for(proc.stdout.read(), 10) == b""
    finally:
        os.kill(holder, signal.SIGKILL)
