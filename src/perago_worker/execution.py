"""Which logical execution an attempt belongs to: Conductor's retry chain and the ledger.

The rules are pure (`fences`); this module gathers what they need. A task that is a retry
names the task it retries (`retriedTaskId`): the chain is read back one `GET /api/tasks/{id}`
per hop (none for a first attempt, which is almost every attempt).

Conductor keeps no trace of a rerun (a rerun resets the task in place and even keeps its
`retriedTaskId`), so the worker keeps its own: the **execution ledger**, a hidden branch
`perago-ledger` in each target repository whose staging area holds one small JSON object per
(workflow, slot, task id): the newest incarnation an attempt resolved and its execution.
Every attempt reads the entries of its chain and writes its own entry *before* anything can
merge, so a later delivery, retry or rerun of the same task id is judged against what this
one saw. Objects are written without commits (a branch's staging area is read back at once).

The target's history is the publish fence's second memory: `published` walks the target's
first-parent log back to the execution's start (its root's scheduled time, less the allowed
clock skew) and finds the merge that carries the execution key, if there is one.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.fences import Incarnation, LedgerEntry, LineageError, PublishRecord, Target
from perago_worker.lakefs import Conflict, LakeFS, NotFound

MAX_CHAIN = 1000
LEDGER_BRANCH = "perago-ledger"
LEDGER_PREFIX = "_perago/executions/"


class Superseded(Exception):
    """The delivery belongs to a scheduling of its task id that a later one replaced."""


@dataclass(frozen=True)
class Execution:
    """One logical execution of one task in one workflow run, for one target."""

    key: str
    slot: str
    root: Incarnation
    target: Target
    input_ref: str
    not_before: float  # unix seconds: commits older than this cannot hold its merge
    # No attempt ever resolved this execution before (no ledger entry led to it): nothing
    # can have been claimed or merged for it, since both come after an attempt's resolve.
    fresh: bool = False

    @property
    def intent_branch(self) -> str:
        return fences.intent_branch(self.key)


def records(lakefs: LakeFS, target: Target, *, not_before: float) -> Iterator[PublishRecord]:
    """perago merge records on the target, newest first, back to where the walk may end.

    The walk does not stop at the attempt's input commit: a retry's input is recomputed and
    may name the execution's own merge, or a later commit.
    """
    for commit in lakefs.walk_log(target.repository, target.branch):
        if fences.history_ends(commit, not_before=not_before):
            return
        record = PublishRecord.parse(commit.id, commit.metadata)
        if record is not None:
            yield record


def published(lakefs: LakeFS, execution: Execution) -> PublishRecord | None:
    """The merge that published `execution` on its target, if the history holds one."""
    return fences.find_publish(
        records(lakefs, execution.target, not_before=execution.not_before), execution.key
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


def ledger_key(workflow_id: str, slot: str, task_id: str) -> str:
    """`_perago/executions/<workflow id>/<slot>-<task id>.json`: gc reads the workflow off it."""

    def q(text: str) -> str:
        return urllib.parse.quote(text, safe="-_.")

    return f"{LEDGER_PREFIX}{q(workflow_id)}/{slot[:32]}-{q(task_id)}.json"


class Ledger:
    """The execution ledger of one repository (see the module docstring)."""

    def __init__(self, lakefs: LakeFS, repository: str, *, source_branch: str) -> None:
        self.lakefs = lakefs
        self.repository = repository
        self.source_branch = source_branch  # where the ledger branch is made, the first time

    def read(self, workflow_id: str, slot: str, task_id: str) -> LedgerEntry | None:
        data = self.lakefs.get_record(
            self.repository, LEDGER_BRANCH, ledger_key(workflow_id, slot, task_id)
        )
        return None if data is None else LedgerEntry.from_json(data)

    def write(self, workflow_id: str, slot: str, entry: LedgerEntry) -> None:
        key = ledger_key(workflow_id, slot, entry.incarnation.task_id)
        try:
            self.lakefs.put_record(self.repository, LEDGER_BRANCH, key, entry.to_json())
        except NotFound:
            with contextlib.suppress(Conflict):  # another attempt made it meanwhile
                self.lakefs.create_branch(
                    self.repository, LEDGER_BRANCH, self.source_branch, hidden=True
                )
            self.lakefs.put_record(self.repository, LEDGER_BRANCH, key, entry.to_json())


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
) -> Execution:
    """The attempt's execution; its ledger entry is written before this returns."""
    links = chain(conductor, incarnation)
    fences.root_of(links)  # refuse a chain that loops or breaks before deciding anything
    slot = fences.slot_key(workflow_id, reference_name, task_type, target)
    ledger = Ledger(lakefs, target.repository, source_branch=target.branch)
    own = ledger.read(workflow_id, slot, incarnation.task_id)
    if own is not None and fences.later_scheduling(own.incarnation, incarnation):
        # An attempt of a later scheduling of this task id resolved already: this delivery
        # is superseded, and its entry must not overwrite the later one.
        raise Superseded(
            f"task {incarnation.task_id} was rescheduled after this delivery (the ledger holds "
            f"a later scheduling: retry {own.incarnation.retry_count}, scheduled "
            f"{own.incarnation.scheduled_time}, started {own.incarnation.start_time})"
        )
    decided = fences.link_execution(slot, incarnation, own)
    fresh = fences.starts_execution(incarnation, own)
    for link in links[1:]:
        if decided is not None:
            break
        entry = ledger.read(workflow_id, slot, link.task_id)
        decided = fences.link_execution(slot, link, entry)
        fresh = fences.starts_execution(link, entry)
    if decided is None:  # unreachable: the chain's last link retries nothing
        raise LineageError(f"no root found for task {incarnation.task_id}")
    key, root = decided
    entry = LedgerEntry(incarnation, key, root)
    if own != entry:
        ledger.write(workflow_id, slot, entry)
    started_ms = root.scheduled_time or root.start_time
    not_before = max(0.0, started_ms / 1000 - clock_skew_seconds) if started_ms else 0.0
    return Execution(key, slot, root, target, input_ref, not_before, fresh=fresh)
