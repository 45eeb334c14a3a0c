"""Deadlines on real servers: an attempt past its deadline publishes nothing, is reported
FAILED `timed_out`, frees its slot whatever the handler does, and renews no lease.

The handler (`deadline_app.nap`) ignores cancellation on purpose: the deadline must stop
the attempt without its help. It lives in a light module of its own, found by module and
name by each handler process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deadline_app import nap

from perago_testing import InProcessWorker, seed, suffix, task_of, workspace
from perago_worker import Worker, WorkspaceSpec
from perago_worker.checks import Check, CheckFailure
from perago_worker.conductor import Conductor
from perago_worker.lakefs import LakeFS

S = suffix()
TIMEOUT = 2.0


class SlowCheck(Check):
    """A pre check that takes `min_count` seconds: the attempt sits outside its handler."""

    def run(self, root: Path) -> CheckFailure | None:
        time.sleep(self.min_count)
        return None


def build_app() -> Worker:
    app = Worker()
    ws = WorkspaceSpec(prefix="/deadline")
    app.task(f"nap_thread_{S}", workspace=ws, timeout=TIMEOUT)(nap)
    app.task(f"nap_process_{S}", workspace=ws, timeout=TIMEOUT, isolation="process")(nap)
    app.task(
        f"slow_pre_{S}",
        workspace=ws,
        pre=[SlowCheck("require_dir", ".", 5)],
        timeout=TIMEOUT,
        response_timeout_seconds=10,
    )(nap)
    return app


@pytest.fixture(scope="module")
def worker(start_worker: Callable[..., InProcessWorker]) -> InProcessWorker:
    # One slot per task type: a slot still held by a stuck handler would block the next task.
    # lease_factor 0.1 of a 10 s response timeout: a lease every second while alive.
    return start_worker(build_app(), concurrency=1, lease_factor=0.1)


@pytest.fixture(scope="module")
def base(lakefs: LakeFS, repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return seed(lakefs, repo, {"deadline/input.txt": b"input"}, tmp_path_factory.mktemp("seed"))


def run_nap(worker: InProcessWorker, kind: str, repo: str, ref: str, **params: Any) -> Any:
    run = worker.run(f"{kind}_{S}", {"workspace": workspace(repo, ref), "params": params})
    return task_of(run)


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_thread_handler_past_its_deadline_is_reported_timed_out_and_publishes_nothing(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    started = time.monotonic()
    task = run_nap(worker, "nap_thread", repo, base, seconds=20, write="partial.txt")
    assert time.monotonic() - started < 12, "reported at the deadline, not when the sleep ends"
    assert task.status == "FAILED"  # retryable
    assert task.reason_for_incompletion.startswith("timed_out: the attempt passed its deadline")
    assert "thread was abandoned" in task.reason_for_incompletion
    assert lakefs.branch_head(repo, "main") == base


def test_the_slot_of_an_abandoned_thread_takes_the_next_task(
    worker: InProcessWorker, repo: str, base: str
) -> None:
    first = run_nap(worker, "nap_thread", repo, base, seconds=20)
    assert first.reason_for_incompletion.startswith("timed_out")
    assert worker.runner.health()["abandoned_handler_threads"] >= 1  # it still sleeps
    second = run_nap(worker, "nap_thread", repo, base, seconds=0)
    assert second.status == "COMPLETED"


def test_a_process_handler_past_its_deadline_is_killed_and_publishes_nothing(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    task = run_nap(
        worker, "nap_process", repo, base, seconds=60, write="partial.txt", pid_file=str(pid_file)
    )
    assert task.status == "FAILED"
    assert task.reason_for_incompletion.startswith("timed_out: the attempt passed its deadline")
    assert "process group was killed" in task.reason_for_incompletion
    assert wait_gone(int(pid_file.read_text()))
    assert lakefs.branch_head(repo, "main") == base
    after = run_nap(worker, "nap_process", repo, base, seconds=0)
    assert after.status == "COMPLETED"  # the slot was freed


def test_the_deadline_stops_an_attempt_outside_its_handler_and_ends_its_leases(
    worker: InProcessWorker, conductor: Conductor, repo: str, base: str, monkeypatch: Any
) -> None:
    """A 5 s pre check against a 2 s deadline: leases every second until the deadline only."""
    extensions: list[tuple[float, str]] = []
    lock = threading.Lock()
    extend = conductor.extend_lease

    def recording(task: Any) -> None:
        with lock:
            extensions.append((time.time(), task.task_id))
        extend(task)

    monkeypatch.setattr(conductor, "extend_lease", recording)
    task = run_nap(worker, "slow_pre", repo, base, seconds=0)
    assert task.status == "FAILED"
    assert task.reason_for_incompletion.startswith(
        "timed_out: the attempt passed its deadline of 2 s before it began to publish"
    )
    ours = [at for at, task_id in extensions if task_id == task.task_id]
    deadline = task.start_time / 1000 + TIMEOUT
    assert ours, "leases were renewed while the attempt was within its deadline"
    assert all(at < deadline + 0.5 for at in ours), [round(at - deadline, 2) for at in ours]


def test_the_settings_deadline_applies_to_tasks_without_their_own(
    start_worker: Callable[..., InProcessWorker], repo: str, base: str
) -> None:
    app = Worker()
    app.task(f"nap_default_{S}", workspace=WorkspaceSpec(prefix="/deadline"))(nap)
    worker = start_worker(app, task_timeout_seconds=1.5)
    task = run_nap(worker, "nap_default", repo, base, seconds=20)
    assert task.reason_for_incompletion.startswith(
        "timed_out: the attempt passed its deadline of 1.5 s"
    )
