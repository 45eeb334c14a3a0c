"""Which logical execution an attempt belongs to: Conductor's retry chain and the ledger.

The rules are pure (`fences`); this module gathers what they need. A task that is a retry
names the task it retries (`retriedTaskId`): the chain is read back one `GET /api/tasks/{id}`
per hop (none for a first attempt, which is almost every attempt).

Conductor keeps no trace of a rerun (a rerun resets the task in place and even keeps its
`retriedTaskId`), so the worker keeps its own: the **execution ledger**, a hidden branch
`perago-ledger` in each target repository whose staging area holds one small JSON object per
(workflow, slot, task id, scheduling), created once and never replaced: the execution an
attempt of that scheduling resolved.
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
from perago_worker.lakefs import Conflict, LakeFS, NotFound, PreconditionFailed

MAX_CHAIN = 1000
LEDGER_BRANCH = "perago-ledger"
LEDGER_PREFIX = "_perago/executions/"
LEDGER_TRIES = 5


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
    # Proven that no attempt resolved this execution before (`fences.starts_execution`):
    # nothing can have been claimed or merged for it, since both come after an attempt's
    # resolve. Never for a manual execution, whose ledger entries gc removes on a timer.
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


def ledger_folder(workflow_id: str, slot: str, task_id: str) -> str:
    """`_perago/executions/<workflow id>/<slot>-<task id>/`: gc reads the workflow off it."""
    return f"{LEDGER_PREFIX}{_q(workflow_id)}/{slot[:32]}-{_q(task_id)}/"


def ledger_key(workflow_id: str, slot: str, incarnation: Incarnation) -> str:
    """One object per scheduling, named by it: entries are only ever created, never replaced."""
    inc = incarnation
    return (
        ledger_folder(workflow_id, slot, inc.task_id)
        + f"{inc.retry_count}-{inc.scheduled_time}-{inc.start_time}.json"
    )


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.")


def _scheduling_of(task_id: str, name: str) -> Incarnation | None:
    try:
        rc, sched, start = name.removesuffix(".json").split("-")
        return Incarnation(task_id, int(rc), int(sched), int(start))
    except ValueError:
        return None


class Ledger:
    """The execution ledger of one repository (see the module docstring).

    Each scheduling of a task id gets its own object, created with `If-None-Match: *`: a
    late writer of an earlier scheduling can never replace a later one's entry, and two
    deliveries of one scheduling agree on the first one written.
    """

    def __init__(self, lakefs: LakeFS, repository: str, *, source_branch: str) -> None:
        self.lakefs = lakefs
        self.repository = repository
        self.source_branch = source_branch  # where the ledger branch is made, the first time

    def schedulings(self, workflow_id: str, slot: str, task_id: str) -> list[Incarnation]:
        """The schedulings of `task_id` the ledger holds entries for."""
        folder = ledger_folder(workflow_id, slot, task_id)
        try:
            names = [k[len(folder) :] for k in self.lakefs.list_keys(
                self.repository, LEDGER_BRANCH, folder
            )]  # fmt: skip
        except NotFound:
            return []  # no ledger branch yet
        return [inc for name in names if (inc := _scheduling_of(task_id, name)) is not None]

    def entry(
        self,
        workflow_id: str,
        slot: str,
        link: Incarnation,
        recorded: list[Incarnation] | None = None,
    ) -> LedgerEntry | None:
        """The entry that decides `link` (`fences.deciding_scheduling`); `recorded`, when the
        caller listed the task's schedulings already, saves listing them again."""
        if recorded is None:
            recorded = self.schedulings(workflow_id, slot, link.task_id)
        chosen = fences.deciding_scheduling(link, recorded)
        if chosen is None:
            return None
        found = self.lakefs.get_record(
            self.repository, LEDGER_BRANCH, ledger_key(workflow_id, slot, chosen)
        )
        return None if found is None else LedgerEntry.from_json(found[0])

    def create(self, workflow_id: str, slot: str, entry: LedgerEntry) -> None:
        """Create `entry`'s object; `PreconditionFailed` if its scheduling has one already."""
        key = ledger_key(workflow_id, slot, entry.incarnation)
        try:
            self.lakefs.put_record(
                self.repository, LEDGER_BRANCH, key, entry.to_json(), if_match=None
            )
        except NotFound:
            with contextlib.suppress(Conflict):  # another attempt made it meanwhile
                self.lakefs.create_branch(
                    self.repository, LEDGER_BRANCH, self.source_branch, hidden=True
                )
            self.lakefs.put_record(
                self.repository, LEDGER_BRANCH, key, entry.to_json(), if_match=None
            )


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
    for _ in range(LEDGER_TRIES):
        recorded = ledger.schedulings(workflow_id, slot, incarnation.task_id)
        later = [r for r in recorded if fences.later_scheduling(r, incarnation)]
        if later:
            # An attempt of a later scheduling of this task id resolved already: this
            # delivery is superseded (a rerun or a revival replaced its scheduling).
            newest = max(later, key=fences.scheduling_order)
            raise Superseded(
                f"task {incarnation.task_id} was rescheduled after this delivery (the ledger "
                f"holds a later scheduling: retry {newest.retry_count}, scheduled "
                f"{newest.scheduled_time}, started {newest.start_time})"
            )
        own = ledger.entry(workflow_id, slot, incarnation, recorded)
        decided = fences.link_execution(slot, incarnation, own)
        fresh = fences.starts_execution(incarnation, own, own_link=len(links) == 1)
        for link in links[1:]:
            if decided is not None:
                break
            entry = ledger.entry(workflow_id, slot, link)
            decided = fences.link_execution(slot, link, entry)
            fresh = fences.starts_execution(link, entry, own_link=False)
        if decided is None:  # unreachable: the chain's last link retries nothing
            raise LineageError(f"no root found for task {incarnation.task_id}")
        key, root = decided
        if own is not None and fences.same_scheduling(own.incarnation, incarnation):
            break  # this scheduling's entry exists: it decided, as it decides every delivery
        try:
            ledger.create(workflow_id, slot, LedgerEntry(incarnation, key, root))
        except PreconditionFailed:
            continue  # another delivery of this scheduling wrote first: decide from its entry
        break
    else:
        raise LineageError(
            f"the ledger entry of task {incarnation.task_id} kept changing ({LEDGER_TRIES} tries)"
        )
    started_ms = root.scheduled_time or root.start_time
    not_before = max(0.0, started_ms / 1000 - clock_skew_seconds) if started_ms else 0.0
    # A manual execution (`exec --publish`) may be re-run with its id after gc removed its
    # ledger entries (`gc.MANUAL_ANSWER`): its history is always read.
    fresh = fresh and not fences.is_manual(workflow_id)
    return Execution(key, slot, root, target, input_ref, not_before, fresh=fresh)
