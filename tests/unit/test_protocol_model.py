"""A model of the exactly-once protocol, explored over interleavings (proof (a)).

Pure Python. The servers: a Conductor that schedules, polls, re-delivers, times out, retries
(with a new task id, or a parent retry reviving a cancelled task under its own id), cancels,
reruns from the task and restarts one task of one workflow, field by field as Conductor
3.32's `WorkflowExecutorOps` does (a rerun keeps `retriedTaskId` and `retryCount`); a lakeFS
with a target branch (first-parent history, newest first), atomic branch creation, merges
without compare-and-swap (merging a commit that is already merged answers "no changes"),
create-only objects for the execution ledger (one per scheduling) and a gc that deletes
intent branches once the workflow is terminal (and keeps the ledger while Conductor knows the
workflow, as `gc.collect` does). The workers run the protocol of
`attempt.py`, `execution.py` and `publish.py` one step per rule and may crash between any
two steps:

1. a poll delivers the attempt: its token (`delivery_token`) and its `Incarnation`;
2. `resolve`: the retry chain by GET, the ledger's entries for it (a later scheduling
   there: `later_scheduling`, stand down), the first link `link_execution` decides (the
   key, the root; `starts_execution`: proven fresh); `record`: create the scheduling's
   `LedgerEntry` (another delivery created it first: resolve again, from its entry);
3. unless fresh: the history back to the root's scheduling (`history_ends`,
   `find_publish`) holds the merge: report it; else an intent exists: adopt it (to 7);
4. the handler ran: a staged commit; 5. the attempt fence (`attempt_verdict`);
6. claim the intent (`intent_branch`), or adopt the one there;
7. the history check again (skipped once, before the first request of a fresh execution
   whose intent this attempt created: `merge_once(unpublished=True)`), then the attempt
   fence; 8. the merge request (the intent branch; "no changes" goes back to 7); 9. the
   fence, and a COMPLETED report.

Every decision goes through the real pure functions of `perago_worker.fences`; the model
keeps the ground truth (the logical execution each scheduling belongs to, the attempt
holding the newest delivery) only to judge the outcome, after every step:

* I1 at most one merge commit on the target per ground-truth execution;
* I2 no merge by an attempt that was superseded, or whose task was terminal, at its last
  pre-merge fence read (superseded after it is the documented fence-to-merge window), and
  the attempt fence agrees with the ground truth at every read;
* I3 one key per execution and one execution per key, in the merges and in the keys the
  attempts compute;
* I4 a COMPLETED report returns a merge of the attempt's own execution;
* I5 Conductor accepts a COMPLETED report only from the attempt holding the task.

The known, documented limitation is left out of I3 and I4 by name (see `World.resolve`);
nothing else is left out. What the model found along the way is kept as specifications
(the merge names the intent branch; the ledger is create-only, one object per scheduling;
a delivery that finds a later scheduling recorded stands down).
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import Enum

from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
)

from perago_worker.conductor import TaskState
from perago_worker.fences import (
    INTENT_PREFIX,
    META_EXECUTION,
    META_ROOT_RETRY,
    META_ROOT_TASK,
    META_SLOT,
    META_STAGED,
    META_TOKEN,
    Incarnation,
    LedgerEntry,
    PublishRecord,
    Target,
    attempt_verdict,
    delivery_token,
    execution_key,
    find_publish,
    history_ends,
    intent_branch,
    later_scheduling,
    link_execution,
    root_of,
    same_scheduling,
    slot_key,
    starts_execution,
)

WORKFLOW_ID = "wf-1"
REFERENCE = "publish"
TASK_TYPE = "perago_publish"
TARGET = Target("repo", "main", "data/")
MAX_ATTEMPTS = 7  # deliveries per example: keeps the explored state small
LEDGER_TRIES = 5  # `execution.LEDGER_TRIES`
TERMINAL = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "CANCELED"})


def slot_of(target: Target = TARGET) -> str:
    return slot_key(WORKFLOW_ID, REFERENCE, TASK_TYPE, target)


def ledger_key(inc: Incarnation) -> tuple[str, int, int, int]:
    """`execution.ledger_key`: one object per scheduling (one workflow, one slot here)."""
    return inc.task_id, inc.retry_count, inc.scheduled_time, inc.start_time


# -- the servers' state ----------------------------------------------------------------------


@dataclass
class Task:
    """A task as Conductor stores it (the fields the protocol reads)."""

    task_id: str
    status: str
    retry_count: int
    scheduled_time: int
    input_ref: str
    worker_id: str | None = None
    poll_count: int = 0
    start_time: int = 0
    retried_task_id: str = ""

    def snapshot(self) -> Task:
        return Task(**vars(self))


@dataclass(frozen=True)
class Commit:
    id: str
    creation_date: int
    metadata: dict[str, str] = field(default_factory=dict)
    merged_from: str = ""  # a merge commit's second parent (the commit it merged)


# -- the worker -------------------------------------------------------------------------------


class Phase(Enum):
    DELIVERED = "delivered"  # 1. polled: token, poll count and incarnation known
    DECIDED = "decided"  # 2. chain and ledger read: execution key known
    RESOLVED = "resolved"  # 2. the scheduling's ledger entry exists
    CHECKED = "checked"  # 3. no publish, no intent: run the handler
    STAGED = "staged"  # 4. staged commit made
    FENCED = "fenced"  # 5. the attempt fence said live
    CLAIMED = "claimed"  # 6. (or 3.) the commit to merge is the intent's
    READY = "ready"  # 7. no publish in the history, the fence said live: merge next
    FOUND = "found"  # 3./7. the history holds the execution's merge: report it
    MERGED = "merged"  # 8. merged: report it
    DONE = "done"  # stopped, or reported
    CRASHED = "crashed"


ACTIVE = frozenset(Phase) - {Phase.DONE, Phase.CRASHED}


@dataclass
class Attempt:
    name: str
    task_id: str
    token: str
    poll_count: int
    incarnation: Incarnation
    input_ref: str
    execution: int  # ground truth, for the invariants only: the worker never reads it
    phase: Phase = Phase.DELIVERED
    root: Incarnation | None = None
    key: str = ""
    own: LedgerEntry | None = None  # the entry that decided the attempt's own link, as read
    tries: int = 0  # resolves so far (`LEDGER_TRIES`)
    fresh: bool = False  # proven: no attempt resolved the execution yet (`starts_execution`)
    claimed_own: bool = False  # its claim created the intent (not an adoption)
    history_read: bool = False  # the history was searched since the claim
    staged: str = ""
    source: str = ""  # the staged commit the attempt will merge (its own or the intent's)
    ref: str = ""
    live_at_premerge: bool = False  # ground truth at its last pre-merge fence read
    known_limitation: bool = False

    def __str__(self) -> str:
        return f"{self.name}({self.task_id}, execution {self.execution})"


@dataclass(frozen=True)
class Report:
    attempt: Attempt
    ref: str


class World:
    """Conductor, lakeFS and the ground truth, with the worker's steps as methods."""

    def __init__(self) -> None:
        self.now = 0
        self.ids = itertools.count(1)
        # Conductor
        self.tasks: dict[str, Task] = {}
        self.current = ""  # the slot's newest task id
        self.workflow = "RUNNING"
        # lakeFS
        # The ledger (one workflow, one slot): an object per scheduling, created, never replaced.
        self.ledger: dict[tuple[str, int, int, int], LedgerEntry] = {}
        self.base = Commit("c0", 0)
        self.history: list[Commit] = [self.base]  # the target, newest first
        self.branches: dict[str, str] = {}  # hidden branches (intents): name -> commit id
        # workers
        self.attempts: list[Attempt] = []
        self.reports: list[Report] = []
        self.accepted_from_dead: list[Attempt] = []
        self.wrong_verdicts: list[str] = []
        # ground truth
        self.executions = itertools.count()
        self.execution_of: dict[str, int] = {}  # task id -> execution of its scheduling
        self.reruns: dict[int, tuple[str, int]] = {}  # execution -> its rerun's task, retry
        self.latest_delivery: dict[str, str] = {}  # task id -> attempt holding the newest poll
        self.merged_by: dict[str, Attempt] = {}  # merge commit id -> attempt that sent it
        self.recorded: set[int] = set()  # executions some attempt wrote a ledger entry for
        self.limited: set[int] = set()  # executions under the known limitation (see below)
        self.computed: dict[str, set[int]] = defaultdict(set)  # key -> executions computing it
        self._new_task(retry_count=0, retried="", input_ref=self.base.id)

    def tick(self) -> int:
        self.now += 1
        return self.now

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids)}"

    # -- Conductor -------------------------------------------------------------------------

    @property
    def task(self) -> Task:
        return self.tasks[self.current]

    @property
    def workflow_terminal(self) -> bool:
        return self.workflow != "RUNNING"

    def _new_task(self, *, retry_count: int, retried: str, input_ref: str) -> None:
        task = Task(self.new_id("t"), "SCHEDULED", retry_count, self.tick(), input_ref)
        task.retried_task_id = retried
        self.tasks[task.task_id] = task
        self.current = task.task_id
        if retried:
            self.execution_of[task.task_id] = self.execution_of[retried]
        else:
            self.execution_of[task.task_id] = next(self.executions)

    def _input(self, task: Task, drift: bool) -> str:
        return self.history[0].id if drift else task.input_ref

    def get(self, task_id: str) -> Task | None:
        """GET /api/tasks/{id}."""
        task = self.tasks.get(task_id)
        return task.snapshot() if task else None

    def state(self, task_id: str) -> TaskState | None:
        task = self.get(task_id)
        if task is None:
            return None
        return TaskState(
            task_id=task.task_id,
            status=task.status,
            worker_id=task.worker_id,
            poll_count=task.poll_count,
            retry_count=task.retry_count,
            scheduled_time=task.scheduled_time,
            start_time=task.start_time,
            retried_task_id=task.retried_task_id,
            workflow_id=WORKFLOW_ID,
        )

    def can_poll(self) -> bool:
        return (
            self.task.status == "SCHEDULED"
            and not self.workflow_terminal
            and len(self.attempts) < MAX_ATTEMPTS
        )

    def poll(self) -> Attempt:
        assert self.can_poll()
        self.task.status = "IN_PROGRESS"
        return self._deliver(self.task)

    def can_redeliver(self) -> bool:
        return self.task.status == "IN_PROGRESS" and len(self.attempts) < MAX_ATTEMPTS

    def redeliver(self) -> Attempt:
        """Another poll of the same IN_PROGRESS scheduling."""
        assert self.can_redeliver()
        return self._deliver(self.task)

    def _deliver(self, task: Task) -> Attempt:
        now = self.tick()
        name = f"a{len(self.attempts) + 1}"
        token = delivery_token("worker", nonce=name)  # a fresh nonce per poll request
        task.worker_id = token
        task.poll_count += 1
        if task.start_time == 0:
            task.start_time = now
        self.latest_delivery[task.task_id] = name
        attempt = Attempt(
            name=name,
            task_id=task.task_id,
            token=token,
            poll_count=task.poll_count,
            incarnation=Incarnation.of(task.snapshot()),
            input_ref=task.input_ref,
            execution=self.execution_of[task.task_id],
        )
        self.attempts.append(attempt)
        return attempt

    def can_time_out(self) -> bool:
        return self.task.status in ("SCHEDULED", "IN_PROGRESS")

    def time_out(self, *, retry: bool = True, drift: bool = False) -> None:
        """A timeout (or a failure): a retry with a new task id, retryCount + 1, or, with no
        retries left, the workflow fails."""
        assert self.can_time_out()
        task = self.task
        task.status = "TIMED_OUT"
        self.tick()
        if retry:
            self._retry_new_id(task, drift)
        else:
            self.workflow = "FAILED"

    def _retry_new_id(self, task: Task, drift: bool) -> None:
        self._new_task(
            retry_count=task.retry_count + 1,
            retried=task.task_id,
            input_ref=self._input(task, drift),
        )

    def can_cancel(self) -> bool:
        return self.task.status in ("SCHEDULED", "IN_PROGRESS")

    def cancel(self) -> None:
        """Terminate (or a sibling failed the workflow): the task is CANCELED."""
        assert self.can_cancel()
        self.tick()
        self.task.status = "CANCELED"
        self.workflow = "TERMINATED"

    def can_retry_workflow(self) -> bool:
        return self.workflow in ("FAILED", "TERMINATED")

    def retry_workflow(self, *, drift: bool = False) -> None:
        """POST /workflow/{id}/retry: a failed task is retried with a new id; a cancelled
        one is revived under its own id (retryCount + 1, pollCount 0, a new scheduling)."""
        assert self.can_retry_workflow()
        task = self.task
        if task.status == "CANCELED":
            execution = self.execution_of[task.task_id]
            if execution in self.reruns and execution not in self.recorded:
                self.limited.add(execution)  # revived after a rerun the ledger never saw
            task.retry_count += 1
            task.poll_count = 0
            task.worker_id = None
            task.scheduled_time = self.tick()
            task.start_time = 0
            task.status = "SCHEDULED"
            task.input_ref = self._input(task, drift)
        else:
            self.tick()
            self._retry_new_id(task, drift)
        self.workflow = "RUNNING"

    def can_rerun(self) -> bool:
        return self.workflow_terminal

    def rerun(self, *, drift: bool = False) -> None:
        """Rerun from the task: same id, same retryCount and retriedTaskId, a new scheduling
        (`rerunWF`): a new execution."""
        assert self.can_rerun()
        task = self.task
        unrecorded = ledger_key(Incarnation.of(task)) not in self.ledger
        retried = task.retry_count > 0 or bool(task.retried_task_id)
        task.scheduled_time = self.tick()
        task.start_time = 0
        task.poll_count = 0
        task.status = "SCHEDULED"
        task.input_ref = self._input(task, drift)
        execution = next(self.executions)
        self.execution_of[task.task_id] = execution
        self.reruns[execution] = (task.task_id, task.retry_count)
        if unrecorded and retried:
            # The known limitation's other face (docs/fences.md): a rerun of a retry copy or
            # a revival no attempt resolved continues the execution before it.
            self.limited.add(execution)
        self.workflow = "RUNNING"

    def restart(self, *, drift: bool = False) -> None:
        """Restart (or a whole rerun): a brand-new task id: a new execution."""
        assert self.can_rerun()
        self._new_task(retry_count=0, retried="", input_ref=self._input(self.task, drift))
        self.workflow = "RUNNING"

    def complete(self, task_id: str) -> bool:
        """A COMPLETED report: Conductor ignores updates to terminal tasks."""
        task = self.tasks[task_id]
        if task.status in TERMINAL:
            return False
        task.status = "COMPLETED"
        if task_id == self.current:
            self.workflow = "COMPLETED"
        return True

    # -- lakeFS ----------------------------------------------------------------------------

    def intents(self) -> list[str]:
        return sorted(self.branches)

    def gc(self, name: str) -> None:
        """gc deletes an intent branch once its workflow is terminal."""
        assert self.workflow_terminal
        del self.branches[name]

    # gc keeps a workflow's ledger entries while Conductor knows the workflow (it can be
    # retried); `gc_removes_the_ledger` models removing them with its intents (as gc did).
    gc_removes_the_ledger = False

    def collect_all(self) -> None:
        for name in self.intents():
            self.gc(name)
        if self.gc_removes_the_ledger:
            self.ledger.clear()

    def foreign_commit(self) -> None:
        """Someone else commits to the target."""
        self.history.insert(0, Commit(self.new_id("f"), self.tick()))

    def schedulings(self, task_id: str) -> list[Incarnation]:
        """`Ledger.schedulings`: the schedulings of `task_id` the ledger holds entries for."""
        return [e.incarnation for k, e in self.ledger.items() if k[0] == task_id]

    def entry(self, link: Incarnation) -> LedgerEntry | None:
        """`Ledger.entry`: the link's own scheduling's entry, else the latest earlier one's."""
        recorded = self.schedulings(link.task_id)
        exact = [r for r in recorded if same_scheduling(r, link)]
        earlier = [r for r in recorded if later_scheduling(link, r)]
        order = lambda i: (i.retry_count, i.scheduled_time, i.start_time)  # noqa: E731
        chosen = exact[0] if exact else max(earlier, default=None, key=order)
        return None if chosen is None else self.ledger[ledger_key(chosen)]

    def records(self) -> list[PublishRecord]:
        """The target's whole first-parent history as publish records, newest first."""
        parsed = (PublishRecord.parse(c.id, c.metadata) for c in self.history)
        return [r for r in parsed if r is not None]

    def records_since(self, not_before: int) -> list[PublishRecord]:
        """Newest first, stopping before the first commit `history_ends` accepts."""
        out: list[PublishRecord] = []
        for commit in self.history:
            if history_ends(commit, not_before=not_before):
                break
            record = PublishRecord.parse(commit.id, commit.metadata)
            if record is not None:
                out.append(record)
        return out

    def merges(self) -> list[Commit]:
        return [c for c in self.history if c.merged_from]

    def merges_of(self, execution: int) -> int:
        return sum(self.merged_by[c.id].execution == execution for c in self.merges())

    # -- the worker's steps ----------------------------------------------------------------

    def truly_live(self, attempt: Attempt) -> bool:
        """Ground truth: the attempt holds the newest delivery of an IN_PROGRESS task."""
        task = self.tasks[attempt.task_id]
        return task.status == "IN_PROGRESS" and self.latest_delivery[task.task_id] == attempt.name

    def fence(self, attempt: Attempt) -> bool:
        """The attempt fence: GET the task, `attempt_verdict`."""
        verdict = attempt_verdict(self.state(attempt.task_id), attempt.token, attempt.poll_count)
        if verdict.live != self.truly_live(attempt):
            self.wrong_verdicts.append(f"{attempt}: {verdict}")
        return verdict.live

    def published(self, attempt: Attempt) -> PublishRecord | None:
        """`execution.published`: the history back to the root's scheduling holds the merge."""
        assert attempt.root is not None
        not_before = attempt.root.scheduled_time or attempt.root.start_time
        return find_publish(self.records_since(not_before), attempt.key)

    def resolve(self, attempt: Attempt) -> None:
        """2. `execution.resolve`: the retry chain by GET, the ledger's entries for it, the
        first link the ledger decides (`link_execution`)."""
        assert attempt.phase is Phase.DELIVERED
        self.tick()
        links = [attempt.incarnation]
        while links[-1].retried_task_id and len(links) <= 64:
            state = self.state(links[-1].retried_task_id)
            if state is None:
                break
            links.append(Incarnation.of(state))
        root_of(links)  # refuses a chain that loops or breaks
        slot = slot_of()
        attempt.tries += 1
        later = [
            r for r in self.schedulings(attempt.task_id) if later_scheduling(r, attempt.incarnation)
        ]
        if later or attempt.tries > LEDGER_TRIES:
            attempt.phase = Phase.DONE  # `Superseded` (or `LineageError`): stands down
            return
        attempt.own = self.entry(attempt.incarnation)
        decided = link_execution(slot, attempt.incarnation, attempt.own)
        attempt.fresh = self.proven_fresh(attempt.incarnation, attempt.own, len(links) == 1)
        for link in links[1:]:
            if decided is not None:
                break
            entry = self.entry(link)
            decided = link_execution(slot, link, entry)
            attempt.fresh = self.proven_fresh(link, entry, False)
        assert decided is not None, "the chain's last link retries nothing"
        attempt.key, attempt.root = decided
        # The known, documented limitation (docs/fences.md), as narrow as the ledger leaves
        # it: a scheduling no attempt wrote to the ledger cannot be told from the one before
        # it. A parent retry reviving a task after such a rerun, or a rerun from such a retry
        # copy or revival, continues the execution before it (`World.limited`). Its attempts
        # are left out of I3 and I4, by name; I1 and I2 still hold for them.
        attempt.known_limitation = attempt.execution in self.limited
        if not attempt.known_limitation:
            self.computed[attempt.key].add(attempt.execution)
        own = attempt.own
        if own is not None and same_scheduling(own.incarnation, attempt.incarnation):
            attempt.phase = Phase.RESOLVED  # this scheduling's entry decided: nothing to write
        else:
            attempt.phase = Phase.DECIDED

    # `starts_execution` proves an execution fresh only from what the ledger can vouch for;
    # `trust_an_unknown_chain` models the rule before it (any link the ledger did not know
    # was taken as fresh), which merged twice once gc removed ledger entries.
    trust_an_unknown_chain = False

    def proven_fresh(self, link: Incarnation, entry: LedgerEntry | None, own_link: bool) -> bool:
        if self.trust_an_unknown_chain and entry is None:
            return True
        return starts_execution(link, entry, own_link=own_link)

    def record(self, attempt: Attempt) -> None:
        """2. `Ledger.create`: the scheduling's entry, created with `If-None-Match: *`; if
        another delivery of the scheduling created it first, resolve again from its entry."""
        assert attempt.phase is Phase.DECIDED and attempt.root is not None
        self.tick()
        key = ledger_key(attempt.incarnation)
        if key in self.ledger:  # 412
            attempt.phase = Phase.DELIVERED
            return
        self.ledger[key] = LedgerEntry(attempt.incarnation, attempt.key, attempt.root)
        self.recorded.add(attempt.execution)
        attempt.phase = Phase.RESOLVED

    def adopt_check(self, attempt: Attempt) -> None:
        """3. A publish of the key in the history: return it. An intent: adopt its commit.
        (A fresh execution skips both reads; the merge still checks.)"""
        assert attempt.phase is Phase.RESOLVED
        self.tick()
        if attempt.fresh:
            attempt.phase = Phase.CHECKED
            return
        record = self.published(attempt)
        if record is not None:
            attempt.ref = record.commit_id
            attempt.phase = Phase.FOUND
            return
        staged = self.branches.get(intent_branch(attempt.key))
        if staged is not None:
            attempt.source = staged
            attempt.phase = Phase.CLAIMED
            return
        attempt.phase = Phase.CHECKED

    def stage(self, attempt: Attempt) -> None:
        """4. The handler ran; its changes are committed on a staging branch."""
        assert attempt.phase is Phase.CHECKED
        self.tick()
        attempt.staged = self.new_id("s")
        attempt.phase = Phase.STAGED

    def fence_staged(self, attempt: Attempt) -> None:
        """5. The attempt fence: a zombie stops here (no claim, no merge, no report)."""
        assert attempt.phase is Phase.STAGED
        self.tick()
        attempt.phase = Phase.FENCED if self.fence(attempt) else Phase.DONE

    def claim(self, attempt: Attempt) -> None:
        """6. Create the intent at the staged commit, or adopt the one that exists."""
        assert attempt.phase is Phase.FENCED
        self.tick()
        name = intent_branch(attempt.key)
        if name not in self.branches:  # lakeFS creates a branch atomically
            self.branches[name] = attempt.staged
            attempt.claimed_own = True
        attempt.source = self.branches[name]
        attempt.phase = Phase.CLAIMED

    def pre_merge(self, attempt: Attempt) -> None:
        """7. The history shows no publish of the key, then the fence says live. The search
        is skipped before the first request of a proven-fresh execution's own claim."""
        assert attempt.phase is Phase.CLAIMED
        self.tick()
        skip = attempt.fresh and attempt.claimed_own and not attempt.history_read
        attempt.history_read = True
        record = None if skip else self.published(attempt)
        if record is not None:
            attempt.ref = record.commit_id
            attempt.phase = Phase.FOUND
            return
        attempt.live_at_premerge = self.truly_live(attempt)
        attempt.phase = Phase.READY if self.fence(attempt) else Phase.DONE

    def merge(self, attempt: Attempt) -> None:
        """8. `publish.merge_once`'s request: merge the intent branch (no compare-and-swap);
        "no changes" sends the attempt back to 7 (the history check, then the fence)."""
        assert attempt.phase is Phase.READY and attempt.root is not None
        now = self.tick()
        source = self.merge_source(attempt)
        if source is None:  # 404: gc deleted the intent; nothing is merged
            attempt.phase = Phase.DONE
            return
        if source in {c.merged_from for c in self.history}:  # 400 "no changes"
            attempt.phase = Phase.CLAIMED
            return
        metadata = {
            META_EXECUTION: attempt.key,
            META_SLOT: slot_of(),
            META_ROOT_TASK: attempt.root.task_id,
            META_ROOT_RETRY: str(attempt.root.retry_count),
            META_STAGED: attempt.source,
            META_TOKEN: attempt.token,
        }
        commit = Commit(self.new_id("m"), now, metadata, merged_from=source)
        self.history.insert(0, commit)
        self.merged_by[commit.id] = attempt
        attempt.ref = commit.id
        attempt.phase = Phase.MERGED

    # `merge_once` merges the intent branch; `merge_staged_commit` models merging the staged
    # commit by id instead (what src did before the model found a second merge with it).
    merge_staged_commit = False

    def merge_source(self, attempt: Attempt) -> str | None:
        if self.merge_staged_commit:
            return attempt.source
        return self.branches.get(intent_branch(attempt.key))

    def report(self, attempt: Attempt) -> None:
        """9. The fence says live: report COMPLETED with the merge's ref."""
        assert attempt.phase in (Phase.FOUND, Phase.MERGED)
        self.tick()
        if self.fence(attempt):
            live = self.truly_live(attempt)
            if self.complete(attempt.task_id):
                self.reports.append(Report(attempt, attempt.ref))
                if not live:
                    self.accepted_from_dead.append(attempt)
        attempt.phase = Phase.DONE

    def crash(self, attempt: Attempt) -> None:
        """The worker dies: the attempt's memory is gone; what it wrote stays."""
        assert attempt.phase in ACTIVE
        attempt.phase = Phase.CRASHED

    def step(self, attempt: Attempt) -> None:
        steps = {
            Phase.DELIVERED: self.resolve,
            Phase.DECIDED: self.record,
            Phase.RESOLVED: self.adopt_check,
            Phase.CHECKED: self.stage,
            Phase.STAGED: self.fence_staged,
            Phase.FENCED: self.claim,
            Phase.CLAIMED: self.pre_merge,
            Phase.READY: self.merge,
            Phase.FOUND: self.report,
            Phase.MERGED: self.report,
        }
        steps[attempt.phase](attempt)

    def run(self, attempt: Attempt, until: Phase = Phase.DONE) -> Attempt:
        """Step the attempt until it reaches `until` or stops (or 50 steps went by)."""
        for _ in range(50):
            if attempt.phase is until or attempt.phase not in ACTIVE:
                break
            self.step(attempt)
        return attempt

    def waiting(self, *phases: Phase) -> list[Attempt]:
        return [a for a in self.attempts if a.phase in phases]

    # -- the guarantees --------------------------------------------------------------------

    def violations(self) -> list[str]:
        found: list[str] = []
        merges = [(c, self.merged_by[c.id]) for c in self.merges()]
        per_execution = Counter(by.execution for _, by in merges)
        for execution, count in per_execution.items():
            if count > 1:
                who = ", ".join(f"{c.id} by {by}" for c, by in merges if by.execution == execution)
                found.append(f"I1: execution {execution} merged {count} times: {who}")
        found += [
            f"I2: {c.id} merged by {by}, dead at its pre-merge fence read"
            for c, by in merges
            if not by.live_at_premerge
        ]
        found += [
            f"I2: the attempt fence disagreed with the truth: {w}" for w in self.wrong_verdicts
        ]
        keys_of: dict[int, set[str]] = defaultdict(set)
        executions_of: dict[str, set[int]] = defaultdict(set)
        for c, by in merges:
            keys_of[by.execution].add(c.metadata[META_EXECUTION][:8])
            if not by.known_limitation:
                executions_of[c.metadata[META_EXECUTION]].add(by.execution)
        found += [
            f"I3: execution {e} merged under keys {sorted(k)}"
            for e, k in keys_of.items()
            if len(k) > 1
        ]
        found += [
            f"I3: key {k[:8]} merged by executions {sorted(e)}"
            for k, e in executions_of.items()
            if len(e) > 1
        ]
        found += [
            f"I3: key {k[:8]} computed by executions {sorted(e)}"
            for k, e in self.computed.items()
            if len(e) > 1
        ]
        for report in self.reports:
            merger = self.merged_by.get(report.ref)
            if report.attempt.known_limitation:
                continue  # the documented rerun limitation (see `resolve`)
            if merger is None or merger.execution != report.attempt.execution:
                found.append(f"I4: {report.attempt} reported {report.ref}, merged by {merger}")
        found += [
            f"I5: COMPLETED accepted from {a}, not holding the task"
            for a in self.accepted_from_dead
        ]
        return found


