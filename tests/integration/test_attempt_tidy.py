"""Real servers: a task Conductor sees COMPLETED left nothing behind, at that very moment.

The tidying after an attempt (the cache fed from its folder, the folder removed, the
staging branch deleted) runs beside the report's fence read and the merge, off the
attempt's path (docs/performance.md), but the report waits for it: a COMPLETED task never
has a staging branch or an attempt folder left, not even briefly, and one that published
nothing created no staging branch at all. Each check is read the moment the workflow ends,
before anything else could tidy up, and each tidying step is slowed down (a slow disk, a
slow lakeFS), so a report that did not wait for it would be seen first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from perago_testing import InProcessWorker, seed, suffix, task_of, workspace
from perago_worker import TaskContext, Worker, WorkspaceSpec, fences
from perago_worker.lakefs import LakeFS
from perago_worker.workspace import AttemptDir

SLOW = 1.0  # seconds each tidying step takes here


@pytest.fixture
def slow_tidying(monkeypatch: pytest.MonkeyPatch, lakefs: LakeFS) -> None:
    """The folder's removal and the staging branch's deletion each take `SLOW` seconds."""
    release, delete_branch = AttemptDir.release, lakefs.delete_branch

    def slow_release(self: AttemptDir, *, remove: bool) -> None:
        time.sleep(SLOW)
        release(self, remove=remove)

    def slow_delete(repository: str, branch: str, *args: Any, **kwargs: Any) -> Any:
        if branch.startswith(fences.STAGING_PREFIX):
            time.sleep(SLOW)
        return delete_branch(repository, branch, *args, **kwargs)

    monkeypatch.setattr(AttemptDir, "release", slow_release)
    monkeypatch.setattr(lakefs, "delete_branch", slow_delete)


class Params(BaseModel):
    write: bool


class Nothing(BaseModel):
    pass


def handler(ctx: TaskContext, params: Params) -> Nothing:
    if params.write:
        (ctx.workspace.root / f"out-{ctx.task_id}.txt").write_text("made")
    return Nothing()


def staging_branches(lakefs: LakeFS, repo: str) -> list[str]:
    return [name for name, _ in lakefs.list_branches(repo, fences.STAGING_PREFIX)]


def attempt_folders(worker: InProcessWorker) -> list[Path]:
    scratch = Path(worker.settings.scratch_root)
    return [p for p in scratch.iterdir() if p.is_dir() and not p.name.startswith(".")]


def started(start_worker: Callable[..., InProcessWorker], repo: str) -> tuple[InProcessWorker, str]:
    task_type = f"tidy_{suffix()}"
    app = Worker()
    app.task(task_type, workspace=WorkspaceSpec(prefix="/in"))(handler)
    return start_worker(app, allowed_repositories=[repo]), task_type


@pytest.mark.usefixtures("slow_tidying")
def test_a_completed_publishing_task_left_no_staging_branch_and_no_attempt_folder(
    start_worker: Callable[..., InProcessWorker], lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    worker, task_type = started(start_worker, repo)
    for _ in range(2):  # the second on a worker whose first attempt tidied up
        ref = seed(lakefs, repo, {"in/data.txt": suffix().encode()}, tmp_path)
        run = worker.run(task_type, {"workspace": workspace(repo, ref), "params": {"write": True}})
        branches, folders = staging_branches(lakefs, repo), attempt_folders(worker)
        task = task_of(run)
        assert task.status == "COMPLETED", task.reason_for_incompletion
        assert task.output_data["workspace"]["ref"] != ref  # it merged
        assert (branches, folders) == ([], [])


@pytest.mark.usefixtures("slow_tidying")
def test_a_completed_task_without_changes_made_no_staging_branch(
    start_worker: Callable[..., InProcessWorker], lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    worker, task_type = started(start_worker, repo)
    ref = seed(lakefs, repo, {"in/data.txt": suffix().encode()}, tmp_path)
    run = worker.run(task_type, {"workspace": workspace(repo, ref), "params": {"write": False}})
    branches, folders = staging_branches(lakefs, repo), attempt_folders(worker)
    task = task_of(run)
    assert task.status == "COMPLETED", task.reason_for_incompletion
    assert task.output_data["workspace"]["ref"] == ref
    assert (branches, folders) == ([], [])
