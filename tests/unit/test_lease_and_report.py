"""The lease keeper and the final report never cross: an extension in flight holds the
report back, and no extension is sent once the report is.

An IN_PROGRESS lease update that reached Conductor after the COMPLETED report could reopen
a finished task (the chaos soak saw a completed workflow whose task stayed IN_PROGRESS on a
Conductor without its workflow lock). Pure ordering, so a fake Conductor stands in.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel

from perago_worker.app import Worker
from perago_worker.attempt import Deps, Outcome
from perago_worker.conductor import TaskState
from perago_worker.context import TaskContext
from perago_worker.contract import Status
from perago_worker.observability.logging import get_logger
from perago_worker.runner import Heartbeat, InFlight, Lifecycle, Runner
from perago_worker.settings import Settings


class Empty(BaseModel):
    pass


class SlowLeaseConductor:
    """Records every update; an extension blocks until the test lets it go."""

    request_timeout = 1.0

    def __init__(self) -> None:
        self.events: list[str] = []
        self.extending = threading.Event()
        self.release = threading.Event()

    def extend_lease(self, task: Any) -> None:
        self.events.append("extend:start")
        self.extending.set()
        assert self.release.wait(10)
        self.events.append("extend:end")

    def update(self, result: Any, **_: Any) -> None:
        self.events.append(f"update:{result.status}")

    def task_state(self, task_id: str, **_: Any) -> TaskState:
        return TaskState(task_id, "IN_PROGRESS", "w#1", 1, 0, 1, 1, "", "wf1")


def make_entry(tmp_path: Path, conductor: SlowLeaseConductor) -> tuple[Runner, InFlight]:
    app = Worker()

    @app.task("lease_order")
    def noop(ctx: TaskContext, params: Empty) -> Empty:
        return params

    settings = Settings(scratch_root=tmp_path, http_port=0)
    runner = Runner(app, Deps(settings, None, conductor), Lifecycle())  # type: ignore[arg-type]
    ctx = TaskContext(
        "t1", "wf1", "lease_order", "ref", 0, 1, "w", "dev", delivery_token="w#1", log=get_logger()
    )
    task = SimpleNamespace(task_id="t1", workflow_instance_id="wf1")
    entry = InFlight(task, app.tasks["lease_order"], ctx, interval=60, next_lease=0)  # type: ignore[arg-type]
    runner._inflight[entry.key] = entry
    return runner, entry


def test_a_report_waits_for_an_extension_in_flight_and_no_extension_follows_it(
    tmp_path: Path,
) -> None:
    conductor = SlowLeaseConductor()
    runner, entry = make_entry(tmp_path, conductor)
    keeper = threading.Thread(
        target=runner._lease_loop,
        args=(Heartbeat("lease keeper", 1.0),),
        daemon=True,
    )
    keeper.start()
    try:
        assert conductor.extending.wait(10), "the keeper never extended the lease"
        reporter = threading.Thread(
            target=runner._report,
            args=(entry, Outcome(Status.COMPLETED)),
            daemon=True,
        )
        reporter.start()
        time.sleep(0.3)
        assert conductor.events == ["extend:start"], "the report crossed the extension"
        conductor.release.set()
        reporter.join(10)
        entry.next_lease = 0  # due again: a keeper that ignored the report would extend now
        time.sleep(0.8)
    finally:
        runner._stopped.set()
        keeper.join(10)
    assert conductor.events == ["extend:start", "extend:end", "update:COMPLETED"]