# -- specifications, one behaviour each -------------------------------------------------------


def test_a_redelivery_of_the_same_scheduling_shares_the_key() -> None:
    world = World()
    first = world.run(world.poll(), Phase.RESOLVED)
    second = world.run(world.redeliver(), Phase.RESOLVED)
    assert second.token != first.token
    assert second.incarnation == first.incarnation
    assert second.key == first.key


def test_a_retry_with_drifting_input_shares_the_key() -> None:
    world = World()
    first = world.run(world.poll(), Phase.RESOLVED)
    world.foreign_commit()
    world.time_out(retry=True, drift=True)
    retry = world.run(world.poll(), Phase.RESOLVED)
    assert retry.task_id != first.task_id
    assert retry.input_ref != first.input_ref
    assert retry.key == first.key


def test_a_rerun_from_the_task_is_a_new_execution_with_a_new_merge() -> None:
    world = World()
    first = world.run(world.poll())
    world.rerun()
    rerun = world.run(world.poll())
    assert rerun.task_id == first.task_id
    assert rerun.key != first.key
    assert rerun.ref != first.ref  # a rerun never returns the old run's ref
    assert [r.ref for r in world.reports] == [first.ref, rerun.ref]
    assert world.violations() == []


def test_a_restart_is_a_new_execution_with_a_new_merge() -> None:
    world = World()
    first = world.run(world.poll())
    world.restart()
    restart = world.run(world.poll())
    assert restart.key != first.key
    assert len(world.merges()) == 2
    assert world.violations() == []


