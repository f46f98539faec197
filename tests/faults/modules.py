"""The modules the fault tests run: `trace`, a script module whose every action appends its
build ID to a file and exits 0, fast (one line per execution is the evidence that no job
ran twice), and `sleep`, which runs until it is cancelled."""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("PLAN", "APPLY-AUTO", "DESTROY")


@dataclass(frozen=True)
class Trace:
    modules_dir: Path
    runs_file: Path

    def runs(self) -> Counter[int]:
        """How many times each build was executed."""
        if not self.runs_file.exists():
            return Counter()
        return Counter(int(line) for line in self.runs_file.read_text().split())


def trace_modules(directory: Path) -> Trace:
    module = directory / "trace"
    module.mkdir(parents=True, exist_ok=True)
    runs_file = directory / "runs.txt"
    # One short write with O_APPEND: lines of concurrent jobs never interleave.
    command = f'echo "$XOOGIFY_BUILD_ID" >> {shlex.quote(str(runs_file))}'
    assert "'" not in command  # written as TOML literal strings
    table = "".join(f"{action} = '{command}'\n" for action in ACTIONS)
    (module / "module.toml").write_text("[script]\n" + table)
    # `sleep`: runs until cancelled (a job to send cancels to).
    sleeper = directory / "sleep"
    sleeper.mkdir(exist_ok=True)
    (sleeper / "module.toml").write_text(
        "[script]\n" + "".join(f"{action} = 'sleep 120'\n" for action in ACTIONS)
    )
    return Trace(directory, runs_file)
