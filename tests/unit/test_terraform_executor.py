"""The terraform executor without servers: the commands per action, the child's
environment, the backend file and CLI config it writes, and the modules it refuses."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from services.common import state_auth
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.runner.executors import EXECUTORS
from services.runner.executors.base import Command, InvalidModule, copy_module, module_source
from services.runner.executors.terraform import (
    BACKEND_BLOCK,
    BACKEND_FILE,
    CLI_CONFIG_FILE,
    ERRORED_STATE,
    KEPT_STATE_DIR,
    PUSH_LIMIT_S,
    TerraformExecutor,
    cli_config,
    declared_backend,
    terraform_env,
)
from services.runner.job import Job
from services.runner.masking import Masker

FAKE_TF = "/opt/tf/terraform"
STATE = state_auth.issue("s3cret", "http://gw:8000", 7, "acme", "stg", "network").as_dict()
HOST_ENV = {
    "PATH": "/opt/bin:/usr/bin",
    "HOME": "/home/runner",
    "LANG": "en_US.UTF-8",
    "XOOGIFY_NATS_URL": "nats://secret-host:4222",
    "XOOGIFY_TOKEN": "runner-token",
    "XOOGIFY_STATE_SECRET": "s3cret",
    "XOOGIFY_TERRAFORM_BIN": FAKE_TF,
    "TF_CLI_CONFIG_FILE": "/root/.terraformrc",
    "TF_LOG": "TRACE",
    "AWS_SECRET_ACCESS_KEY": "nope",
}


def make_job(**overrides: object) -> Job:
    fields: dict[str, object] = {
        "build_id": 7,
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/terraform",
        "module_name": "network",
        "action": "APPLY-AUTO",
        "variables": {"name": "core", "cidr": "10.1.0.0/16"},
        "sensitive": [],
        "timeout_s": 60,
        "attempt": 1,
        "state": STATE,
    }
    fields.update(overrides)
    return Job.from_dispatch(fields)


@pytest.fixture
def fake_terraform(tmp_path: Path) -> dict[str, str]:
    """A host env whose configured binary exists (prepare only checks that it is there)."""
    binary = tmp_path / "bin" / "terraform"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return {**HOST_ENV, "XOOGIFY_TERRAFORM_BIN": str(binary)}


def network_copy(tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir()
    copy_module(module_source(EXAMPLE_MODULES_DIR, "network"), workdir)
    return workdir


def test_registered_for_the_terraform_kind() -> None:
    assert isinstance(EXECUTORS["terraform"], TerraformExecutor)


@pytest.mark.parametrize(
    ("action", "args"),
    [
        ("PLAN", ["plan", "-input=false", "-lock=false"]),
        ("APPLY-AUTO", ["apply", "-input=false", "-auto-approve"]),
        ("DESTROY", ["destroy", "-input=false", "-auto-approve"]),
    ],
)
def test_init_then_the_action(
    tmp_path: Path, fake_terraform: dict[str, str], action: str, args: list[str]
) -> None:
    workdir = network_copy(tmp_path)
    init, run = TerraformExecutor().prepare(
        make_job(action=action), workdir, Settings(), fake_terraform
    )
    binary = fake_terraform["XOOGIFY_TERRAFORM_BIN"]
    assert init.argv == [binary, "init", "-input=false"]
    assert run.argv == [binary, *args]
    # Colours are kept: the log shows them.
    assert not any("-no-color" in a for a in init.argv + run.argv)
    assert run.title == "terraform " + " ".join(args)


def test_credentials_are_never_on_the_command_line(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    commands = TerraformExecutor().prepare(
        make_job(), network_copy(tmp_path), Settings(), fake_terraform
    )
    for command in commands:
        assert STATE["password"] not in " ".join(command.argv) + command.title
        assert command.env["TF_HTTP_PASSWORD"] == STATE["password"]


def test_env_is_built_from_nothing(tmp_path: Path) -> None:
    env = terraform_env(make_job(), HOST_ENV, tmp_path / "cli.tfrc")
    address = "http://gw:8000/api/state/acme/stg/network"
    assert env == {
        "PATH": "/opt/bin:/usr/bin",
        "HOME": "/home/runner",
        "LANG": "en_US.UTF-8",
        "XOOGIFY_BUILD_ID": "7",
        "XOOGIFY_ORGANIZATION": "acme",
        "XOOGIFY_ENVIRONMENT": "stg",
        "XOOGIFY_ACTION": "APPLY-AUTO",
        "TF_VAR_name": "core",
        "TF_VAR_cidr": "10.1.0.0/16",
        "TF_HTTP_ADDRESS": address,
        "TF_HTTP_LOCK_ADDRESS": address,
        "TF_HTTP_UNLOCK_ADDRESS": address,
        "TF_HTTP_USERNAME": "build-7",
        "TF_HTTP_PASSWORD": STATE["password"],
        "TF_HTTP_RETRY_MAX": "6",
        "TF_CLI_CONFIG_FILE": str(tmp_path / "cli.tfrc"),
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "CHECKPOINT_DISABLE": "1",
    }
    # Nothing of the runner's own settings or the host's Terraform config leaks in.
    for value in ("nats://secret-host:4222", "runner-token", "s3cret", "/root/.terraformrc"):
        assert value not in env.values()


def test_a_job_without_state_credentials_does_not_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no state backend credentials"):
        terraform_env(make_job(state=None), HOST_ENV, tmp_path / "cli.tfrc")


def test_writes_the_http_backend_and_its_own_cli_config(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    workdir = network_copy(tmp_path)
    mirror = tmp_path / "mirror"
    [init, _] = TerraformExecutor().prepare(
        make_job(), workdir, Settings(tf_plugin_mirror=mirror), fake_terraform
    )
    assert (workdir / BACKEND_FILE).read_text() == BACKEND_BLOCK
    assert declared_backend(workdir) == "http"
    config = workdir / CLI_CONFIG_FILE
    assert init.env["TF_CLI_CONFIG_FILE"] == str(config)
    assert config.read_text() == cli_config(mirror)
    # The shared module folder is untouched.
    assert not (EXAMPLE_MODULES_DIR / "network" / BACKEND_FILE).exists()


def test_cli_config_points_at_the_mirror_only_when_set(tmp_path: Path) -> None:
    text = cli_config(tmp_path / "mir")
    assert f'path    = "{tmp_path / "mir"}"' in text
    assert 'include = ["registry.terraform.io/*/*"]' in text
    assert 'exclude = ["registry.terraform.io/*/*"]' in text
    assert "provider_installation" not in cli_config(None)


def test_a_module_declaring_the_http_backend_keeps_its_own(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "main.tf").write_text('terraform {\n  backend "http" {\n  }\n}\n')
    TerraformExecutor().prepare(make_job(), workdir, Settings(), fake_terraform)
    assert not (workdir / BACKEND_FILE).exists()


def test_a_commented_out_backend_does_not_count(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text(
        '# backend "s3" {}\n// backend "gcs" {}\n/* backend "local" {} */\nlocals {}\n'
    )
    assert declared_backend(tmp_path) is None


def test_a_module_with_another_backend_is_invalid(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "main.tf").write_text('terraform {\n  backend "s3" {}\n}\n')
    with pytest.raises(InvalidModule, match='declares a "s3" backend'):
        TerraformExecutor().prepare(make_job(), workdir, Settings(), fake_terraform)


def test_a_module_without_tf_files_is_invalid(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "README.md").write_text("not terraform")
    with pytest.raises(InvalidModule, match=r"no \*\.tf files"):
        TerraformExecutor().prepare(make_job(), workdir, Settings(), fake_terraform)


def test_no_terraform_binary_is_invalid(tmp_path: Path) -> None:
    host = {**HOST_ENV, "XOOGIFY_TERRAFORM_BIN": str(tmp_path / "missing")}
    with pytest.raises(InvalidModule, match="no terraform binary"):
        TerraformExecutor().prepare(make_job(), network_copy(tmp_path), Settings(), host)


def test_the_state_password_is_masked_in_the_log() -> None:
    job = make_job(variables={"token": "t0k"}, sensitive=["token"])
    assert job.secrets() == ["t0k", STATE["password"]]
    assert make_job(state=None, variables={}, sensitive=[]).secrets() == []


def test_a_long_secret_does_not_hold_back_lines_that_cannot_start_it() -> None:
    # Every terraform job masks its 64-character state password: live output that cannot
    # begin it must still be published at once.
    masker = Masker([STATE["password"]])
    assert masker.feed("null_resource.slow (local-exec): started\n") == (
        "null_resource.slow (local-exec): started\n"
    )
    head = STATE["password"][:10]
    assert masker.feed(f"pw={head}") == "pw="
    assert masker.feed(STATE["password"][10:] + " done\n") == "*** done\n"


class FakeAfter:
    """executors.base.AfterRun that records; `run` answers `exit_code` (or raises it)."""

    def __init__(self, exit_code: int | BaseException | None) -> None:
        self.exit_code = exit_code
        self.notes: list[str] = []
        self.ran: list[tuple[Command, float]] = []

    async def note(self, text: str) -> None:
        self.notes.append(text)

    async def run(self, command: Command, limit_s: float) -> int | None:
        self.ran.append((command, limit_s))
        if isinstance(self.exit_code, BaseException):
            raise self.exit_code
        return self.exit_code


ERRORED = '{"version": 4, "serial": 3, "lineage": "l-1", "resources": [{"type": "x"}]}'


def applied_with_errored_state(
    tmp_path: Path, fake_terraform: dict[str, str], action: str = "APPLY-AUTO"
) -> tuple[Job, Path, list[Command]]:
    job = make_job(action=action)
    workdir = network_copy(tmp_path)
    commands = TerraformExecutor().prepare(job, workdir, Settings(), fake_terraform)
    (workdir / ERRORED_STATE).write_text(ERRORED)  # what the apply left
    return job, workdir, commands


@pytest.mark.parametrize("action", ["APPLY-AUTO", "DESTROY"])
async def test_an_errored_state_is_pushed_as_the_job_with_its_lock(
    tmp_path: Path, fake_terraform: dict[str, str], action: str
) -> None:
    job, workdir, commands = applied_with_errored_state(tmp_path, fake_terraform, action)
    after = FakeAfter(0)
    await TerraformExecutor().after_run(job, workdir, commands, fake_terraform, after)
    [(push, limit)] = after.ran
    # The apply's binary and environment (its backend credentials); the lock taken, no
    # -force: Terraform refuses another lineage or an older serial than the stored one.
    assert push.argv == [commands[-1].argv[0], "state", "push", ERRORED_STATE]
    assert push.env == commands[-1].env
    assert limit == PUSH_LIMIT_S
    assert after.notes[-1].startswith("[xoogify] uploaded errored.tfstate")
    assert all(ERRORED not in note for note in after.notes)


@pytest.mark.parametrize(
    ("exit_code", "why"),
    [
        (1, "terraform state push exited with 1"),
        (None, f"terraform state push took over {PUSH_LIMIT_S:g}s"),
        (OSError("no such file"), "terraform did not start: no such file"),
    ],
)
async def test_an_errored_state_not_uploaded_is_moved_out_of_the_work_dir(
    tmp_path: Path, fake_terraform: dict[str, str], exit_code: int | OSError | None, why: str
) -> None:
    job, workdir, commands = applied_with_errored_state(tmp_path, fake_terraform)
    after = FakeAfter(exit_code)
    await TerraformExecutor().after_run(job, workdir, commands, fake_terraform, after)
    # Beside the work dirs by default, under a name that says which job left it.
    kept = tmp_path / KEPT_STATE_DIR / "build-7-attempt-1.errored.tfstate"
    assert kept.read_text() == ERRORED
    assert not (workdir / ERRORED_STATE).exists()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert after.notes[-1].startswith(
        f"[xoogify] could not upload errored.tfstate ({why}); it is kept on this runner at {kept}. "
    )


async def test_a_push_cut_short_by_the_runner_stopping_keeps_the_file(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    job, workdir, commands = applied_with_errored_state(tmp_path, fake_terraform)
    with pytest.raises(asyncio.CancelledError):
        await TerraformExecutor().after_run(
            job, workdir, commands, fake_terraform, FakeAfter(asyncio.CancelledError())
        )
    kept = tmp_path / KEPT_STATE_DIR / "build-7-attempt-1.errored.tfstate"
    assert kept.read_text() == ERRORED


async def test_the_kept_state_folder_is_configurable(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    job, workdir, commands = applied_with_errored_state(tmp_path, fake_terraform)
    env = {**fake_terraform, "XOOGIFY_KEPT_STATE_DIR": str(tmp_path / "safe")}
    await TerraformExecutor().after_run(job, workdir, commands, env, FakeAfter(1))
    assert (tmp_path / "safe" / "build-7-attempt-1.errored.tfstate").read_text() == ERRORED


async def test_no_errored_state_or_a_plan_uploads_nothing(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    job, workdir, commands = applied_with_errored_state(tmp_path, fake_terraform, "PLAN")
    after = FakeAfter(0)
    await TerraformExecutor().after_run(job, workdir, commands, fake_terraform, after)
    (workdir / ERRORED_STATE).unlink()
    await TerraformExecutor().after_run(make_job(), workdir, commands, fake_terraform, after)
    assert (after.ran, after.notes) == ([], [])


def test_an_errored_state_shipped_with_the_module_is_not_the_jobs(
    tmp_path: Path, fake_terraform: dict[str, str]
) -> None:
    workdir = network_copy(tmp_path)
    (workdir / ERRORED_STATE).write_text(ERRORED)  # someone's local run, copied in
    TerraformExecutor().prepare(make_job(), workdir, Settings(), fake_terraform)
    assert not (workdir / ERRORED_STATE).exists()
