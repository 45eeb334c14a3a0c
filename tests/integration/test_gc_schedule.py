"""The daemon's own gc (`run --gc-every`): what a killed attempt leaves is collected on schedule.

Real worker processes on the real servers. A worker kills itself (SIGKILL, fault point
`stage.committed`) after its staging commit, leaving its attempt folder and its staging
branch; a second worker that runs gc every second, with thresholds small enough, removes
both once Conductor has timed the task out. With `--processes N` only the supervisor
collects.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gc_app
import pytest

from perago_testing import one_task_workflow, seed, suffix, workspace
from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app
from perago_worker.devstack.servers import Endpoints
from perago_worker.devstack.worker_process import WorkerProcess, start_worker
from perago_worker.lakefs import LakeFS

pytestmark = [pytest.mark.integration, pytest.mark.faults]

HERE = Path(__file__).parent
S = suffix()
TASK = f"gcws_{S}"


@pytest.fixture(scope="module")
def definitions(conductor: Conductor) -> None:
    os.environ["PERAGO_TEST_SUFFIX"] = S
    try:
        importlib.reload(gc_app)
        # No retries: the killed attempt's task ends TIMED_OUT and nothing else runs it.
        register_app(conductor, gc_app.app, retries=0)
    finally:
        del os.environ["PERAGO_TEST_SUFFIX"]


@dataclass
class Workers:
    """Real worker processes of `gc_app` sharing one scratch root."""

    endpoints: Endpoints
    repo: str
    workdir: Path
    scratch: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(self, name: str, *, args: tuple[str, ...] = (), **env: str) -> WorkerProcess:
        proc = start_worker(
            "gc_app:app",
            self.endpoints,
            self.workdir / name,
            name=name,
            args=args,
            env={
                "PYTHONPATH": str(HERE),
                "PERAGO_TEST_SUFFIX": S,
                "PERAGO_SCRATCH_ROOT": str(self.scratch),
                "PERAGO_ALLOWED_REPOSITORIES": json.dumps([self.repo]),
                "PERAGO_CACHE_MAX_BYTES": "0",
                "PERAGO_MIN_FREE_DISK_MB": "1",
                **env,
            },
        )
        self.started.append(proc)
        return proc


@pytest.fixture
def workers(
    endpoints: Endpoints, repo: str, definitions: None, tmp_path: Path
) -> Iterator[Workers]:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pool = Workers(endpoints, repo, tmp_path, scratch)
    yield pool
    for proc in pool.started:
        if proc.proc.poll() is None:
            proc.kill()


def attempt_folders(scratch: Path) -> list[Path]:
    return sorted(p for p in scratch.iterdir() if p.is_dir() and not p.name.startswith("."))


def staging_branches(lakefs: LakeFS, repo: str) -> list[str]:
    return [name for name, _ in lakefs.list_branches(repo, fences.STAGING_PREFIX)]


def events(worker: WorkerProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in worker.events() if e.get("event") == name]


def test_a_killed_attempts_staging_branch_and_folder_are_gone_after_the_scheduled_gc(
    workers: Workers, lakefs: LakeFS, conductor: Conductor, repo: str, tmp_path: Path
) -> None:
    base = seed(lakefs, repo, {"gc/in.txt": b"input"}, tmp_path)
    doomed = workers.start("doomed", PERAGO_FAULT_POINTS="stage.committed")
    name = one_task_workflow(conductor, TASK, ["params", "workspace"])
    workflow_id = conductor.start_workflow(
        name, {"workspace": workspace(repo, base, "main"), "params": {"name": "killed"}}
    )
    assert doomed.proc.wait(60) == -9, doomed.tail()

    # What the kill left: the attempt's folder and its staging branch, named for its task.
    [task] = conductor.get_workflow(workflow_id).tasks
    [branch] = staging_branches(lakefs, repo)
    parsed = fences.parse_staging_branch(branch)
    assert parsed is not None and parsed[0] == task.task_id
    [folder] = attempt_folders(workers.scratch)

    collector = workers.start(
        "collector",
        args=("--gc-every", "1"),
        PERAGO_GC_OLDER_THAN_SECONDS="1",
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # Stand in for a production Conductor's sweeper: notice the response timeout now.
        with contextlib.suppress(Exception):
            conductor.decide(workflow_id)
        if not staging_branches(lakefs, repo) and not attempt_folders(workers.scratch):
            break
        time.sleep(0.5)

    assert staging_branches(lakefs, repo) == [], collector.tail()
    assert attempt_folders(workers.scratch) == [], collector.tail()
    assert conductor.get_workflow(workflow_id).tasks[0].status == "TIMED_OUT"
    removed = [item for e in events(collector, "gc.done") for item in e["removed"]]
    assert f"{repo}:{branch}" in removed
    assert str(folder) in removed
    assert collector.proc.poll() is None, "gc never stops the worker"
    assert collector.stop() == 0


def test_with_several_processes_only_the_supervisor_runs_the_gc_schedule(
    workers: Workers,
) -> None:
    supervised = workers.start("supervised", args=("--processes", "2", "--gc-every", "1"))
    deadline = time.monotonic() + 60
    while len(events(supervised, "gc.done")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(events(supervised, "gc.done")) >= 2, supervised.tail()
    scheduled = events(supervised, "gc.scheduled")
    assert len(scheduled) == 1, scheduled
    gc_lines = [e for e in supervised.events() if str(e.get("event", "")).startswith("gc.")]
    assert all("supervisor" in e and "worker_id" not in e for e in gc_lines), gc_lines
    assert supervised.stop() == 0
    assert events(supervised, "gc.stopped"), supervised.tail()