def test_two_targets_never_share_a_key() -> None:
    root = Incarnation("t1", retry_count=0, scheduled_time=1, start_time=2)
    targets = [
        TARGET,
        Target("repo", "main", "other/"),
        Target("repo", "dev", "data/"),
        Target("other", "main", "data/"),
    ]
    keys = {execution_key(slot_of(target), root) for target in targets}
    assert len(keys) == len(targets)
    assert len({intent_branch(key) for key in keys}) == len(targets)


def test_a_kill_between_claim_and_merge_the_retry_adopts_and_merges_once() -> None:
    world = World()
    first = world.run(world.poll(), Phase.CLAIMED)
    world.crash(first)
    world.time_out(retry=True)
    retry = world.run(world.poll())
    assert retry.staged == ""  # the handler did not run again
    assert world.merges()[0].merged_from == first.staged
    assert len(world.merges()) == 1
    assert [r.ref for r in world.reports] == [retry.ref]
    assert world.violations() == []


def test_a_kill_after_the_merge_the_retry_returns_that_merge() -> None:
    world = World()
    first = world.run(world.poll(), Phase.MERGED)
    world.crash(first)
    world.time_out(retry=True)
    retry = world.run(world.poll())
    assert retry.ref == first.ref
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_an_intent_deleted_by_gc_after_the_merge_the_history_prevents_a_second_merge() -> None:
    world = World()
    first = world.run(world.poll(), Phase.MERGED)
    world.crash(first)
    world.time_out(retry=False)  # the workflow fails: gc may delete the intent
    world.collect_all()
    assert world.branches == {}
    world.retry_workflow()
    retry = world.run(world.poll())
    assert retry.ref == first.ref
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_a_workflow_retry_after_gc_removed_the_intent_and_the_ledger_finds_the_merge() -> None:
    # Even with the ledger gone (removed by hand), a retry chain the ledger does not know is
    # not proven fresh: the retry reads the history and returns the merge.
    world = World()
    world.gc_removes_the_ledger = True
    first = world.run(world.poll(), Phase.MERGED)
    world.crash(first)  # merged, never reported
    world.time_out(retry=False)
    world.collect_all()
    assert world.branches == {} and world.ledger == {}
    world.retry_workflow(drift=True)
    retry = world.run(world.poll())
    assert not retry.fresh
    assert retry.ref == first.ref
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_trusting_an_unknown_retry_chain_as_fresh_would_merge_twice_after_gc() -> None:
    # Why `starts_execution` needs the attempt's own first scheduling to prove freshness (an
    # audit found this hole: both history reads were skipped for such a retry).
    world = World()
    world.gc_removes_the_ledger = True
    world.trust_an_unknown_chain = True
    first = world.run(world.poll(), Phase.MERGED)
    world.crash(first)
    world.time_out(retry=False)
    world.collect_all()
    world.retry_workflow()
    world.run(world.poll())
    assert len(world.merges()) == 2
    assert world.violations()[0].startswith("I1:")


