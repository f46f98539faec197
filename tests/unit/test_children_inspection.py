"""A process that holds keys can make itself non-dumpable (services.common.children)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
from services.common.children import dumpable, forbid_inspection
before = dumpable()
forbid_inspection()
print(before, dumpable())
"""


def test_forbid_inspection_makes_the_process_non_dumpable() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.split() == ["True", "False"]
