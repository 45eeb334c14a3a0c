"""Remove what crashed workers left behind, never what a live attempt still uses.

* Attempt folders: removed when their lock is free (the owning process is gone) and they
  are older than the threshold.
* Staging branches (`perago-stage-<task>-<created>-<uid>`): removed when older than the
  threshold and Conductor says their task is terminal, or answers 404 for it.
* Intent branches (`perago-intent-<key>`): the publish fence's first memory. Removed only
  when Conductor answers 404 for their workflow (the intent commit's `perago.workflow_id`:
  nothing can retry it any more), or says the workflow is terminal and the intent is older
  than `intent_older_than` (a terminal workflow can still be rerun or retried by hand; the
  target's history still holds a merge, so a retry after that finds it there).
  A manual execution's (`exec --publish`) counts as a terminal workflow's.
* Execution ledger entries: the identity's memory. Removed only once the newest entry of
  their workflow is older than `ledger_older_than` (30 days by default; the intents' is 7)
  and Conductor answers 404 for it or says it is terminal: a retry by hand within
  that window still needs them to tell a retry of a rerun from a retry of the run before
  it. A manual execution's go after `intent_older_than`, as its intents do.

Deleting an intent whose workflow can still retry gives up the publish fence's first
memory, so nothing is deleted on a guess: when Conductor's answer is anything but one of
those (unreachable, a timeout, 5xx after the retries, 401/403, an answer without a status,
an intent without a workflow id) the branch is kept and listed in `GcReport.unverifiable`
with the reason. A 404 is believed only from a server that first showed it is Conductor
(`GET /admin/config` answered a JSON object): a wrong URL whose server answers 404 to
everything deletes nothing.
Every Conductor call is bounded by `conductor_retry_seconds` of retries (plus the client's
request timeout), so gc never hangs on a server that is down.

`collect_configured` is what both `perago-worker gc` and the daemon's schedule
(`run --gc-every`, `gc_every_seconds`: `PeriodicGc`) run: the thresholds and repositories of
the settings.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perago_worker import fences
from perago_worker.conductor import TERMINAL_TASK_STATES, Conductor, ConductorError
from perago_worker.execution import LEDGER_BRANCH, LEDGER_PREFIX
from perago_worker.lakefs import LakeFS, NotFound
from perago_worker.preflight import read_server_config
from perago_worker.workspace import leftovers, remove_leftover

if TYPE_CHECKING:
    from perago_worker.settings import Settings

TERMINAL_WORKFLOW = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"})
WORKFLOW_ID_KEY = "perago.workflow_id"
DEFAULT_CONDUCTOR_RETRY_SECONDS = 5.0
# `fences.staging_branch` keeps at most 40 characters of the task id (Conductor's are UUIDs,
# 36): a name holding that many may hold a truncated id, whose 404 says nothing.
TASK_ID_IN_NAME_MAX = 40


@dataclass
class GcReport:
    attempt_dirs: list[str] = field(default_factory=list)
    staging_branches: list[str] = field(default_factory=list)
    intent_branches: list[str] = field(default_factory=list)
    kept_live: list[str] = field(default_factory=list)
    ledger_entries: list[str] = field(default_factory=list)  # "repo:key" of the execution ledger
    # Kept because Conductor could not say whether they are still needed ("repo:branch"),
    # and why (same keys).
    unverifiable: list[str] = field(default_factory=list)
    unverifiable_reasons: dict[str, str] = field(default_factory=dict)

    def keep_unverifiable(self, item: str, reason: str) -> None:
        self.unverifiable.append(item)
        self.unverifiable_reasons[item] = reason


class _State(Enum):
    GONE = "gone"  # Conductor answered 404
    TERMINAL = "terminal"
    LIVE = "live"
    UNVERIFIABLE = "unverifiable"


@dataclass(frozen=True)
class _Answer:
    state: _State
    detail: str = ""

    @property
    def deletable(self) -> bool:
        return self.state in (_State.GONE, _State.TERMINAL)


# A manual execution (`perago-worker exec --publish`, `fences.is_manual`) has no Conductor
# task or workflow to ask: its process is its only owner. It counts as terminal, so its
# staging branch goes after `older_than` and its intent and ledger entries after
# `intent_older_than`, as a finished workflow's do; a re-run with its execution id within
# that time still finds them.
MANUAL_ANSWER = _Answer(_State.TERMINAL, "a manual execution (perago-worker exec --publish)")


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


class _Oracle:
    """Conductor's word on tasks and workflows, with every doubt kept as a doubt."""

    def __init__(self, conductor: Conductor, retry_seconds: float) -> None:
        self._conductor = conductor
        self._retry_seconds = retry_seconds
        self._identity: str | None = None  # None: not probed yet; "": it is Conductor
        # One answer per workflow per round: its intents and its ledger entries ask about
        # the same workflow (measured, docs/benchmarks.md "Intent branches at scale": the
        # Conductor read is three quarters of a round). A doubt is not kept: asked again.
        self._workflows: dict[str, _Answer] = {}

    def _not_conductor(self) -> str:
        """Empty when the server proved it is Conductor, else why it did not (probed once)."""
        if self._identity is None:
            try:
                read_server_config(self._conductor, retry_seconds=self._retry_seconds)
                self._identity = ""
            except Exception as exc:
                self._identity = f"cannot verify the server is Conductor ({_short(exc)})"
        return self._identity

    def _ask(self, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, _Answer | None]:
        doubt = self._not_conductor()
        if doubt:
            return None, _Answer(_State.UNVERIFIABLE, doubt)
        try:
            return self._conductor.call(
                fn, *args, retry_seconds=self._retry_seconds, **kwargs
            ), None
        except ConductorError as exc:
            if exc.status == 404:
                return None, _Answer(_State.GONE, "Conductor 404")
            return None, _Answer(_State.UNVERIFIABLE, _short(exc))
        except Exception as exc:
            return None, _Answer(_State.UNVERIFIABLE, _short(exc))

    def task(self, task_id: str) -> _Answer:
        if fences.is_manual(task_id):
            return MANUAL_ANSWER
        task, answer = self._ask(self._conductor.tasks.get_task, task_id)
        if answer is not None:
            return answer
        return self._classify(task, TERMINAL_TASK_STATES, "task")

    def workflow(self, workflow_id: str) -> _Answer:
        if fences.is_manual(workflow_id):
            return MANUAL_ANSWER
        known = self._workflows.get(workflow_id)
        if known is not None:
            return known
        workflow, answer = self._ask(
            self._conductor.workflows.get_execution_status, workflow_id, include_tasks=False
        )
        if answer is None:
            answer = self._classify(workflow, TERMINAL_WORKFLOW, "workflow")
        if answer.state is not _State.UNVERIFIABLE:
            self._workflows[workflow_id] = answer
        return answer

    @staticmethod
    def _classify(found: Any, terminal: frozenset[str], what: str) -> _Answer:
        status = getattr(found, "status", None) if found is not None else None
        if not isinstance(status, str) or not status:
            return _Answer(_State.UNVERIFIABLE, f"Conductor answered no {what} status")
        if status in terminal:
            return _Answer(_State.TERMINAL, status)
        return _Answer(_State.LIVE, status)


