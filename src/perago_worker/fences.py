"""The attempt fence, the delivery token, the execution identity and the publish fence (pure).

Conductor delivers a task at least once and recomputes a retry's input, so neither the
input nor the task id alone says which *logical execution* an attempt belongs to. The rules
here are read from Conductor 3.32's own model (`WorkflowExecutorOps`, `ExecutionService`);
docs/fences.md has the table of cases.

* An **incarnation** is one scheduling of one task id: (task id, retryCount, scheduledTime,
  startTime). A re-delivery of the same scheduling keeps all four (a poll sets startTime only
  when it is 0). Rerun-from-task resets scheduledTime and startTime on the same task id and
  keeps retryCount; a rerun's sibling reset sets a new startTime; a retry either makes a new
  task id with `retriedTaskId` (and retryCount + 1) or, for the cancelled siblings a parent
  retry revives, keeps the task id and bumps retryCount.
* An **execution** is a chain of incarnations linked by retries (`root_of` checks the chain
  `retriedTaskId` draws). Conductor does not record a rerun anywhere (a rerun task even keeps
  its `retriedTaskId`), so the worker keeps its own memory: the *execution ledger*, one
  create-only entry per scheduling an attempt resolved, holding its execution. Walking
  the chain from the attempt, the first link the ledger knows decides (`link_execution`):
  the same scheduling continues its execution, a bumped retryCount continues it too (a retry
  that kept the task id), any other reset starts a new one (a rerun); a link the ledger does
  not know defers to the task it retries, and the chain's last link is a new root.
* The **execution key** hashes the *slot* (workflow id, reference name, task type,
  repository, branch, prefix) and the root incarnation. So every retry and re-delivery
  shares it whatever its input says; a restart, a rerun or a rerun's sibling reset is a new
  root, hence a new execution; two targets never share one.
* The **delivery token** is the `workerId` the worker sent with the poll that delivered
  the attempt: the worker id plus a nonce drawn per poll request. Conductor stores it on the
  task, and no later delivery (another poll, by any worker, of any incarnation) carries it.
  The attempt fence compares it, so an attempt superseded by *any* later poll is dead.
* The **publish fence** is an intent branch named from the execution key, created
  atomically at the staged commit (whoever creates it owns the publish), *plus* the target
  branch's own history: every merge commit carries the execution key, and no merge is sent
  before the history since the execution began shows none for the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from perago_worker.conductor import TaskState

INTENT_PREFIX = "perago-intent-"
STAGING_PREFIX = "perago-stage-"
META_EXECUTION = "perago.execution"
META_SLOT = "perago.slot"
META_ROOT_TASK = "perago.root_task_id"
META_ROOT_RETRY = "perago.root_retry_count"
META_TOKEN = "perago.token"  # noqa: S105 (a metadata key, not a secret)
META_STAGED = "perago.staged_commit"
META_RESULT = "perago.result"
META_MANUAL = "perago.manual"
MANUAL_PREFIX = "manual-"
TOKEN_SEPARATOR = "#"  # noqa: S105


@dataclass(frozen=True)
class Verdict:
    live: bool
    kind: str = ""
    reason: str = ""


def delivery_token(worker_id: str, nonce: str | None = None) -> str:
    """The `workerId` to poll with: unique per poll request, so per delivery."""
    return f"{worker_id}{TOKEN_SEPARATOR}{nonce or secrets.token_hex(6)}"


def attempt_verdict(state: TaskState | None, token: str, poll_count: int) -> Verdict:
    """Pure: may the attempt delivered with `token` (and `poll_count`) still act on its task?"""
    if state is None:
        return Verdict(False, "gone", "Conductor no longer knows the task")
    if state.status != "IN_PROGRESS":
        return Verdict(False, "not_in_progress", f"task is {state.status}")
    if state.worker_id != token:
        return Verdict(
            False,
            "superseded",
            f"task was delivered again (held by {state.worker_id!r}, this attempt is {token!r})",
        )
    if state.poll_count != poll_count:
        return Verdict(
            False,
            "redelivered",
            f"task was polled again (poll count {state.poll_count} != {poll_count})",
        )
    return Verdict(True)


# -- execution identity ------------------------------------------------------------------


@dataclass(frozen=True)
class Incarnation:
    """One scheduling of one task id, as `GET /api/tasks/{id}` or a poll shows it."""

    task_id: str
    retry_count: int
    scheduled_time: int
    start_time: int
    retried_task_id: str = ""

    @classmethod
    def of(cls, task: Any) -> Incarnation:
        """From a conductor-python `Task` (the poll's or a read-back's)."""
        return cls(
            task_id=str(task.task_id),
            retry_count=int(task.retry_count or 0),
            scheduled_time=int(task.scheduled_time or 0),
            start_time=int(task.start_time or 0),
            retried_task_id=str(task.retried_task_id or ""),
        )


@dataclass(frozen=True)
class Target:
    repository: str
    branch: str
    prefix: str


class LineageError(Exception):
    """The `retriedTaskId` chain is not a chain (a cycle, a broken link, too deep)."""


def _digest(*parts: Any) -> str:
    # JSON-encoding the whole tuple keeps field boundaries unambiguous whatever they contain.
    material = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(material.encode()).hexdigest()


def slot_key(workflow_id: str, reference_name: str, task_type: str, target: Target) -> str:
    """What every execution of one task in one workflow run, for one target, shares."""
    return _digest(
        "slot", workflow_id, reference_name, task_type, target.repository, target.branch,
        target.prefix,
    )  # fmt: skip


def root_of(chain: Sequence[Incarnation], *, max_depth: int = 1000) -> Incarnation:
    """Pure: the root of a retry chain `[attempt, retried, retried's retried, ...]`.

    Each element must be the task the previous one's `retriedTaskId` names; the last must
    name none. A chain that loops or breaks is refused (a corrupt or foreign read-back must
    not silently become a new execution that merges again).
    """
    if not chain:
        raise LineageError("empty retry chain")
    if len(chain) > max_depth:
        raise LineageError(f"retry chain deeper than {max_depth}")
    seen: set[str] = set()
    for here, there in itertools.pairwise(chain):
        if here.task_id in seen:
            raise LineageError(f"retry chain loops at task {here.task_id}")
        seen.add(here.task_id)
        if here.retried_task_id != there.task_id:
            raise LineageError(
                f"task {here.task_id} retries {here.retried_task_id!r}, not {there.task_id}"
            )
    root = chain[-1]
    if root.retried_task_id:
        raise LineageError(f"retry chain stops before its root (at {root.task_id})")
    if root.task_id in seen:
        raise LineageError(f"retry chain loops at task {root.task_id}")
    return root


def execution_key(slot: str, root: Incarnation) -> str:
    """The identity of the execution whose root incarnation is `root`, in `slot`."""
    return _digest(
        "execution", slot, root.task_id, root.retry_count, root.scheduled_time, root.start_time
    )


@dataclass(frozen=True)
class PublishRecord:
    """What a merge commit on a target says about the execution that made it."""

    commit_id: str
    execution: str
    slot: str
    root_task_id: str
    root_retry_count: int
    staged_commit: str

    @classmethod
    def parse(cls, commit_id: str, metadata: dict[str, str]) -> PublishRecord | None:
        """A perago merge commit's record, or None for any other commit."""
        execution = metadata.get(META_EXECUTION)
        staged = metadata.get(META_STAGED)
        if not execution or not staged:
            return None  # not a merge commit of ours (a staged commit carries no META_STAGED)
        try:
            root_retry = int(metadata.get(META_ROOT_RETRY, "0"))
        except ValueError:
            root_retry = 0
        return cls(
            commit_id=commit_id,
            execution=execution,
            slot=metadata.get(META_SLOT, ""),
            root_task_id=metadata.get(META_ROOT_TASK, ""),
            root_retry_count=root_retry,
            staged_commit=staged,
        )


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger remembers of one task id: the newest incarnation an attempt resolved
    for it, and the execution (key and root) that incarnation belongs to."""

    incarnation: Incarnation
    execution: str
    root: Incarnation

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "incarnation": _incarnation_json(self.incarnation),
                "execution": self.execution,
                "root": _incarnation_json(self.root),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LedgerEntry:
        raw = json.loads(data)
        return cls(
            _incarnation_of(raw["incarnation"]), str(raw["execution"]), _incarnation_of(raw["root"])
        )


def _incarnation_json(inc: Incarnation) -> dict[str, Any]:
    return {
        "task_id": inc.task_id,
        "retry_count": inc.retry_count,
        "scheduled_time": inc.scheduled_time,
        "start_time": inc.start_time,
        "retried_task_id": inc.retried_task_id,
    }


def _incarnation_of(raw: dict[str, Any]) -> Incarnation:
    return Incarnation(
        task_id=str(raw["task_id"]),
        retry_count=int(raw["retry_count"]),
        scheduled_time=int(raw["scheduled_time"]),
        start_time=int(raw["start_time"]),
        retried_task_id=str(raw.get("retried_task_id", "")),
    )


def same_scheduling(a: Incarnation, b: Incarnation) -> bool:
    """Pure: are `a` and `b` the same scheduling of the same task id?"""
    return (a.task_id, a.retry_count, a.scheduled_time, a.start_time) == (
        b.task_id, b.retry_count, b.scheduled_time, b.start_time,
    )  # fmt: skip


def scheduling_order(inc: Incarnation) -> tuple[int, int, int]:
    """The order of one task id's schedulings: every reset Conductor makes moves it forward
    (a revival bumps retryCount, a rerun sets a new scheduledTime, a rerun's sibling reset a
    new startTime)."""
    return inc.retry_count, inc.scheduled_time, inc.start_time


def later_scheduling(a: Incarnation, b: Incarnation) -> bool:
    """Pure: is `a` a later scheduling of the same task id than `b`?"""
    return a.task_id == b.task_id and scheduling_order(a) > scheduling_order(b)


def deciding_scheduling(link: Incarnation, recorded: Iterable[Incarnation]) -> Incarnation | None:
    """Pure: which recorded scheduling's ledger entry decides `link`.

    Its own scheduling's entry if there is one, else the latest earlier one of its task id
    (the scheduling a revival or a rerun replaced); later ones never decide an earlier link.
    """
    recorded = list(recorded)
    for r in recorded:
        if same_scheduling(r, link):
            return r
    return max(
        (r for r in recorded if later_scheduling(link, r)), default=None, key=scheduling_order
    )


def link_execution(
    slot: str, link: Incarnation, entry: LedgerEntry | None
) -> tuple[str, Incarnation] | None:
    """Pure: the execution decided at one link of a retry chain, or None to look further back.

    * The ledger holds this very scheduling: it is the execution an attempt of it already
      resolved (a re-delivery, or the retried task's own execution).
    * The ledger holds an earlier scheduling of this task id with a lower retryCount: the task
      was revived by a retry that kept its id (a parent retry of a cancelled sibling), so it
      continues that execution.
    * The ledger holds another scheduling with the same retryCount: Conductor reset the task
      without a retry, which only a rerun does; a new execution starts here, whatever the
      task's `retriedTaskId` still says.
    * No entry: no attempt of this task id resolved anything; a task that retries nothing is
      the root of a new execution, one that retries another task defers to it.
    """
    if entry is not None:
        if same_scheduling(entry.incarnation, link):
            return entry.execution, entry.root
        if link.retry_count > entry.incarnation.retry_count:
            return entry.execution, entry.root
        return execution_key(slot, link), link
    if not link.retried_task_id:
        return execution_key(slot, link), link
    return None


def starts_execution(link: Incarnation, entry: LedgerEntry | None, *, own_link: bool) -> bool:
    """Pure: is it *proven* that no attempt has resolved the execution `link_execution`
    decided at `link` (so none can have claimed or merged it)? `Execution.fresh`: only then
    may the attempt skip the history and intent reads before its first merge.

    * A reset (a rerun) of a scheduling the ledger knows: yes. The new execution starts at
      this attempt's own resolve, and every attempt resolves before it can claim.
    * A scheduling the ledger knows, continued (a re-delivery, a retry): no.
    * A link the ledger does not know: only when it is the attempt's own first scheduling
      (`own_link`: the chain is the attempt alone, and its retryCount is 0). A retry chain the
      ledger knows nothing of, or a revived task (retryCount above 0), had earlier attempts;
      their entries are missing because none of them resolved, or because the entries were
      removed (by hand; gc keeps a workflow's entries while Conductor still knows it). Their
      merge may be in the history, so the history is read.
    """
    if entry is None:
        return own_link and not link.retried_task_id and link.retry_count == 0
    continues = same_scheduling(entry.incarnation, link) or (
        link.retry_count > entry.incarnation.retry_count
    )
    return not continues


def find_publish(records: Iterable[PublishRecord], execution: str) -> PublishRecord | None:
    """Pure: the merge that published `execution`, if the records hold one."""
    for record in records:
        if record.execution == execution:
            return record
    return None


class _Dated(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def creation_date(self) -> int: ...


def history_ends(commit: _Dated, *, not_before: float) -> bool:
    """Pure: may a newest-first first-parent walk stop at `commit`?

    An execution's merge lands after its root was scheduled, so the walk ends at the first
    commit older than `not_before` (the root's scheduled time less the allowed clock skew).
    It does not end at the attempt's input commit: a retry's input is recomputed and may
    name the execution's own merge, or a later commit.
    """
    return commit.creation_date < not_before


# -- manual executions (`perago-worker exec --publish`) -------------------------------------

_MANUAL = re.compile(rf"^{MANUAL_PREFIX}(?P<ms>[0-9]{{13}})-(?P<nonce>[0-9a-f]{{8,32}})$", re.ASCII)


def manual_execution_id(now: float, nonce: str | None = None) -> str:
    """`manual-<unix ms>-<hex>`: one logical execution of one task outside Conductor.

    It stands for the workflow id, the task id and the root scheduling at once, so a manual
    execution resolves through the same ledger and publish fence as a task. Its start time
    is in the name so that a re-run with the same id (after a crash) bounds the history walk
    the way a task's scheduled time does.
    """
    return f"{MANUAL_PREFIX}{int(now * 1000):013d}-{nonce or secrets.token_hex(4)}"


def manual_started_ms(execution_id: str) -> int | None:
    """Pure: the start (unix ms) a manual execution id carries, or None if it is not one."""
    match = _MANUAL.match(execution_id)
    return int(match.group("ms")) if match else None


def is_manual(workflow_id: str) -> bool:
    """A workflow id that names a manual execution: no Conductor workflow stands behind it."""
    return manual_started_ms(workflow_id) is not None


# -- branch names --------------------------------------------------------------------------


def intent_branch(execution: str) -> str:
    return f"{INTENT_PREFIX}{execution[:48]}"


def staging_branch(task_id: str, attempt_uid: str, created: float) -> str:
    """`perago-stage-<task id>-<created, hex seconds>-<uid>`: gc reads owner and age off it."""
    # lakeFS checks names with Go's ASCII-only \w: keep ASCII letters and digits only.
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in task_id)[:40]
    return f"{STAGING_PREFIX}{safe}-{int(created):x}-{attempt_uid}"


_STAGING = re.compile(
    rf"^{STAGING_PREFIX}(?P<task>[-\w]+)-(?P<created>[0-9a-f]+)-(?P<uid>[0-9a-f]+)$", re.ASCII
)


def parse_staging_branch(name: str) -> tuple[str, float] | None:
    """Pure: (task id, created unix time) of a staging branch name, or None."""
    match = _STAGING.match(name)
    if match is None:
        return None
    return match.group("task"), float(int(match.group("created"), 16))
