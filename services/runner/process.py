"""Starting a job's command in its own process group, and stopping the whole group.

Each command is a new session (its pgid is its pid); stdin is /dev/null and stderr is
merged into stdout. Stopping is SIGINT to the group, a grace period, then SIGKILL: the
command's own children go too.

Dying with the runner: a SIGKILLed runner must not leave its job running unsupervised
while the scheduler fails it `runner-lost` (and maybe runs it again). The runner keeps
one reaper process (`reaper.py`) for its whole life, holding the read end of a pipe:
right after each spawn the runner writes the new group to it, and once the command has
ended (and its group was SIGKILLed) writes that it is gone, so a recycled pgid is never
killed. When the runner dies the pipe reaches end of file and the reaper SIGKILLs every
group it still holds - grandchildren of the job included, which PR_SET_PDEATHSIG (set on
the direct child only) never reached. The spawn itself then needs no wrapper and no
`preexec_fn`, so CPython uses vfork: measured here, `setpriv --pdeathsig` cost about
0.6 ms of CPU and 0.7 ms of wall time per command (it loads locales and libcap-ng).

The window: a runner SIGKILLed after the fork but before the pgid reached the pipe (from
the child's exec to `Popen` returning: microseconds) leaves that command running. setpriv
had its own: its prctl ran after fork and exec, and a runner dying before that left the
command without a death signal.

If the reaper cannot be started (or dies and cannot be restarted), commands fall back to
`setpriv --pdeathsig KILL --`, and where setpriv lacks the option to a `preexec_fn`
(which forces a fork of the ≈ 40 MB runner: 5.1-5.4 ms against 2.1-2.3 ms for spawn + wait
of `true`).

Spawning and watching: the runner runs on uvloop (native socket I/O and timers for
nats-py), whose own `subprocess_exec` forks through libuv (6.5 ms against 2.2 ms). So
commands are started by `subprocess.Popen` (CPython's vfork) and attached to the loop
here: the output pipe as a read-pipe transport feeding a `StreamReader`, the exit through
a pidfd that becomes readable when the process ends (then reaped without blocking). No
thread, no SIGCHLD handler, on either loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from services.runner import reaper as reaper_program

log = logging.getLogger(__name__)

# libc is resolved here, once, in the runner: the hook below runs in the child between fork
# and exec, where `services.common.children.pdeathsig_preexec` would first look libc up
# (`find_library` starts an `ldconfig` process) - slower, and unwise in a forked child.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class Reaper:
    """The runner's end of the reaper: the process and the pipe's write end."""

    def __init__(self) -> None:
        read_end, self._fd = os.pipe()  # both close-on-exec: no job inherits the write end
        try:
            self.proc = subprocess.Popen(
                # -I -S: no site packages, no environment, no current directory on the path:
                # a bare interpreter running one small stdlib-only file.
                [sys.executable, "-I", "-S", reaper_program.__file__],
                stdin=read_end,
                stdout=subprocess.PIPE,
                cwd="/",
                # Its own session: a signal to the runner's process group (a terminal's,
                # a test harness's) must not end it before the runner.
                start_new_session=True,
            )
        except BaseException:
            os.close(self._fd)
            raise
        finally:
            os.close(read_end)
        self.held: set[int] = set()
        try:
            self._wait_ready()
        except BaseException:
            self.close(timeout=0)
            self.proc.kill()
            self.proc.wait()
            raise

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Until the reaper says it runs (and ignores the stop signals): a reaper that
        could not start is known now, before any job relies on it."""
        assert self.proc.stdout is not None
        with self.proc.stdout:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            said = self.proc.stdout.read(len(reaper_program.READY)) if ready else b""
        if said != reaper_program.READY:
            raise OSError(f"the reaper did not start (it said {said!r})")

    def _send(self, line: bytes) -> None:
        # A few bytes to a pipe the reaper keeps reading: atomic, and never blocks for long.
        os.write(self._fd, line)

    def hold(self, pgid: int) -> None:
        self._send(b"+%d\n" % pgid)
        self.held.add(pgid)

    def release(self, pgid: int) -> None:
        if pgid in self.held:
            self.held.discard(pgid)
            self._send(b"-%d\n" % pgid)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pipe (the reaper kills what it still holds, then exits) and reap it."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)


_reaper: Reaper | None = None
_reaper_failed = False


def start_reaper() -> Reaper | None:
    """The runner's reaper, started now if it is not running; None (logged once) if it
    cannot be started: commands then get setpriv's death signal instead."""
    global _reaper, _reaper_failed
    if _reaper is not None:
        return _reaper
    if _reaper_failed:
        return None
    try:
        if not sys.executable:
            raise OSError("no interpreter to run the reaper with (sys.executable is empty)")
        _reaper = Reaper()
        # A process that never called close_reaper (tests running a runner in-process)
        # still closes it cleanly at its exit; once, however many reapers it had.
        atexit.unregister(close_reaper)
        atexit.register(close_reaper)
    except OSError as exc:
        _reaper_failed = True
        log.error(
            "could not start the reaper; jobs get setpriv's death signal instead",
            extra={"error": repr(exc)},
        )
        return None
    return _reaper