def collect(
    scratch_root: Path,
    lakefs: LakeFS | None,
    conductor: Conductor | None,
    repositories: list[str],
    *,
    older_than: float,
    intent_older_than: float = 7 * 86400,
    ledger_older_than: float = 30 * 86400,
    dry_run: bool = False,
    conductor_retry_seconds: float = DEFAULT_CONDUCTOR_RETRY_SECONDS,
) -> GcReport:
    report = GcReport()
    for leftover in leftovers(scratch_root, older_than):
        report.attempt_dirs.append(str(leftover.path))
        if not dry_run:
            remove_leftover(leftover)
    if lakefs is None or conductor is None:
        return report
    oracle = _Oracle(conductor, conductor_retry_seconds)
    now = time.time()
    for repository in repositories:
        for name, _head in list(lakefs.list_branches(repository, fences.STAGING_PREFIX)):
            parsed = fences.parse_staging_branch(name)
            if parsed is None:
                continue
            task_id, created = parsed
            if now - created < older_than:
                continue
            item = f"{repository}:{name}"
            answer = oracle.task(task_id)
            if answer.state is _State.GONE and len(task_id) >= TASK_ID_IN_NAME_MAX:
                answer = _Answer(
                    _State.UNVERIFIABLE, "the branch name may hold a truncated task id"
                )
            if not _settle(report, item, answer):
                continue
            report.staging_branches.append(item)
            if not dry_run:
                lakefs.delete_branch(repository, name)
        for name, head in list(lakefs.list_branches(repository, fences.INTENT_PREFIX)):
            commit = lakefs.get_commit(repository, head)
            young = now - commit.creation_date < intent_older_than
            item = f"{repository}:{name}"
            workflow_id = commit.metadata.get(WORKFLOW_ID_KEY, "")
            if not workflow_id:
                if not young:
                    report.keep_unverifiable(item, f"the intent's commit has no {WORKFLOW_ID_KEY}")
                continue
            answer = oracle.workflow(workflow_id)
            if young and answer.state is _State.TERMINAL:
                continue  # kept until it is older than intent_older_than
            if not _settle(report, item, answer):
                continue
            report.intent_branches.append(item)
            if not dry_run:
                lakefs.delete_branch(repository, name)
        for workflow_id, keys, newest in _ledger_by_workflow(lakefs, repository):
            item = f"{repository}:{LEDGER_BRANCH}/{LEDGER_PREFIX}{workflow_id}/"
            # The identity's memory outlives the intents: a terminal workflow can be retried
            # by hand, and without its entries a retry of a rerun would resolve to the
            # execution before the rerun (docs/fences.md). A workflow's entries are not even
            # asked about before `ledger_older_than`, so a round costs one Conductor read per
            # workflow of that window at most; a manual execution's go with its intents.
            window = intent_older_than if fences.is_manual(workflow_id) else ledger_older_than
            if now - newest < window:
                continue
            answer = oracle.workflow(workflow_id)
            if not _settle(report, item, answer):
                continue
            report.ledger_entries.extend(f"{repository}:{key}" for key in keys)
            if not dry_run:
                lakefs.delete_objects(repository, LEDGER_BRANCH, keys)
    return report


