"""The `script` kind: `module.toml` names a shell command per action, run with /bin/sh in
the job's copy of the module; variables arrive as XOOGIFY_VAR_<name>."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from services.common.config import Settings
from services.runner.executors.base import AfterRun, Command, InvalidModule, base_env
from services.runner.job import Job

MODULE_FILE = "module.toml"


def read_script_table(module_dir: Path) -> dict[str, str]:
    """The `[script]` table of `module.toml`: action → shell command."""
    path = module_dir / MODULE_FILE
    if not path.is_file():
        raise InvalidModule(f"module has no {MODULE_FILE}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModule(f"{MODULE_FILE} is not valid TOML: {exc}") from None
    table = doc.get("script")
    if not isinstance(table, dict):
        raise InvalidModule(f"{MODULE_FILE} has no [script] table")
    return {key: value for key, value in table.items() if isinstance(value, str)}


def command_for(table: Mapping[str, str], action: str) -> str:
    command = table.get(action, "").strip()
    if not command:
        raise InvalidModule(f"{MODULE_FILE} names no command for {action} in [script]")
    return command


def script_env(job: Job, host_env: Mapping[str, str]) -> dict[str, str]:
    env = base_env(job, host_env)
    for name, value in job.variables.items():
        env[f"XOOGIFY_VAR_{name}"] = value
    return env


class ScriptExecutor:
    kind = "script"

    def prepare(
        self, job: Job, workdir: Path, settings: Settings, host_env: Mapping[str, str]
    ) -> list[Command]:
        command = command_for(read_script_table(workdir), job.action)
        env = script_env(job, host_env)
        return [Command(argv=["/bin/sh", "-c", command], env=env, title=command)]

    async def after_run(
        self,
        job: Job,
        workdir: Path,
        commands: list[Command],
        host_env: Mapping[str, str],
        after: AfterRun,
    ) -> None:
        """A script keeps nothing in its work dir that the runner must save."""
