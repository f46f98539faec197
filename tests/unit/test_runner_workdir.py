"""A job's work dir: a copy of its module, in `XOOGIFY_WORK_DIR` when set, made when the
job starts and removed after it (nothing when it was never made)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runner.executors.base import InvalidModule
from services.runner.workdir import WorkDir, work_root_from_env


@pytest.fixture
def modules(tmp_path: Path) -> Path:
    module = tmp_path / "modules" / "m"
    module.mkdir(parents=True)
    (module / "module.toml").write_text('[script]\nPLAN = "true"\n')
    (module / "sub").mkdir()
    (module / "sub" / "run.sh").write_text("echo hi\n")
    return tmp_path / "modules"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


async def test_a_fresh_copy_in_the_work_root_removed_after(modules: Path, root: Path) -> None:
    workdir = WorkDir(modules, "m", 12, root)
    assert list(root.iterdir()) == []  # nothing made before the job starts
    path = workdir.path()
    assert workdir.path() == path
    assert path.parent == root and path.name.startswith("xoogify-12-")
    assert (path / "sub" / "run.sh").read_text() == "echo hi\n"
    (path / "out.txt").write_text("a job's own file")
    assert not (modules / "m" / "out.txt").exists()  # never the shared module folder
    await workdir.remove()
    assert list(root.iterdir()) == []


async def test_a_missing_module_is_invalid_and_leaves_nothing(modules: Path, root: Path) -> None:
    workdir = WorkDir(modules, "nope", 13, root)
    with pytest.raises(InvalidModule):
        workdir.path()
    await workdir.remove()  # nothing to remove, no error
    assert list(root.iterdir()) == []


async def test_never_made_nothing_to_remove(modules: Path, root: Path) -> None:
    """A refused claim: the job never started."""
    await WorkDir(modules, "m", 14, root).remove()
    assert list(root.iterdir()) == []


def test_work_root_from_env() -> None:
    assert work_root_from_env({}) is None
    assert work_root_from_env({"XOOGIFY_WORK_DIR": ""}) is None
    assert work_root_from_env({"XOOGIFY_WORK_DIR": "/dev/shm/x"}) == Path("/dev/shm/x")