def _retry_of_a_merged_rerun_after_gc(world: World) -> tuple[Attempt, Attempt]:
    world.time_out(retry=True)  # t1 times out unpolled: t2 retries it
    world.run(world.poll())  # t2 publishes and completes
    world.rerun()  # rerun from t2: a new execution at t2
    rerun = world.run(world.poll(), Phase.MERGED)
    world.crash(rerun)  # merged, never reported
    world.time_out(retry=False)
    world.collect_all()
    world.retry_workflow()  # t3 retries the rerun
    return rerun, world.run(world.poll())


def test_gc_keeps_the_ledger_so_a_retry_of_a_merged_rerun_returns_the_reruns_merge() -> None:
    world = World()
    rerun, retry = _retry_of_a_merged_rerun_after_gc(world)
    assert world.branches == {} and world.ledger != {}
    assert retry.key == rerun.key
    assert retry.ref == rerun.ref
    assert world.violations() == []


def test_removing_the_ledger_with_the_intents_would_give_a_rerun_the_run_before_it() -> None:
    # Why gc keeps a workflow's ledger entries while Conductor knows the workflow: without
    # them a retry of a rerun resolves to the execution before the rerun.
    world = World()
    world.gc_removes_the_ledger = True
    rerun, retry = _retry_of_a_merged_rerun_after_gc(world)
    assert retry.key != rerun.key
    assert any(v.startswith("I4:") for v in world.violations())