def close_reaper() -> None:
    """At the runner's clean end, after its jobs ended: the reaper then kills nothing."""
    global _reaper
    if _reaper is not None:
        reaper, _reaper = _reaper, None
        reaper.close()


def _hold(pgid: int) -> None:
    """Tell the reaper about a new group; if it died, start another one and give it every
    group still held. Raises OSError when no reaper can be had."""
    global _reaper
    reaper = _reaper
    assert reaper is not None
    try:
        reaper.hold(pgid)
        return
    except OSError as exc:
        log.error("the reaper is gone; starting another", extra={"error": repr(exc)})
    held = reaper.held | {pgid}
    reaper.close(timeout=0)
    _reaper = None
    new = start_reaper()
    if new is None:
        raise OSError("no reaper")
    for group in held:
        new.hold(group)


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


class Child:
    """A started command on the running loop: `stdout` (stderr merged in) reads to end of
    file, `wait()` gives the exit code as `Popen` says it (-N: killed by signal N)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = asyncio.StreamReader()
        self._pipe: asyncio.ReadTransport | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfds (kernels before 5.3): a thread waits instead, one per command.
            self._wait_in_thread()
        else:
            loop.add_reader(pidfd, self._ended, pidfd)
        protocol = asyncio.StreamReaderProtocol(self.stdout)
        assert self._popen.stdout is not None
        self._pipe, _ = await loop.connect_read_pipe(lambda: protocol, self._popen.stdout)

    def _ended(self, pidfd: int) -> None:
        """The pidfd is readable: the process has ended and waits to be reaped."""
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        if self._popen.poll() is None:
            # Not reapable yet after all: never wrongly report an exit, wait for it.
            self._wait_in_thread()
        else:
            self._reaped()

    def _wait_in_thread(self) -> None:
        waiting = asyncio.get_running_loop().run_in_executor(None, self._popen.wait)
        waiting.add_done_callback(lambda _: self._reaped())

    def _reaped(self) -> None:
        code = self._popen.returncode
        assert code is not None  # poll() or wait() set it
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def exited(self) -> asyncio.Future[int]:
        """Done with the exit code once the process ended. Await `wait()` instead where
        the awaiting may be cancelled: cancelling this future would lose the exit."""
        return self._exited

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        # Shielded: a caller's timeout (stop_group's grace) must not cancel the exit for
        # everyone else waiting on it.
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        """Stop reading the output pipe: also when something outside the group still
        holds its write end (the pipe would otherwise stay open in the runner)."""
        if self._pipe is not None:
            self._pipe.close()
        elif self._popen.stdout is not None:
            self._popen.stdout.close()


async def start(argv: list[str], cwd: Path, env: dict[str, str]) -> Child:
    reaper = start_reaper()
    wrapper = _pdeathsig_wrapper() if reaper is None else None
    if wrapper is not None:
        # Spawned from the event loop's thread: the death signal follows the thread that
        # started the child, which lives as long as the runner.
        argv = [*wrapper, _resolve(argv[0], env), *argv[1:]]
    popen = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_runner if reaper is None and wrapper is None else None,
    )
    child = Child(popen)
    try:
        if reaper is not None:
            _hold(child.pid)
        await child._attach()
    except BaseException:
        # Nothing would end it with the runner, or nothing would see it end: it must not
        # run at all.
        kill_leftovers(child)
        popen.wait()
        release(child)
        raise
    return child


def release(proc: Child) -> None:
    """The command's group is gone (or SIGKILLed): the reaper forgets it, so a later
    process that gets the same pgid is never killed; its output pipe is closed."""
    proc.close()
    if _reaper is not None:
        try:
            _reaper.release(proc.pid)
        except OSError as exc:
            # The next start finds the reaper gone and starts another one.
            log.error("could not tell the reaper a job ended", extra={"error": repr(exc)})


def signal_group(proc: Child, sig: int) -> bool:
    """Send `sig` to the process group of `proc` (its pgid is its pid: a new session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def stop_group(proc: Child, grace_s: float) -> bool:
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


def kill_leftovers(proc: Child) -> None:
    """After the command ended: background children it left in its group would keep the
    output pipe open, so they go too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def shell_exit_code(returncode: int) -> int:
    """Popen says -N for "killed by signal N"; users know the shell's 128 + N."""
    return 128 - returncode if returncode < 0 else returncode
