"""The drain's FAILED report is fenced (docs/fences.md, "Drain").

Past `drain_grace_seconds` the drain cancels every leftover attempt that has not begun to
claim, and reports it FAILED only if the attempt fence still shows it live: a superseded
delivery's report could overwrite the live delivery's result. An attempt that has begun to
claim or merge is never reported FAILED: its merge may land, and the drain waits for its own
report. Leftovers stand in the runner's in-flight map as the poll loop leaves them; a fake
Conductor answers the fence reads and records every report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from perago_worker.app import Worker
from perago_worker.attempt import Deps
from perago_worker.conductor import ConductorError, TaskState
from perago_worker.context import TaskContext
from perago_worker.observability.logging import get_logger
from perago_worker.runner import InFlight, Lifecycle, Runner
from perago_worker.settings import Settings

TOKEN = "worker-a#0123456789ab"
OTHER = "worker-b#ba9876543210"

# What Conductor says about a task whose delivery is TOKEN.
Answer = Callable[[str], TaskState | None]


def _live(task_id: str) -> TaskState:
    return TaskState(task_id, "IN_PROGRESS", TOKEN, 1)


def _superseded(task_id: str) -> TaskState:
    return TaskState(task_id, "IN_PROGRESS", OTHER, 1)  # re-delivered: a rerun, a 2nd worker


def _timed_out(task_id: str) -> TaskState:
    return TaskState(task_id, "TIMED_OUT", TOKEN, 1)


def _gone(task_id: str) -> None:
    return None


def _unreachable(task_id: str) -> TaskState:
    raise ConductorError(0, "no answer from http://conductor/api within 10 s")


class Empty(BaseModel):
    pass


class FakeConductor:
    request_timeout = 0.1

    def __init__(self, answers: dict[str, Answer]) -> None:
        self.answers = answers
        self.reports: list[tuple[str, str, str]] = []

    def task_state(self, task_id: str, **_: Any) -> TaskState | None:
        return self.answers[task_id](task_id)

    def update(self, result: Any, **_: Any) -> None:
        self.reports.append((result.task_id, result.status, result.reason_for_incompletion))

    def extend_lease(self, task: Any) -> None:
        pass


def _runner(tmp_path: Path, conductor: FakeConductor) -> Runner:
    app = Worker()

    @app.task("leftover")
    def handler(ctx: TaskContext, params: Empty) -> Empty:
        return params

    settings = Settings(
        scratch_root=tmp_path, http_port=0, drain_grace_seconds=0, merge_retry_seconds=1
    )
    lakefs = SimpleNamespace(request_timeout=1.0)  # the drain's wait for a publish: 1 + 2 x 1 s
    return Runner(app, Deps(settings, lakefs, conductor), Lifecycle())  # type: ignore[arg-type]


def _leftover(runner: Runner, task_id: str, *, publishing: bool = False) -> InFlight:
    """An attempt still in flight when the grace ends (publishing: it began to claim)."""
    ctx = TaskContext(
        task_id, "wf", "leftover", "ref", 0, 1, "worker-a", "dev", delivery_token=TOKEN
    )
    ctx.log = get_logger()
    if publishing:
        assert ctx.begin_publish()
    task = SimpleNamespace(task_id=task_id, workflow_instance_id="wf")
    entry = InFlight(task, runner.app.tasks["leftover"], ctx, interval=60, next_lease=1e18)
    with runner._lock:
        runner._inflight[entry.key] = entry
    return entry


def test_the_drain_reports_failed_for_a_leftover_the_fence_shows_live(tmp_path: Path) -> None:
    conductor = FakeConductor({"t-live": _live})
    runner = _runner(tmp_path, conductor)
    _leftover(runner, "t-live")

    runner.drain()

    assert [(task, status) for task, status, _ in conductor.reports] == [("t-live", "FAILED")]
    assert conductor.reports[0][2].startswith("aborted:")


@pytest.mark.parametrize(
    "answer",
    [_superseded, _timed_out, _gone, _unreachable],
    ids=["superseded", "not-in-progress", "gone", "unverifiable"],
)
def test_the_drain_reports_nothing_for_a_leftover_the_fence_shows_not_live(
    tmp_path: Path, answer: Answer
) -> None:
    conductor = FakeConductor({"t-stale": answer})
    runner = _runner(tmp_path, conductor)
    _leftover(runner, "t-stale")

    runner.drain()

    assert conductor.reports == []


def test_a_leftover_the_drain_gave_up_on_can_never_begin_to_publish(tmp_path: Path) -> None:
    conductor = FakeConductor({"t-live": _live, "t-stale": _superseded})
    runner = _runner(tmp_path, conductor)
    live, stale = _leftover(runner, "t-live"), _leftover(runner, "t-stale")

    runner.drain()

    assert not live.ctx.begin_publish()
    assert not stale.ctx.begin_publish()


def test_the_drain_never_reports_failed_for_an_attempt_that_began_to_publish(
    tmp_path: Path,
) -> None:
    conductor = FakeConductor({"t-merging": _live})  # live: a FAILED report would be sent
    runner = _runner(tmp_path, conductor)
    merging = _leftover(runner, "t-merging", publishing=True)

    runner.drain()

    assert conductor.reports == []
    assert not merging.ctx.cancelled  # its merge and its own report may go on


def test_the_drain_waits_for_an_attempt_that_began_to_publish_to_end(tmp_path: Path) -> None:
    conductor = FakeConductor({"t-merging": _live, "t-live": _live})
    runner = _runner(tmp_path, conductor)
    merging = _leftover(runner, "t-merging", publishing=True)
    _leftover(runner, "t-live")
    ended_at: list[float] = []

    def publish_then_end() -> None:  # what `_run_attempt` does once its merge and report end
        time.sleep(0.5)
        ended_at.append(time.monotonic())
        with runner._lock:
            runner._inflight.pop(merging.key)

    threading.Thread(target=publish_then_end, daemon=True).start()
    runner.drain()
    drained_at = time.monotonic()

    assert ended_at and drained_at >= ended_at[0]
    assert [(task, status) for task, status, _ in conductor.reports] == [("t-live", "FAILED")]
