"""A job's work dir: a copy of its module made in a worker thread (so it can overlap the
claim), in `XOOGIFY_WORK_DIR` when set; removed whether the job ran or not."""

from __future__ import annotations

import asyncio
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


async def test_a_fresh_copy_in_the_work_root_removed_after(modules: Path, tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    workdir = WorkDir(modules, "m", 12, root)
    path = await workdir.path()
    assert path.parent == root and path.name.startswith("xoogify-12-")
    assert (path / "sub" / "run.sh").read_text() == "echo hi\n"
    (path / "out.txt").write_text("a job's own file")
    assert not (modules / "m" / "out.txt").exists()  # never the shared module folder
    await workdir.remove()
    assert list(root.iterdir()) == []


async def test_a_missing_module_is_invalid_and_leaves_nothing(
    modules: Path, tmp_path: Path
) -> None:
    root = tmp_path / "work"
    root.mkdir()
    workdir = WorkDir(modules, "nope", 13, root)
    with pytest.raises(InvalidModule):
        await workdir.path()
    await workdir.remove()  # nothing to remove, no error
    assert list(root.iterdir()) == []


async def test_removed_even_when_nobody_waited_for_it(modules: Path, tmp_path: Path) -> None:
    """A refused claim, or the job's task cancelled while the copy was being made."""
    root = tmp_path / "work"
    root.mkdir()
    workdir = WorkDir(modules, "m", 14, root)
    waiter = asyncio.create_task(workdir.path())
    await asyncio.sleep(0)  # the waiter is waiting
    waiter.cancel()
    await workdir.remove()
    assert list(root.iterdir()) == []


def test_work_root_from_env() -> None:
    assert work_root_from_env({}) is None
    assert work_root_from_env({"XOOGIFY_WORK_DIR": ""}) is None
    assert work_root_from_env({"XOOGIFY_WORK_DIR": "/dev/shm/x"}) == Path("/dev/shm/x")
