"""Executors: what turns a job of some kind into the commands that run it.

`EXECUTORS` maps a kind (the part of `module_type` after the slash) to its executor; a
kind without an executor is not pulled by the runner.
"""

from __future__ import annotations

from services.runner.executors.base import Executor
from services.runner.executors.script import ScriptExecutor
from services.runner.executors.terraform import TerraformExecutor

EXECUTORS: dict[str, Executor] = {
    "script": ScriptExecutor(),
    "terraform": TerraformExecutor(),
}
