"""Starting a job's command in its own process group, and stopping the whole group.

The child gets PR_SET_PDEATHSIG, so it dies with the runner; stdin is /dev/null and
stderr is merged into stdout. Stopping is SIGINT to the group, a grace period, then
SIGKILL: the command's own children go too.

The death signal is set by `setpriv --pdeathsig KILL` (util-linux), which then execs the
command. A `preexec_fn` would do it too, but forces CPython to fork (copying the runner's
page tables) instead of vfork: measured here, spawn + wait of `true` from a 40 MB process
took 5.1-5.4 ms with `preexec_fn` and 2.1-2.3 ms through setpriv. Without a setpriv that
knows `--pdeathsig`, the runner falls back to `preexec_fn`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
from pathlib import Path

# libc is resolved here, once, in the runner: the hook below runs in the child between fork
# and exec, where `services.common.children.pdeathsig_preexec` would first look libc up
# (`find_library` starts an `ldconfig` process) - slower, and unwise in a forked child.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_runner() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@functools.cache
def _pdeathsig_wrapper() -> tuple[str, ...] | None:
    """The setpriv prefix that sets the death signal, if this machine's setpriv has it."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = (setpriv, "--pdeathsig", "KILL", "--")
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if done.returncode == 0 else None


def _resolve(program: str, env: dict[str, str]) -> str:
    """The program's path as exec would find it with the child's PATH; FileNotFoundError
    (as Popen raises) when there is none, rather than setpriv's exit code 127."""
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(2, "No such file or directory", program)
    return found


async def start(argv: list[str], cwd: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    wrapper = _pdeathsig_wrapper()
    if wrapper is not None:
        # Spawned from the event loop's thread: the death signal follows the thread that
        # started the child, which lives as long as the runner.
        argv = [*wrapper, _resolve(argv[0], env), *argv[1:]]
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_runner if wrapper is None else None,
    )


def signal_group(proc: asyncio.subprocess.Process, sig: int) -> bool:
    """Send `sig` to the process group of `proc` (its pgid is its pid: a new session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def stop_group(proc: asyncio.subprocess.Process, grace_s: float) -> bool:
    """SIGINT the group, wait up to `grace_s` for the command to end, then SIGKILL the
    group. Returns True if it had to kill."""
    signal_group(proc, signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
        killed = False
    except TimeoutError:
        killed = True
    # Whatever is left of the group (children that ignored SIGINT) goes now.
    signal_group(proc, signal.SIGKILL)
    await proc.wait()
    return killed


def kill_leftovers(proc: asyncio.subprocess.Process) -> None:
    """After the command ended: background children it left in its group would keep the
    output pipe open, so they go too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def shell_exit_code(returncode: int) -> int:
    """asyncio says -N for "killed by signal N"; users know the shell's 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
