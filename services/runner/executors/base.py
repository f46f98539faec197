"""The executor interface, and what every executor shares: finding the module, the fresh
work dir, and the child's environment built from nothing (never the runner's own).

An executor turns a job plus a work dir holding a fresh copy of the module into a list of
commands; the runner runs them in order and stops at the first that fails. A terraform
executor fits the same shape (init, then plan/apply/destroy). Once they have ended, however
(failed, stopped, timed out), the executor may save what the run left in the work dir
before the work dir is removed (`after_run`: Terraform's errored.tfstate).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.config import Settings
from services.runner.job import Job

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class InvalidModule(Exception):
    """The module cannot run this job; the message is written to the job's log."""


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    # Shown in the job's log before the command starts.
    title: str


class AfterRun(Protocol):
    """What `Executor.after_run` may do with the job's log and processes."""

    async def note(self, text: str) -> None:
        """A line of the runner's own in the job's log."""
        ...

    async def run(self, command: Command, limit_s: float) -> int | None:
        """Run `command` in the work dir, output to the log; the job's stop (already asked,
        maybe) does not reach it, `limit_s` does. Its exit code, None if the limit
        stopped it."""
        ...


class Executor(Protocol):
    kind: str

    def prepare(
        self, job: Job, workdir: Path, settings: Settings, host_env: Mapping[str, str]
    ) -> list[Command]:
        """The commands that run `job` in `workdir`; raise InvalidModule if it cannot run."""
        ...

    async def after_run(
        self,
        job: Job,
        workdir: Path,
        commands: list[Command],
        host_env: Mapping[str, str],
        after: AfterRun,
    ) -> None:
        """Once `commands` have ended, however, and before `workdir` is removed: save what
        the run left there that must not be lost. Never changes how the job ended."""
        ...


def module_source(modules_dir: Path, module_name: str) -> Path:
    source = modules_dir / module_name
    if not source.is_dir():
        raise InvalidModule(f"module {module_name!r} not found in {modules_dir}")
    return source


def copy_module(source: Path, workdir: Path) -> None:
    """Fill the (empty) work dir with a copy of the module, so a job never writes into the
    shared module folder."""
    shutil.copytree(source, workdir, symlinks=True, dirs_exist_ok=True)


def base_env(job: Job, host_env: Mapping[str, str]) -> dict[str, str]:
    """PATH, HOME, LANG and the job's identity; nothing else of the runner's environment
    (no NATS URL, token or other XOOGIFY_* setting) reaches the child."""
    return {
        "PATH": host_env.get("PATH") or DEFAULT_PATH,
        "HOME": host_env.get("HOME") or "/tmp",
        "LANG": host_env.get("LANG") or "C.UTF-8",
        "XOOGIFY_BUILD_ID": str(job.build_id),
        "XOOGIFY_ORGANIZATION": job.organization,
        "XOOGIFY_ENVIRONMENT": job.environment,
        "XOOGIFY_ACTION": job.action,
    }