def test_an_attempt_redelivered_before_its_fence_never_merges() -> None:
    world = World()
    zombie = world.run(world.poll(), Phase.STAGED)
    live = world.redeliver()
    world.run(zombie)
    assert zombie.ref == ""
    assert world.branches == {}  # stopped at the fence: no claim either
    world.run(live)
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_an_attempt_timed_out_before_its_pre_merge_fence_never_merges() -> None:
    world = World()
    zombie = world.run(world.poll(), Phase.CLAIMED)
    world.time_out(retry=True)
    world.run(zombie)
    assert zombie.phase is Phase.DONE
    assert world.merges() == []


def test_the_fence_to_merge_window_lands_one_merge() -> None:
    world = World()
    zombie = world.run(world.poll(), Phase.READY)
    world.time_out(retry=True)  # lands in the window
    retry = world.run(world.poll(), Phase.READY)  # adopted the zombie's claim
    world.merge(zombie)
    world.merge(retry)  # "no changes": the same claimed commit; back to the history check
    assert retry.phase is Phase.CLAIMED
    world.run(retry)
    assert len(world.merges()) == 1
    assert [r.ref for r in world.reports] == [zombie.ref]
    assert world.violations() == []


def test_gc_during_the_window_then_a_retry_merges_once() -> None:
    world = World()
    zombie = world.run(world.poll(), Phase.READY)
    world.time_out(retry=False)  # the workflow fails inside the zombie's window
    world.collect_all()  # gc deletes the zombie's claim
    world.retry_workflow()
    retry = world.run(world.poll(), Phase.READY)  # re-claims the key at its own commit
    world.merge(zombie)  # merges the intent branch: what the claim holds now
    world.run(retry)
    assert world.merges()[0].merged_from == retry.staged
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_merging_the_staged_commit_by_id_would_merge_twice_after_gc_in_the_window() -> None:
    # Why the merge names the intent branch (src merged the staged commit until the model
    # found this).
    world = World()
    world.merge_staged_commit = True
    zombie = world.run(world.poll(), Phase.READY)
    world.time_out(retry=False)
    world.collect_all()
    world.retry_workflow()
    world.run(world.poll())
    world.merge(zombie)
    assert len(world.merges()) == 2
    assert world.violations()[0].startswith("I1:")