def _ledger_by_workflow(lakefs: LakeFS, repository: str) -> Iterator[tuple[str, list[str], float]]:
    """(workflow id, its ledger keys, newest entry's mtime) of a repository's ledger."""
    groups: dict[str, tuple[list[str], float]] = {}
    try:
        for page in lakefs.list_objects(repository, LEDGER_BRANCH, LEDGER_PREFIX):
            for obj in page:
                quoted = obj.key[len(LEDGER_PREFIX) :].split("/", 1)[0]
                keys, newest = groups.get(quoted, ([], 0.0))
                keys.append(obj.key)
                groups[quoted] = (keys, max(newest, float(obj.mtime)))
    except NotFound:
        return  # no ledger branch yet
    for quoted, (keys, newest) in groups.items():
        yield urllib.parse.unquote(quoted), keys, newest


def _settle(report: GcReport, item: str, answer: _Answer) -> bool:
    """True when the branch may go; otherwise record why it stays."""
    if answer.deletable:
        return True
    if answer.state is _State.LIVE:
        report.kept_live.append(item)
    else:
        report.keep_unverifiable(item, answer.detail)
    return False


# -- the thresholds of the settings, and the daemon's schedule ----------------------------------


def collect_configured(
    settings: Settings,
    lakefs: LakeFS | None,
    conductor: Conductor | None,
    *,
    repositories: list[str] | None = None,
    older_than: float | None = None,
    intent_older_than: float | None = None,
    ledger_older_than: float | None = None,
    dry_run: bool = False,
) -> GcReport:
    """`collect` with the settings' scratch root, thresholds (`gc_older_than_seconds`,
    `gc_intent_older_than_seconds`, `gc_ledger_older_than_seconds`) and repositories (`allowed_repositories`); an argument
    that is not None overrides its setting. `perago-worker gc` and `PeriodicGc` both run it."""
    return collect(
        settings.scratch_root,
        lakefs,
        conductor,
        list(repositories) if repositories else list(settings.allowed_repositories),
        older_than=settings.gc_older_than_seconds if older_than is None else older_than,
        intent_older_than=(
            settings.gc_intent_older_than_seconds
            if intent_older_than is None
            else intent_older_than
        ),
        ledger_older_than=(
            settings.gc_ledger_older_than_seconds
            if ledger_older_than is None
            else ledger_older_than
        ),
        dry_run=dry_run,
    )


