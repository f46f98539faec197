"""The script executor: module.toml parsing, invalid modules, and the child's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.runner.executors.base import InvalidModule, copy_module, module_source
from services.runner.executors.script import (
    ScriptExecutor,
    command_for,
    read_script_table,
    script_env,
)
from services.runner.job import Job

HOST_ENV = {
    "PATH": "/opt/bin:/usr/bin",
    "HOME": "/home/runner",
    "LANG": "en_US.UTF-8",
    "XOOGIFY_NATS_URL": "nats://secret-host:4222",
    "XOOGIFY_TOKEN": "runner-token",
    "XOOGIFY_DATABASE_URL": "postgresql://x",
    "AWS_SECRET_ACCESS_KEY": "nope",
}


def make_job(**overrides: object) -> Job:
    fields: dict[str, object] = {
        "build_id": 7,
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "APPLY-AUTO",
        "variables": {"region": "eu-west-1", "password": "p4ss"},
        "sensitive": ["password"],
        "timeout_s": 60,
        "attempt": 1,
    }
    fields.update(overrides)
    return Job.from_dispatch(fields)


def write_module(tmp_path: Path, toml: str | None) -> Path:
    module = tmp_path / "mod"
    module.mkdir()
    if toml is not None:
        (module / "module.toml").write_text(toml)
    return module


def test_reads_the_script_table_of_an_example_module() -> None:
    table = read_script_table(EXAMPLE_MODULES_DIR / "hello")
    assert table == {
        "PLAN": "./run.sh plan",
        "APPLY-AUTO": "./run.sh apply",
        "DESTROY": "./run.sh destroy",
    }
    assert command_for(table, "APPLY-AUTO") == "./run.sh apply"


def test_missing_module_toml(tmp_path: Path) -> None:
    with pytest.raises(InvalidModule, match=r"no module\.toml"):
        read_script_table(write_module(tmp_path, None))


def test_module_toml_that_is_not_toml(tmp_path: Path) -> None:
    with pytest.raises(InvalidModule, match="not valid TOML"):
        read_script_table(write_module(tmp_path, "[script\nPLAN = "))


def test_module_toml_without_script_table(tmp_path: Path) -> None:
    with pytest.raises(InvalidModule, match=r"no \[script\] table"):
        read_script_table(write_module(tmp_path, '[other]\nPLAN = "x"\n'))


@pytest.mark.parametrize("toml", ['[script]\nPLAN = "./x"\n', '[script]\nDESTROY = "  "\n'])
def test_no_command_for_the_action(tmp_path: Path, toml: str) -> None:
    table = read_script_table(write_module(tmp_path, toml))
    with pytest.raises(InvalidModule, match="no command for DESTROY"):
        command_for(table, "DESTROY")


def test_non_string_values_are_not_commands(tmp_path: Path) -> None:
    table = read_script_table(write_module(tmp_path, "[script]\nPLAN = 3\n"))
    with pytest.raises(InvalidModule):
        command_for(table, "PLAN")


def test_unknown_module_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidModule, match="'nope' not found"):
        module_source(tmp_path, "nope")


def test_env_has_only_the_basics_the_job_and_its_variables() -> None:
    env = script_env(make_job(), HOST_ENV)
    assert env == {
        "PATH": "/opt/bin:/usr/bin",
        "HOME": "/home/runner",
        "LANG": "en_US.UTF-8",
        "XOOGIFY_BUILD_ID": "7",
        "XOOGIFY_ORGANIZATION": "acme",
        "XOOGIFY_ENVIRONMENT": "stg",
        "XOOGIFY_ACTION": "APPLY-AUTO",
        "XOOGIFY_VAR_region": "eu-west-1",
        "XOOGIFY_VAR_password": "p4ss",
    }
    assert "nats://secret-host:4222" not in env.values()
    assert "runner-token" not in env.values()


def test_env_defaults_when_the_runner_has_no_path_home_or_lang() -> None:
    env = script_env(make_job(variables={}, sensitive=[]), {})
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"] == "/tmp"
    assert env["LANG"] == "C.UTF-8"


def test_prepare_runs_the_action_with_sh_in_the_copy(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    copy_module(module_source(EXAMPLE_MODULES_DIR, "hello"), workdir)
    assert (workdir / "run.sh").exists()
    [command] = ScriptExecutor().prepare(make_job(action="PLAN"), workdir, Settings(), HOST_ENV)
    assert command.argv == ["/bin/sh", "-c", "./run.sh plan"]
    assert command.env["XOOGIFY_ACTION"] == "PLAN"
    assert not any(k in command.env for k in ("XOOGIFY_NATS_URL", "XOOGIFY_TOKEN"))


def test_job_secrets_are_the_sensitive_values() -> None:
    job = make_job(variables={"a": "1", "b": "two", "c": ""}, sensitive=["b", "c"])
    assert job.secrets() == ["two"]
    assert (job.arch, job.kind) == ("amd64", "script")