def test_a_rerun_from_a_retried_task_is_a_new_execution() -> None:
    world = World()
    world.time_out(retry=True)  # t1 times out before a poll: t2 retries it
    first = world.run(world.poll())  # t2 publishes (the ledger records it); completes
    world.rerun()  # rerun from t2, whose retriedTaskId still names t1
    rerun = world.run(world.poll())
    assert rerun.key != first.key
    assert rerun.ref != first.ref
    assert world.violations() == []


def test_a_same_id_retry_during_the_merge_window_merges_once() -> None:
    world = World()
    cancelled = world.run(world.poll(), Phase.READY)
    world.cancel()
    world.retry_workflow()  # revived under its own id while the merge is on its way
    revived = world.run(world.poll(), Phase.READY)
    assert revived.key == cancelled.key  # the ledger recorded the cancelled scheduling
    world.merge(cancelled)
    world.run(revived)
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_a_retry_whose_input_drifted_past_the_merge_still_finds_it() -> None:
    world = World()
    first = world.run(world.poll(), Phase.MERGED)  # merged, never reported
    world.time_out(retry=False)
    world.collect_all()
    world.retry_workflow(drift=True)  # the retry's input is the target head: the merge
    retry = world.run(world.poll())
    assert retry.input_ref == first.ref
    assert retry.ref == first.ref
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_a_same_id_retry_after_a_publish_continues_that_execution() -> None:
    world = World()
    first = world.run(world.poll(), Phase.MERGED)
    world.cancel()
    world.retry_workflow()  # revives the cancelled task under its own id
    revived = world.run(world.poll())
    assert revived.task_id == first.task_id
    assert revived.incarnation.retry_count == 1
    assert revived.key == first.key
    assert revived.ref == first.ref
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_the_ledger_tells_a_revival_from_a_rerun() -> None:
    world = World()
    first = world.run(world.poll(), Phase.RESOLVED)
    world.cancel()
    world.retry_workflow()  # revived: retryCount 1, a new scheduling
    revived = world.run(world.poll(), Phase.RESOLVED)
    world.cancel()
    world.rerun()  # reset in place: retryCount still 1, a new scheduling
    rerun = world.run(world.poll(), Phase.RESOLVED)
    assert revived.key == first.key
    assert rerun.key not in (first.key, revived.key)
    assert [e.execution for e in world.ledger.values()] == [first.key, revived.key, rerun.key]


