"""Child processes that die with their parent (PR_SET_PDEATHSIG), so nothing is left behind."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal

_PR_SET_PDEATHSIG = 1
# Looked up once here: doing it in the forked child would run ldconfig there.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def pdeathsig_preexec(sig: int = signal.SIGKILL) -> None:
    """Run in the child between fork and exec: ask the kernel to signal it when we die."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def forbid_inspection() -> None:
    """Make this process non-dumpable: other processes of the same user (a job's process,
    above all) can no longer ptrace it or read its /proc/<pid>/environ and memory, where
    its keys are; no core dump holds them either. Root still can. Children are dumpable
    again after their exec, as usual."""
    _LIBC.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def dumpable() -> bool:
    return bool(_LIBC.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
