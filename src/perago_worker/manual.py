"""One task, once, outside Conductor, published through the same fences as a task.

`perago-worker exec --publish` is for the data engineer iterating on a handler against real
data: no workflow, no poll. It is not a shortcut around the publish path. It builds the
context a poll would give and runs the very `Attempt` the runner runs: validate,
materialize, pre checks, handler, post checks, stage, commit with provenance, ledger,
claim and the fenced merge.

What stands in for Conductor:

* **The execution identity.** A manual execution id (`fences.manual_execution_id`,
  `manual-<unix ms>-<hex>`) is the workflow id, the task id and the root scheduling at
  once. The ledger entry, the intent branch and the merge's `perago.execution` all follow
  from it as they do from a task's. Re-running with the same id (`--execution-id`) is a
  retry of the same logical execution: after a crash it finishes the claimed publish, or
  finds the merge in the target's history, and never merges twice. A run without the
  option is a new execution.
* **The attempt fence.** A task's attempt fence asks Conductor whether this delivery still
  holds the task. A manual execution has no lease to lose. Its one owner is this process,
  so the fence is its cancellation (Ctrl-C before the publish has begun). Two processes
  running the same execution id at once are the case the publish fence exists for: one
  claims, the other adopts its claim, and one merge lands.
* **The report.** Nothing is reported to Conductor. The caller prints the outcome.

The merge commit carries `perago.manual: true` instead of a workflow link. gc treats a
manual execution as a finished workflow (`gc.MANUAL_ANSWER`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from perago_worker import fences, invocation
from perago_worker.app import TaskSpec
from perago_worker.attempt import Attempt, Deps, Outcome
from perago_worker.changes import ChangeSet
from perago_worker.context import TaskContext
from perago_worker.contract import WorkspaceRef
from perago_worker.fences import Incarnation
from perago_worker.observability import logging as plog
from perago_worker.settings import Settings

WORKER_ID_PREFIX = "exec@"


class BadExecutionId(ValueError):
    """An `--execution-id` that is not one `manual_execution_id` made."""


@dataclass(frozen=True)
class ManualRun:
    """What one manual execution did: its id, the task outcome and the change set."""

    execution_id: str
    outcome: Outcome
    changes: ChangeSet | None


def new_execution_id() -> str:
    return fences.manual_execution_id(time.time())


def incarnation_of(execution_id: str, *, clock_skew_seconds: float = 0.0) -> Incarnation:
    """The root scheduling a manual execution id names: the same for every re-run with it,
    so the ledger decides a re-run the way it decides a re-delivery of a task.

    An id that starts in the future is refused: the target's history is searched back to
    the execution's start, so such an id would hide its own merge from a re-run.
    """
    started = fences.manual_started_ms(execution_id)
    if started is None:
        raise BadExecutionId(
            f"execution id {execution_id!r} is not a manual execution id (the form is "
            "manual-<13-digit unix ms>-<hex>, as exec --publish prints it)"
        )
    if started / 1000 > time.time() + clock_skew_seconds:
        raise BadExecutionId(
            f"execution id {execution_id!r} starts in the future; give the id an earlier "
            "exec --publish printed, or none for a new execution"
        )
    return Incarnation(execution_id, 0, started, started)


def context_for(spec: TaskSpec, execution_id: str, settings: Settings) -> TaskContext:
    """The context a poll would give, for a manual execution."""
    worker_id = f"{WORKER_ID_PREFIX}{settings.worker_id}"
    return TaskContext(
        task_id=execution_id,
        workflow_id=execution_id,
        task_type=spec.name,
        reference_name=spec.name,
        retry_count=0,
        poll_count=1,
        worker_id=worker_id,
        environment=settings.environment,
        delivery_token=fences.delivery_token(worker_id),
        _config=settings.handler_value,
        log=plog.get_logger(execution_id=execution_id, task_type=spec.name),
        deadline=time.monotonic() + invocation.timeout_for(spec, settings),
    )


def publish_once(
    spec: TaskSpec,
    workspace: WorkspaceRef | None,
    params: dict[str, Any],
    deps: Deps,
    *,
    execution_id: str | None = None,
) -> ManualRun:
    """Run `spec` once through the whole attempt pipeline and publish what it changed.

    `execution_id` continues an earlier manual execution (see the module docstring); None
    starts a new one. Ctrl-C (`KeyboardInterrupt`) cancels the attempt unless its publish has
    begun: a merge that has started is waited for, never cut.
    """
    execution_id = execution_id or new_execution_id()
    incarnation = incarnation_of(execution_id, clock_skew_seconds=deps.settings.clock_skew_seconds)
    ctx = context_for(spec, execution_id, deps.settings)
    raw: dict[str, Any] = {"params": params}
    if workspace is not None:
        raw["workspace"] = workspace.model_dump()
    attempt = Attempt(
        spec,
        raw,
        ctx,
        deps,
        # The attempt fence of a run nobody else can hold: still ours unless cancelled.
        still_live=lambda: not ctx.cancelled,
        incarnation=incarnation,
    )
    ctx.log.info("exec.start", publish=True, reference_name=spec.name)
    outcomes: list[Outcome] = []

    def run() -> None:
        with invocation.serving_loop(spec, deps.settings):
            outcomes.append(attempt.run())

    # The attempt runs on a thread of its own so that Ctrl-C reaches this one, which cancels
    # it the way a lost lease would, and then waits for it to finish.
    thread = threading.Thread(target=run, name=f"exec-{execution_id[-8:]}", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:
            if ctx.cancel_unless_publishing("interrupted (Ctrl-C)"):
                ctx.log.warning("exec.interrupted")
            else:
                ctx.log.warning("exec.interrupt_ignored", reason="the publish has begun")
    outcome = outcomes[0]
    ctx.log.info("exec.done", status=outcome.status.value, kind=outcome.kind)
    return ManualRun(execution_id, outcome, attempt.changes)
