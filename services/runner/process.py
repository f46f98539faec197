"""Starting a job's command in its own process group, and stopping the whole group.

The child gets PR_SET_PDEATHSIG, so it dies with the runner; stdin is /dev/null and
stderr is merged into stdout. Stopping is SIGINT to the group, a grace period, then
SIGKILL: the command's own children go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from pathlib import Path

# libc is resolved here, once, in the runner: the hook below runs in the child between fork
# and exec, where `services.common.children.pdeathsig_preexec` would first look libc up
# (`find_library` starts an `ldconfig` process) - slower, and unwise in a forked child.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_runner() -> None:
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def start(argv: list[str], cwd: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_runner,
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
