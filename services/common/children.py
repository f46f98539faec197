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