def test_known_limitation_a_revival_after_an_unrecorded_rerun_continues_the_old_run() -> None:
    # Documented (docs/fences.md); the ledger narrows it to reruns no attempt recorded.
    world = World()
    first = world.run(world.poll())
    world.rerun()  # the rerun's scheduling: never polled, so never in the ledger
    world.cancel()
    world.retry_workflow()
    revived = world.run(world.poll())
    assert revived.known_limitation
    assert revived.ref == first.ref  # the limitation: the old run's ref
    assert world.violations() == []  # left out of I3 and I4, by name


def test_known_limitation_a_rerun_from_an_unrecorded_retry_continues_the_old_run() -> None:
    # Documented (docs/fences.md): the ledger never saw t2's scheduling. No second merge.
    world = World()
    first = world.run(world.poll(), Phase.MERGED)  # t1 merged, never reported
    world.time_out(retry=True)  # t2 retries t1: scheduled, never polled
    world.cancel()
    world.rerun()  # rerun from t2
    rerun = world.run(world.poll())
    assert rerun.known_limitation
    assert rerun.ref == first.ref  # the limitation: the old run's publish
    assert len(world.merges()) == 1
    assert world.violations() == []  # left out of I3 and I4, by name


def test_known_limitation_a_rerun_from_an_unrecorded_revival_continues_the_old_run() -> None:
    world = World()
    first = world.run(world.poll(), Phase.MERGED)
    world.cancel()
    world.retry_workflow()  # revived: retryCount 1, never polled
    world.cancel()
    world.rerun()  # rerun from t1 (retryCount still 1)
    rerun = world.run(world.poll())
    assert rerun.known_limitation
    assert rerun.ref == first.ref
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_a_revival_after_a_recorded_rerun_continues_the_rerun() -> None:
    world = World()
    first = world.run(world.poll())
    world.rerun()
    rerun = world.run(world.poll(), Phase.STAGED)  # recorded, never published
    world.cancel()
    world.retry_workflow()
    revived = world.run(world.poll())
    assert not revived.known_limitation
    assert revived.key == rerun.key != first.key
    assert revived.ref != first.ref
    assert world.violations() == []


def test_a_delivery_that_finds_a_later_scheduling_recorded_stands_down() -> None:
    world = World()
    late = world.poll()  # delivered, slow to resolve
    world.cancel()
    world.retry_workflow()  # revived: retryCount 1
    world.run(world.poll(), Phase.MERGED)  # recorded, merged, never reported
    world.run(late)
    assert late.phase is Phase.DONE and late.key == ""  # `Superseded`: decided nothing
    world.time_out(retry=True)
    world.run(world.poll())
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_a_ledger_write_racing_a_revival_never_replaces_the_later_scheduling() -> None:
    world = World()
    slow = world.run(world.poll(), Phase.DECIDED)  # read the ledger (empty), not written yet
    world.cancel()
    world.retry_workflow()  # revived: retryCount 1
    revived = world.run(world.poll(), Phase.MERGED)  # no entry: a fresh key; merged
    world.record(slow)  # creates its own scheduling's entry; the revived one's stays
    world.time_out(retry=True)
    retry = world.run(world.poll())
    assert retry.key == revived.key
    assert len(world.merges()) == 1
    assert world.violations() == []


def test_two_deliveries_of_one_scheduling_agree_on_the_first_entry() -> None:
    world = World()
    first = world.run(world.poll(), Phase.DECIDED)
    second = world.run(world.redeliver(), Phase.DECIDED)
    world.record(second)
    world.record(first)  # 412: resolves again, from the entry `second` created
    assert first.phase is Phase.DELIVERED
    world.run(first, Phase.RESOLVED)
    assert first.key == second.key
    assert len(world.ledger) == 1


def test_a_superseded_attempts_report_is_not_accepted() -> None:
    world = World()
    zombie = world.run(world.poll(), Phase.MERGED)
    live = world.redeliver()
    world.report(zombie)
    assert world.reports == []
    assert world.task.status == "IN_PROGRESS"
    world.run(live)
    assert [(r.attempt, r.ref) for r in world.reports] == [(live, zombie.ref)]
    assert world.violations() == []


# -- the interleavings ------------------------------------------------------------------------


class Action:
    """One rule: a server event, or one protocol step (or run) of one attempt."""

    def __init__(
        self,
        rule: str,
        attempt: Attempt | None = None,
        *,
        until: Phase | None = None,
        flag: bool = False,  # time_out: retries left; cancel: retried at once; retry: gc first
        drift: bool = False,  # the new scheduling's input is the target head
        intent: str = "",
    ) -> None:
        self.rule, self.attempt, self.until = rule, attempt, until
        self.flag, self.drift, self.intent = flag, drift, intent

    def __repr__(self) -> str:
        who = f"{self.attempt.name}." if self.attempt else ""
        args = [f"until={self.until.name}"] if self.until else []
        if self.rule in FLAGS:
            args.append(f"{FLAGS[self.rule]}={self.flag}")
        if self.rule in DRIFTING:
            args.append(f"drift={self.drift}")
        if self.intent:
            args.append(self.intent[len(INTENT_PREFIX) : len(INTENT_PREFIX) + 8])
        return f"{who}{self.rule}({', '.join(args)})"


FLAGS = {"time_out": "retry", "cancel": "then_retry", "retry_workflow": "collect"}
DRIFTING = frozenset({"time_out", "retry_workflow", "rerun", "restart"})
STEP_NAMES = {
    Phase.DELIVERED: "resolve",
    Phase.DECIDED: "record",
    Phase.RESOLVED: "adopt_check",
    Phase.CHECKED: "stage",
    Phase.STAGED: "fence",
    Phase.CLAIMED: "pre_merge",
    Phase.FENCED: "claim",
    Phase.READY: "merge",
    Phase.FOUND: "report",
    Phase.MERGED: "report",
}
WORKER_STEPS = frozenset(STEP_NAMES.values())
POLL_UNTIL = (None, Phase.READY, Phase.MERGED, Phase.DONE)
PACES = st.sampled_from((1.0, 0.1, 4.0))


