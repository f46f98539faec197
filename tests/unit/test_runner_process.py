"""Starting a job's process: it carries the death signal (it dies with the runner), its
exit code and output come through the setpriv wrapper unchanged, and a missing program
is an error in the runner, as with a plain exec."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from services.runner import process

# prctl(PR_GET_PDEATHSIG) from inside the child.
_READ_PDEATHSIG = (
    "import ctypes; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)"
)


async def run(argv: list[str], tmp_path: Path) -> tuple[int, bytes]:
    proc = await process.start(argv, tmp_path, dict(os.environ))
    assert proc.stdout is not None
    out = await proc.stdout.read()
    return await proc.wait(), out


async def test_the_child_dies_with_the_runner(tmp_path: Path) -> None:
    code, out = await run([sys.executable, "-c", _READ_PDEATHSIG], tmp_path)
    assert code == 0 and int(out) == signal.SIGKILL


async def test_exit_code_output_and_cwd_pass_through(tmp_path: Path) -> None:
    code, out = await run(["sh", "-c", "pwd; echo oops >&2; exit 3"], tmp_path)
    assert code == 3
    assert out.decode().splitlines() == [str(tmp_path), "oops"]


async def test_a_missing_program_is_an_error_not_an_exit_code(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await run(["no-such-program-xoogify"], tmp_path)
