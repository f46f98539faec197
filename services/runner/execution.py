"""Running one claimed job: executor commands in order in its work dir, output to the log
stream, and the stop paths (cancel, timeout, drain); then the executor's `after_run`, which
the stop does not cut short. Returns how it ended; the caller reports it (and removes the
work dir)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from services.common import crypto
from services.common.config import Settings
from services.common.jspub import JsPublisher
from services.common.status import Reason
from services.runner import process
from services.runner.control import StopRequest
from services.runner.executors import EXECUTORS
from services.runner.executors.base import Command, InvalidModule
from services.runner.job import Job, Outcome
from services.runner.logstream import LogStream
from services.runner.workdir import WorkDir

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
# After the command ends, how long its output may still take to drain from the pipe.
PUMP_DRAIN_S = 5.0


async def execute(
    pub: JsPublisher, settings: Settings, job: Job, stop: StopRequest, workdir: WorkDir
) -> Outcome:
    """Run `job` in `workdir` to its end and return the outcome; the log's eof chunk is
    acked by then."""
    sealed_error: str | None = None
    try:
        # Opened only now, so the clear values live in this process just for the run.
        job = job.opened(settings.secrets_private_key)
    except crypto.SecretsError as exc:
        sealed_error = str(exc)
    stream = LogStream(
        pub,
        settings.subjects.log(job.build_id),
        job.build_id,
        job.attempt,
        job.secrets(),
        settings.log_cap_bytes,
    )
    async with stream as logs:
        if sealed_error is not None:
            log.warning("sensitive values did not open", extra={"build_id": job.build_id})
            await logs.note(f"[xoogify] the sensitive values did not open: {sealed_error}")
            outcome = Outcome(reason=Reason.INTERNAL)
        else:
            try:
                outcome = await _run(settings, job, stop, logs, workdir)
            except Exception as exc:
                log.exception("job failed inside the runner", extra={"build_id": job.build_id})
                await logs.note(f"[xoogify] internal error in the runner: {exc!r}")
                outcome = Outcome(reason=Reason.INTERNAL)
        await logs.close()
    return outcome


async def _run(
    settings: Settings, job: Job, stop: StopRequest, logs: LogStream, workdir: WorkDir
) -> Outcome:
    executor = EXECUTORS.get(job.kind)
    if executor is None:
        await logs.note(f"[xoogify] this runner has no executor for kind {job.kind!r}")
        return Outcome(reason=Reason.INVALID_MODULE)
    try:
        path = workdir.path()
        commands = executor.prepare(job, path, settings, os.environ)
    except InvalidModule as exc:
        await logs.note(f"[xoogify] invalid module: {exc}")
        return Outcome(reason=Reason.INVALID_MODULE)
    timer = asyncio.get_running_loop().call_later(
        job.timeout_s, stop.stop, Reason.TIMEOUT, f"timeout of {job.timeout_s}s reached"
    )
    try:
        outcome = await _run_commands(commands, path, settings, stop, logs)
    finally:
        timer.cancel()
    try:
        await executor.after_run(job, path, commands, os.environ, _After(path, settings, logs))
    except Exception as exc:
        # The job ended as `outcome` says, whatever became of what it left.
        log.exception("after_run failed", extra={"build_id": job.build_id})
        await logs.note(f"[xoogify] internal error in the runner after the run: {exc!r}")
    return outcome


async def _run_commands(
    commands: list[Command], path: Path, settings: Settings, stop: StopRequest, logs: LogStream
) -> Outcome:
    for command in commands:
        if stop.requested:
            # Stopped between two commands (or before the first): nothing to kill.
            await logs.note(f"[xoogify] {stop.why}: not starting {command.title!r}")
            return Outcome(reason=stop.reason)
        exit_code, stopped = await _run_command(command, path, settings, stop, logs)
        if stopped:
            return Outcome(reason=stop.reason)
        if exit_code != 0:
            return Outcome(exit_code=exit_code)
    return Outcome(exit_code=0)


class _After:
    """executors.base.AfterRun: commands after the job's own, which its stop (asked
    already, maybe: a cancelled apply) must not interrupt; each has its own time limit."""

    def __init__(self, path: Path, settings: Settings, logs: LogStream) -> None:
        self._path, self._settings, self._logs = path, settings, logs

    async def note(self, text: str) -> None:
        await self._logs.note(text)

    async def run(self, command: Command, limit_s: float) -> int | None:
        own = StopRequest()
        timer = asyncio.get_running_loop().call_later(
            limit_s, own.stop, Reason.TIMEOUT, f"{command.title!r} ran over {limit_s:g}s"
        )
        try:
            exit_code, stopped = await _run_command(
                command, self._path, self._settings, own, self._logs
            )
        finally:
            timer.cancel()
        return None if stopped else exit_code


async def _run_command(
    command: Command, workdir: Path, settings: Settings, stop: StopRequest, logs: LogStream
) -> tuple[int, bool]:
    """Run one command; returns its exit code and whether the runner stopped it."""
    proc = await process.start(command.argv, workdir, command.env)
    pump = asyncio.create_task(_pump(proc.stdout, logs))
    stopper = asyncio.create_task(stop.wait())
    try:
        # The exit is the process's own future (asyncio.wait never cancels it): no task.
        first: set[asyncio.Future[Any]] = {proc.exited, stopper}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        stopped = not proc.exited.done()
        if stopped:
            grace = settings.cancel_grace_s
            await logs.note(
                f"[xoogify] {stop.why}: stopping the process (SIGINT, SIGKILL after {grace:g}s)"
            )
            killed = await process.stop_group(proc, grace)
            if killed:
                await logs.note("[xoogify] the process did not stop in time; killed")
            else:
                await logs.note("[xoogify] the process stopped")
        exit_code = process.shell_exit_code(await proc.wait())
        process.kill_leftovers(proc)
        if not pump.done():
            # asyncio.wait, not wait_for: the pump keeps running past the timeout, until
            # the finally below.
            await asyncio.wait({pump}, timeout=PUMP_DRAIN_S)
        if not pump.done():
            # Something outside the process group still holds the pipe open.
            log.warning("output pipe still open after the command ended")
        else:
            pump.result()  # a failed log write fails the job, as before
        return exit_code, stopped
    finally:
        # Also on cancellation of the runner itself: nothing of the job survives it.
        process.kill_leftovers(proc)
        # Only now: every process of the group has its SIGKILL, so the pgid can be recycled.
        process.release(proc)
        for task in (pump, stopper):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.gather(pump, stopper, return_exceptions=True)


async def _pump(stream: asyncio.StreamReader, logs: LogStream) -> None:
    while True:
        data = await stream.read(READ_BYTES)
        if not data:
            return
        await logs.write(data)