@functools.cache
def choice(n: int) -> st.SearchStrategy[int]:
    """An index into a list of `n` (built once per length: cheaper than `sampled_from`)."""
    return st.integers(min_value=0, max_value=n - 1)


RUN_UNTIL = (
    Phase.RESOLVED,
    Phase.STAGED,
    Phase.FENCED,
    Phase.CLAIMED,
    Phase.READY,
    Phase.MERGED,
    Phase.DONE,
)


class ProtocolModel(RuleBasedStateMachine):
    """Every server event and every protocol step is a rule, drawn among those that apply;
    the guarantees hold after each.

    The machine draws the rule itself (one Hypothesis rule, `act`), with weights: an
    attempt's next step is as likely as all the events together, times the attempt's pace
    (drawn when it is delivered: slow ones let events pass them by). A poll's `until` and
    `run_to` advance one attempt through several steps at once with no event in between;
    the single steps keep every interleaving reachable. A failure's message lists the rules
    run, in order (and Hypothesis prints each as a note).
    """

    # The rules a focused machine keeps (None: all).
    only: frozenset[str] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.log: list[str] = []
        self.pace: dict[str, float] = {}  # attempt -> how fast it steps, next to the events

    def actions(self) -> list[Action]:
        """The rules that apply now, each repeated by its weight."""
        world = self.world
        drifts = (False, True)
        out: list[Action] = []
        if world.can_poll():
            out += [Action("poll", until=u) for u in POLL_UNTIL for _ in range(2)]
        if world.can_redeliver():
            out += [Action("redeliver", until=u) for u in POLL_UNTIL]
        if world.can_time_out():
            out += [Action("time_out", flag=f, drift=d) for f in (True, False) for d in drifts]
        if world.can_cancel():
            out += [Action("cancel", flag=f) for f in (False, True)]
        if world.can_retry_workflow():
            out += [
                Action("retry_workflow", flag=f, drift=d) for f in (False, True) for d in drifts
            ]
        if world.can_rerun():
            out += [Action("rerun", drift=d) for d in drifts]
        if world.can_rerun():
            out += [Action("restart", drift=d) for d in drifts]
        if world.workflow_terminal:
            out += [Action("gc", intent=name) for name in world.intents()]
        out.append(Action("foreign_commit"))
        events = len(out)
        for attempt in world.waiting(*ACTIVE):
            # The attempt's next step: as likely as all the events together, for an attempt
            # of pace 1 (a slow one lets events pass it by, a fast one runs ahead).
            weight = max(1, round(events * self.pace.get(attempt.name, 1.0)))
            out += [Action(STEP_NAMES[attempt.phase], attempt)] * weight
            out += [Action("run_to", attempt, until=u) for u in RUN_UNTIL]
            out.append(Action("crash", attempt))
        return [a for a in out if self.only is None or a.rule in self.only]

    def apply(self, action: Action) -> None:
        world, attempt = self.world, action.attempt
        if attempt is not None:
            if action.rule == "crash":
                world.crash(attempt)
            elif action.rule == "run_to":
                world.run(attempt, action.until or Phase.DONE)
            else:
                world.step(attempt)
        elif action.rule in ("poll", "redeliver"):
            new = world.poll() if action.rule == "poll" else world.redeliver()
            if action.until is not None:
                world.run(new, action.until)
        elif action.rule == "time_out":
            world.time_out(retry=action.flag, drift=action.drift)
        elif action.rule == "cancel":
            world.cancel()
            if action.flag:
                world.retry_workflow()
        elif action.rule == "retry_workflow":
            if action.flag:
                world.collect_all()
            world.retry_workflow(drift=action.drift)
        elif action.rule == "rerun":
            world.rerun(drift=action.drift)
        elif action.rule == "restart":
            world.restart(drift=action.drift)
        elif action.rule == "gc":
            world.gc(action.intent)
        else:
            world.foreign_commit()

    @rule(data=st.data())
    def act(self, data: st.DataObject) -> None:
        actions = self.actions()
        action = actions[data.draw(choice(len(actions)), label="action")]
        note(repr(action))
        self.log.append(repr(action))
        self.apply(action)
        for attempt in self.world.attempts:
            if attempt.name not in self.pace:
                self.pace[attempt.name] = data.draw(PACES, label=f"{attempt.name}'s pace")

    @invariant()
    def guarantees_hold(self) -> None:
        violations = self.world.violations()
        assert not violations, "\n".join([*violations, "after:", *self.log])


class WithinKnownLimits(ProtocolModel):
    """Every rule (the known limitation is left out of I3 and I4 by name)."""


# Focused machines: fewer rules, so deeper interleavings of the ones kept. Each keeps
# `foreign_commit`, which always applies: no state is a dead end.


class Windows(WithinKnownLimits):
    """What lands between an attempt's last fence and its merge, and who merges first."""

    only = frozenset(
        {"poll", "time_out", "cancel", "retry_workflow", "run_to", "merge", "report"}
        | {"restart", "foreign_commit"}
    )


class CrashesAndRedeliveries(WithinKnownLimits):
    """Crashes between any two steps, re-deliveries and timeouts of the same task."""

    only = WORKER_STEPS | {"poll", "redeliver", "time_out", "crash", "run_to", "foreign_commit"}


class RerunsAndRestarts(WithinKnownLimits):
    """New executions of the same slot (rerun, restart) after publishes, crashes and gc."""

    only = frozenset(
        {"poll", "time_out", "cancel", "retry_workflow", "rerun", "restart", "gc", "crash"}
        | {"run_to", "merge", "report", "foreign_commit"}
    )


MODEL_SETTINGS = settings(
    max_examples=250,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestWithinKnownLimits = WithinKnownLimits.TestCase
TestWithinKnownLimits.settings = MODEL_SETTINGS
TestWindows = Windows.TestCase
TestWindows.settings = MODEL_SETTINGS
TestCrashesAndRedeliveries = CrashesAndRedeliveries.TestCase
TestCrashesAndRedeliveries.settings = MODEL_SETTINGS
TestRerunsAndRestarts = RerunsAndRestarts.TestCase
TestRerunsAndRestarts.settings = MODEL_SETTINGS
