"""Which logical execution an attempt belongs to: read from Conductor and the target's history.

The rules are pure (`fences`); this module gathers what they need. A task that is a retry
names the task it retries (`retriedTaskId`): the chain is read back one `GET /api/tasks/{id}`
per hop (none for a first attempt, which is almost every attempt). A root that kept its task
id through a retry (a parent retry reviving a cancelled sibling) continues the newest earlier
execution the target's history records for that task id.

The history is also the publish fence's second memory: `published` walks the target's
first-parent log back to the input commit or to the execution's start, whichever comes
first, and finds the merge that carries the execution key, if there is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.fences import Incarnation, LineageError, PublishRecord, Target
from perago_worker.lakefs import LakeFS

MAX_CHAIN = 1000


@dataclass(frozen=True)
class Execution:
    """One logical execution of one task in one workflow run, for one target."""

    key: str
    slot: str
    root: Incarnation
    target: Target
    input_ref: str
    not_before: float  # unix seconds: commits older than this cannot hold its merge
    published: PublishRecord | None = None  # found while resolving (a same-id retry)

    @property
    def intent_branch(self) -> str:
        return fences.intent_branch(self.key)


def records(
    lakefs: LakeFS, target: Target, *, input_ref: str, not_before: float
) -> Iterator[PublishRecord]:
    """perago merge records on the target, newest first, back to where the walk may end."""
    for commit in lakefs.walk_log(target.repository, target.branch):
        if fences.history_ends(commit, input_ref=input_ref, not_before=not_before):
            return
        record = PublishRecord.parse(commit.id, commit.metadata)
        if record is not None:
            yield record


def published(lakefs: LakeFS, execution: Execution) -> PublishRecord | None:
    """The merge that published `execution` on its target, if the history holds one."""
    return fences.find_publish(
        records(
            lakefs,
            execution.target,
            input_ref=execution.input_ref,
            not_before=execution.not_before,
        ),
        execution.key,
    )


def chain(conductor: Conductor, first: Incarnation) -> list[Incarnation]:
    """`[first, the task it retries, that one's, ...]`, read back from Conductor."""
    links = [first]
    while links[-1].retried_task_id:
        if len(links) >= MAX_CHAIN:
            raise LineageError(f"retry chain of task {first.task_id} is deeper than {MAX_CHAIN}")
        retried = links[-1].retried_task_id
        state = conductor.task_state(retried)
        if state is None:
            raise LineageError(
                f"task {links[-1].task_id} retries task {retried}, which Conductor no longer has"
            )
        links.append(Incarnation.of(state))
    return links


def resolve(
    conductor: Conductor,
    lakefs: LakeFS,
    *,
    workflow_id: str,
    reference_name: str,
    task_type: str,
    target: Target,
    incarnation: Incarnation,
    input_ref: str,
    clock_skew_seconds: float,
    workflow_created_ms: int | None = None,
) -> Execution:
    root = fences.root_of(chain(conductor, incarnation))
    slot = fences.slot_key(workflow_id, reference_name, task_type, target)
    key = fences.execution_key(slot, root)
    not_before = max(0.0, root.scheduled_time / 1000 - clock_skew_seconds)
    found: PublishRecord | None = None
    if root.retry_count > 0 and not root.retried_task_id:
        # A same-id retry: its earlier incarnations' scheduled times were overwritten, so
        # the history since the workflow began is searched for the execution it continues.
        created = (
            workflow_created_ms
            if workflow_created_ms is not None
            else _workflow_created_ms(conductor, workflow_id)
        )
        since = max(0.0, created / 1000 - clock_skew_seconds)
        found = fences.same_id_predecessor(
            records(lakefs, target, input_ref=input_ref, not_before=since), slot, root
        )
        if found is not None:
            key = found.execution
            not_before = since
    return Execution(key, slot, root, target, input_ref, not_before, found)


def _workflow_created_ms(conductor: Conductor, workflow_id: str) -> int:
    run = conductor.call(conductor.workflows.get_execution_status, workflow_id, include_tasks=False)
    # Unknown: 0, so the walk goes back to the input commit rather than trusting a guess.
    return int(getattr(run, "create_time", 0) or 0)