# How often a waiting schedule checks whether it should stop, and how long `stop` waits for a
# round under way before it leaves it to the process's exit.
STOP_CHECK_SECONDS = 0.5
STOP_WAIT_SECONDS = 5.0
LOGGED_ITEMS = 50  # names listed in one `gc.done` line (the counts are always complete)


class PeriodicGc:
    """gc on one daemon thread of the worker, every `every` seconds.

    Rounds never overlap: the next one starts `every` seconds after the previous one ended,
    the first after a random 50-100 % of the interval (replicas started together spread
    out). A round that raises is logged (`gc.failed`) and the schedule goes on: gc never
    stops the worker. Once `stop()` is called or `stop_when()` answers True (checked at
    least every STOP_CHECK_SECONDS) no round starts; `stop()` waits up to
    STOP_WAIT_SECONDS for a round under way and otherwise leaves it to the process's exit,
    which is as safe as killing `perago-worker gc` (each deletion is one request).
    """

    def __init__(
        self,
        every: float,
        run_once: Callable[[], GcReport],
        log: Any,
        *,
        stop_when: Callable[[], bool] = lambda: False,
        first_delay: float | None = None,
    ) -> None:
        if every <= 0:
            raise ValueError(f"gc interval must be positive, not {every}")
        self.every = every
        self.rounds = 0
        self.failures = 0
        self._run_once = run_once
        self._log = log
        self._stop_when = stop_when
        self._first_delay = every * random.uniform(0.5, 1.0) if first_delay is None else first_delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gc", daemon=True)

    def start(self) -> PeriodicGc:
        self._thread.start()
        return self

    def stop(self, timeout: float = STOP_WAIT_SECONDS) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _stopping(self) -> bool:
        if self._stop.is_set():
            return True
        try:
            return bool(self._stop_when())
        except Exception:
            return False

    def _wait(self, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as the schedule is told to stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._stop.wait(min(remaining, STOP_CHECK_SECONDS))
        return False

    def _loop(self) -> None:
        delay = self._first_delay
        while self._wait(delay):
            self._round()
            delay = self.every
        self._log.info("gc.stopped", rounds=self.rounds, failures=self.failures)

    def _round(self) -> None:
        started = time.monotonic()
        try:
            report = self._run_once()
        except Exception as exc:
            self.rounds += 1
            self.failures += 1
            self._log.error(
                "gc.failed", error=_short(exc), seconds=round(time.monotonic() - started, 3)
            )
            return
        self.rounds += 1
        removed = [*report.attempt_dirs, *report.staging_branches, *report.intent_branches]
        self._log.info(
            "gc.done",
            attempt_folders=len(report.attempt_dirs),
            staging_branches=len(report.staging_branches),
            intent_branches=len(report.intent_branches),
            kept_live=len(report.kept_live),
            kept_unverifiable=len(report.unverifiable),
            removed=removed[:LOGGED_ITEMS],
            unverifiable={
                item: report.unverifiable_reasons.get(item, "")
                for item in report.unverifiable[:LOGGED_ITEMS]
            },
            seconds=round(time.monotonic() - started, 3),
        )


def schedule(
    settings: Settings,
    lakefs: LakeFS,
    conductor: Conductor,
    *,
    every: float,
    log: Any,
    stop_when: Callable[[], bool] = lambda: False,
    first_delay: float | None = None,
) -> PeriodicGc:
    """A started `PeriodicGc` running what `perago-worker gc` runs with these settings."""
    log.info(
        "gc.scheduled",
        every_seconds=every,
        older_than_seconds=settings.gc_older_than_seconds,
        intent_older_than_seconds=settings.gc_intent_older_than_seconds,
        ledger_older_than_seconds=settings.gc_ledger_older_than_seconds,
        repositories=list(settings.allowed_repositories),
    )
    return PeriodicGc(
        every,
        lambda: collect_configured(settings, lakefs, conductor),
        log,
        stop_when=stop_when,
        first_delay=first_delay,
    ).start()
