"""The runner keeps its in-flight attempts by delivery token, not by task id and poll count.

A rerun-from-task re-delivered to the same process resets `pollCount` on the same task id,
so the old attempt and the new one show the same task id and the same poll count; only the
delivery token (the `workerId` each poll carries, see docs/fences.md) tells them apart. The
attempts go through the runner's own `_launch` and `_run_attempt` (a workspace-free task
whose handler waits until the test lets it go); a fake Conductor holds the task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conductor.client.http.models.task import Task
from pydantic import BaseModel

from perago_worker.app import Worker
from perago_worker.attempt import Deps
from perago_worker.conductor import TaskState
from perago_worker.context import TaskContext
from perago_worker.runner import Heartbeat, Lifecycle, Runner
from perago_worker.settings import Settings

TASK_ID = "task-1"
OLD, NEW = "worker-a#00000000000a", "worker-a#00000000000b"
WAIT = 10.0


class Empty(BaseModel):
    pass


class FakeConductor:
    """One task, held by whichever delivery was polled last; records what is sent."""

    request_timeout = 1.0

    def __init__(self) -> None:
        self.holder = ""
        self.extended: list[Any] = []
        self.reports: list[tuple[str, str]] = []
        self.extension = threading.Event()

    def task_state(self, task_id: str, **_: Any) -> TaskState:
        return TaskState(task_id, "IN_PROGRESS", self.holder, 1, 0, 1, 1, "", "wf")

    def extend_lease(self, task: Any) -> None:
        self.extended.append(task)
        self.extension.set()

    def update(self, result: Any, **_: Any) -> None:
        self.reports.append((result.task_id, result.status))


class Process:
    """A runner serving one workspace-free task type whose handler waits per token."""

    def __init__(self, tmp_path: Path) -> None:
        self.conductor = FakeConductor()
        self.started = {OLD: threading.Event(), NEW: threading.Event()}
        self.release = {OLD: threading.Event(), NEW: threading.Event()}
        app = Worker()

        @app.task("rerun_me", response_timeout_seconds=2, concurrency=2)
        def handler(ctx: TaskContext, params: Empty) -> Empty:
            self.started[ctx.delivery_token].set()
            assert self.release[ctx.delivery_token].wait(WAIT)
            return params

        settings = Settings(
            scratch_root=tmp_path, http_port=0, lease_factor=0.5, drain_grace_seconds=WAIT
        )
        self.runner = Runner(app, Deps(settings, None, self.conductor), Lifecycle())  # type: ignore[arg-type]
        self.spec = app.tasks["rerun_me"]
        self.tasks: dict[str, Task] = {}

    def deliver(self, token: str) -> Task:
        """Conductor hands the task out again (same task id, poll count reset to 1)."""
        task = Task(
            task_id=TASK_ID,
            workflow_instance_id="wf",
            reference_task_name="rerun_me",
            status="IN_PROGRESS",
            poll_count=1,
            retry_count=0,
            scheduled_time=1,
            start_time=1,
            response_timeout_seconds=2,
            input_data={},
        )
        self.tasks[token] = task
        self.conductor.holder = token
        # What the poll loop does: a slot first, then the launch (which owns the slot).
        assert self.runner._slots[self.spec.name].acquire(blocking=False)
        self.runner._launch(self.spec, task, token)
        assert self.started[token].wait(WAIT), f"the attempt of {token} never started"
        return task

    def end(self, token: str) -> None:
        self.release[token].set()

    def tokens_in_flight(self) -> set[str]:
        with self.runner._lock:
            return {entry.ctx.delivery_token for entry in self.runner._inflight.values()}


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def process(tmp_path: Path) -> Iterator[Process]:
    proc = Process(tmp_path)
    yield proc
    proc.runner._stopped.set()
    for release in proc.release.values():
        release.set()


def test_two_deliveries_with_one_task_id_and_poll_count_are_two_attempts_in_flight(
    process: Process,
) -> None:
    old, new = process.deliver(OLD), process.deliver(NEW)

    assert (old.task_id, old.poll_count) == (new.task_id, new.poll_count)
    assert process.runner.in_flight() == 2
    assert process.tokens_in_flight() == {OLD, NEW}


def test_the_end_of_the_old_delivery_leaves_the_new_one_in_flight(process: Process) -> None:
    process.deliver(OLD)
    process.deliver(NEW)

    process.end(OLD)

    assert _eventually(lambda: process.tokens_in_flight() == {NEW})
    time.sleep(0.2)  # the old attempt's bookkeeping is all done by now
    assert process.tokens_in_flight() == {NEW}
    assert process.runner.in_flight() == 1  # what a drain waits for
    assert process.conductor.reports == []  # the superseded old attempt reported nothing


def test_the_lease_keeper_extends_the_new_delivery_after_the_old_one_ended(
    process: Process,
) -> None:
    process.deliver(OLD)
    new = process.deliver(NEW)
    process.end(OLD)
    assert _eventually(lambda: process.runner.in_flight() == 1)

    keeper = threading.Thread(
        target=process.runner._lease_loop, args=(Heartbeat("lease keeper", 1.0),), daemon=True
    )
    keeper.start()

    assert process.conductor.extension.wait(WAIT), "the new delivery's lease was never extended"
    assert process.conductor.extended[0] is new


def test_a_drain_waits_for_the_new_delivery_after_the_old_one_ended(process: Process) -> None:
    process.deliver(OLD)
    process.deliver(NEW)
    process.end(OLD)
    assert _eventually(lambda: process.runner.in_flight() == 1)

    drain = threading.Thread(target=process.runner.drain, daemon=True)
    drain.start()
    drain.join(0.5)
    assert drain.is_alive(), "the drain did not wait for the new delivery"
    process.end(NEW)
    drain.join(WAIT)

    assert not drain.is_alive()
    assert process.conductor.reports == [(TASK_ID, "COMPLETED")]  # its own report, in time
