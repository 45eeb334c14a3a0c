"""Real servers: an attempt whose folder record fails leaves no folder behind.

`AttemptDir.create` makes the folder and holds its lock; the attempt then records its staging
branch in `attempt.json` (`AttemptDir.record`). That record used to run before the `try`
whose `finally` releases the folder, so a record that failed (a full disk, an I/O error)
left the folder on the scratch disk for a later `gc` to find (the worker never removed
it). The fault is
injected in process, at the record itself (the project has no fault point there, and a real
full disk cannot be aimed at one write); everything else is the worker's real path on the
real servers.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from perago_testing import InProcessWorker, seed, suffix, task_of, workspace
from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.lakefs import LakeFS
from perago_worker.workspace import AttemptDir

RAN: list[str] = []  # task ids whose handler ran: a failed record must stop the attempt first


class Nothing(BaseModel):
    pass


def handler(ctx: TaskContext, params: Nothing) -> Nothing:
    RAN.append(ctx.task_id)
    return Nothing()


def build_app(task_type: str) -> Worker:
    app = Worker()
    app.task(task_type, workspace=WorkspaceSpec())(handler)
    return app


@pytest.fixture
def failing_record(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every attempt's record fails as on a full disk; returns the folders it failed in."""
    failed_in: list[Path] = []

    def record(self: AttemptDir, **fields: Any) -> None:
        assert (self.path / "attempt.json").is_file()  # the folder was made and owned
        failed_in.append(self.path)
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "attempt.json"))

    monkeypatch.setattr(AttemptDir, "record", record)
    return failed_in


def attempt_folders(worker: InProcessWorker) -> list[Path]:
    scratch = Path(worker.settings.scratch_root)
    return [p for p in scratch.iterdir() if p.is_dir() and not p.name.startswith(".")]


def run_once(
    start_worker: Callable[..., InProcessWorker],
    lakefs: LakeFS,
    repo: str,
    tmp_path: Path,
    **settings: Any,
) -> tuple[InProcessWorker, Any]:
    """A worker of its own task type (no other worker polls it); one task on a fresh commit."""
    task_type = f"recordfault_{suffix()}"
    worker = start_worker(build_app(task_type), allowed_repositories=[repo], **settings)
    ref = seed(lakefs, repo, {"in/data.txt": suffix().encode()}, tmp_path)
    return worker, worker.run(task_type, {"workspace": workspace(repo, ref), "params": {}})


def test_an_attempt_whose_folder_record_fails_leaves_no_folder_behind(
    start_worker: Callable[..., InProcessWorker],
    lakefs: LakeFS,
    repo: str,
    tmp_path: Path,
    failing_record: list[Path],
) -> None:
    worker, run = run_once(start_worker, lakefs, repo, tmp_path)

    task = task_of(run)
    assert task.status == "FAILED", task.reason_for_incompletion  # retryable: a disk fault
    assert task.reason_for_incompletion.startswith("infrastructure: OSError")
    assert "No space left on device" in task.reason_for_incompletion
    assert task.task_id not in RAN
    [folder] = failing_record
    assert not folder.exists()
    assert attempt_folders(worker) == []
