"""A job's work dir: a fresh copy of its module, made once the job is granted and removed
in a worker thread once it has ended (neither the report nor the next job waits for that).

Creating files is what costs here (on ext4, each mkdir or new file is 0.1-0.3 ms of
kernel time, measured on the bench machine): `XOOGIFY_WORK_DIR` puts the work dirs
elsewhere, e.g. on a tmpfs, where that is 5 µs (mind the memory then: terraform
providers are copied in too). Default: the system's temporary directory (`TMPDIR`, else
/tmp).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from services.runner.executors.base import copy_module, module_source

WORK_DIR_VARIABLE = "XOOGIFY_WORK_DIR"


def work_root_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """Where work dirs go (None: the system's temporary directory)."""
    value = (os.environ if env is None else env).get(WORK_DIR_VARIABLE)
    return Path(value) if value else None


def _create(source_dir: Path, module_name: str, build_id: int, root: Path | None) -> Path:
    source = module_source(source_dir, module_name)
    path = Path(tempfile.mkdtemp(prefix=f"xoogify-{build_id}-", dir=root))
    try:
        copy_module(source, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


class WorkDir:
    def __init__(self, modules_dir: Path, module_name: str, build_id: int, root: Path | None):
        self._source = (modules_dir, module_name, build_id, root)
        self._path: Path | None = None

    def path(self) -> Path:
        """Made at the first call: the copy of the module (InvalidModule: no such module)."""
        if self._path is None:
            self._path = _create(*self._source)
        return self._path

    async def remove(self) -> None:
        """Delete it (in a worker thread), if it was made."""
        if self._path is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, shutil.rmtree, self._path, True)
