"""Chaos soak: many workflows through 4 worker processes while workers and servers die.

    .venv/bin/python bench/chaos.py --start-stack DIR [--tasks N] [--workers 4]
        [--duration-limit S] [--kill-every S] [--seed N] [--report FILE]
    .venv/bin/python bench/chaos.py --stack-from-env ...   (a running stack: workers only)

It registers bench/chaos_app.py, starts `--workers` real `perago-worker run` processes and
starts workflows at a steady rate until the planned logical tasks (>= `--tasks`) are started
or `--duration-limit` passes: chained ingest -> transform -> summarize workflows (some
failing on purpose, terminally or on their first scheduling only) and pairs of one-task
workflows that write the same path from the same base (one of each pair must meet a merge
conflict). Meanwhile one thread kill -9s a random worker every `--kill-every` seconds and
starts it again on the same scratch folder (as a pod restarts on its volume), and another
restarts, at planned moments, one Conductor instance, lakeFS and the object store. A stack
from the environment cannot be restarted: then only workers are killed, and the report says
so.

Then it waits for every workflow to end (bounded), stops the workers, and `verify` checks,
from Conductor and lakeFS alone, what the worker promises:

* every workflow ended as its inputs dictate (completed; failed on purpose with
  `handler_terminal`; of each clash pair exactly one completed and one failed with
  `merge_conflict`);
* every commit on the target above the base is a perago merge of an expected logical task
  (workflow id + reference name), exactly one per task, whose execution key is the one its
  root task dictates, and no perago merge sits anywhere else in the history;
* no merge from a zombie: the merge names a task of its workflow and reference name, a
  worker process this soak started, that process's delivery-token form, and it landed no
  later than the task's end in Conductor (plus the clock resolution): a delivery that merged
  after Conductor had given its task up merged outside its fences;
* every completed workspace task's output ref is the merge carrying its execution, and each
  transform read the ref its ingest returned;
* after gc: no staging branch, no intent branch and no ledger entry of a finished workflow,
  no attempt folder under any worker's scratch root;
* no secret (lakeFS or object store secret key) in any worker log.

`run_soak` returns a `ChaosReport` (also written as JSON with `--report`); its `problems`
list is empty only when everything held, and `raise_for_problems` fails loudly otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shlex
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import chaos_app  # noqa: E402
from perago_worker import fences  # noqa: E402
from perago_worker.conductor import Conductor  # noqa: E402
from perago_worker.devstack.demo import register_app  # noqa: E402
from perago_worker.devstack.servers import (  # noqa: E402
    DEV_SECRET_ACCESS_KEY,
    STORE_SECRET_ACCESS_KEY,
    Endpoints,
    ServerProcess,
    Stack,
    endpoints_from_env,
    start_stack,
)
from perago_worker.devstack.worker_process import WorkerProcess, start_worker  # noqa: E402
from perago_worker.execution import LEDGER_BRANCH, LEDGER_PREFIX  # noqa: E402
from perago_worker.gc import collect  # noqa: E402
from perago_worker.lakefs import LakeFS, NotFound  # noqa: E402

TERMINAL = ("COMPLETED", "FAILED", "TERMINATED", "TIMED_OUT")
BRANCH = "main"
# Every spelling of the app's prefix a slot may carry (the worker keys the slot on it as given).
PREFIX_SPELLINGS = ("c/", "/c", "c", "/c/")
# lakeFS stamps a commit in whole seconds, Conductor a task's end in ms: a merge may show up
# to a second later than the end of the task that made it, and a merge request sent just
# before the end (inside the fence-to-merge window) lands a little after it.
ZOMBIE_SLACK_SECONDS = 5.0
# How long a server may take to (re)start. A Conductor JVM alone starts in about 30 s, but on
# a shared 2-core machine running other suites it was measured at 190 s and beyond
# devstack's own 240 s bound: a soak must outlast its machine's load, not fail on it.
SERVER_PATIENCE = 900.0
STARTERS = 6  # threads starting workflows
TASKS_PER_KIND = {"chain": 3, "flaky": 3, "terminal": 2, "clash": 1}
WORKSPACE_REFS = {"chain": ("ingest", "transform"), "flaky": ("ingest", "transform")}


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One workflow to start; its kind says the end its inputs dictate."""

    kind: str  # chain | flaky | terminal | clash
    tag: str  # the workflow's folder (chain) or pair (clash): its correlation id too
    side: str = ""  # clash only: "a" or "b"

    @property
    def correlation_id(self) -> str:
        return f"{self.tag}-{self.side}" if self.side else self.tag


def plan(tasks: int, rng: random.Random, run_tag: str) -> list[list[Planned]]:
    """Units of workflows started together (a clash pair is one unit of two) until the
    logical tasks they schedule reach `tasks`.

    Mix: about 60 % chains that complete, 10 % chains whose transform fails on its first
    scheduling (a retry completes them), 10 % chains whose transform fails terminally, and
    clash pairs for the rest (by unit)."""
    units: list[list[Planned]] = []
    total = 0
    i = 0
    while total < tasks:
        draw = rng.random()
        tag = f"{run_tag}-{i:05d}"
        if draw < 0.6:
            unit = [Planned("chain", tag)]
        elif draw < 0.7:
            unit = [Planned("flaky", tag)]
        elif draw < 0.8:
            unit = [Planned("terminal", tag)]
        else:
            unit = [Planned("clash", tag, "a"), Planned("clash", tag, "b")]
        units.append(unit)
        total += sum(TASKS_PER_KIND[p.kind] for p in unit)
        i += 1
    return units


@dataclass
class Started:
    planned: Planned
    workflow_id: str
    input_ref: str
    started_at: float


# -- workers --------------------------------------------------------------------------------


def _urls(endpoints: Endpoints, many: str, one: str) -> tuple[str, ...]:
    """Every instance's URL when the stack has several (`conductor_urls`, `lakefs_urls` of a
    multi-instance stack), else the single one."""
    found = getattr(endpoints, many, None)
    return tuple(found) if found else (str(getattr(endpoints, one)),)


@dataclass
class WorkerSlot:
    """One worker "pod": a scratch folder that outlives the processes started on it."""

    index: int
    workdir: Path
    env: dict[str, str]
    endpoints: Endpoints
    process: WorkerProcess | None = None
    generation: int = 0
    worker_ids: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def scratch(self) -> Path:
        return self.workdir / "scratch"

    def start(self, *, wait: bool) -> WorkerProcess:
        """A new process on this slot. Restarts skip the preflight: a server may be down
        for its restart right now, and a pod's restart does not wait for it either."""
        name = f"w{self.index}g{self.generation}"
        self.generation += 1
        proc = start_worker(
            "chaos_app:app",
            self.endpoints,
            self.workdir,
            name=name,
            env=self.env,
            wait=False,
            skip_preflight=self.generation > 1,
        )
        # start_worker's own worker id: name, this process's pid and the port.
        self.worker_ids.append(f"{name}-{os.getpid()}-{proc.port}")
        self.logs.append(proc.log_path)
        self.process = proc
        if wait:
            proc.wait_ready(120)
        return proc

    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None


def worker_slots(
    endpoints: Endpoints, workdir: Path, count: int, repo: str, suffix: str
) -> list[WorkerSlot]:
    """`count` slots, spread round-robin over every Conductor and lakeFS instance."""
    conductors = _urls(endpoints, "conductor_urls", "conductor_url")
    lakefses = _urls(endpoints, "lakefs_urls", "lakefs_url")
    slots = []
    for i in range(count):
        env = {
            "PYTHONPATH": str(HERE),
            "PERAGO_CHAOS_SUFFIX": suffix,
            "PERAGO_ALLOWED_REPOSITORIES": json.dumps([repo]),
            "PERAGO_CONDUCTOR__URL": conductors[i % len(conductors)],
            "PERAGO_LAKEFS__ENDPOINT": lakefses[i % len(lakefses)],
            "PERAGO_CONCURRENCY": "4",
            "PERAGO_DRAIN_GRACE_SECONDS": "20",
        }
        slots.append(WorkerSlot(i, workdir / f"w{i}", env, endpoints))
    return slots


# -- Conductor helpers ------------------------------------------------------------------------


class Sweeper:
    """Asks Conductor to `decide` every running workflow about once a second.

    Conductor's SQLite persistence re-offers its decider queue only every 60 s, so without
    this a killed worker's response timeout (6 s) would be noticed one to two minutes late; a
    production Conductor's sweeper runs every few seconds (tests/faults does the same)."""

    def __init__(self, conductor: Conductor, every: float = 1.0) -> None:
        self.conductor = conductor
        self.every = every
        self.running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)
        self._thread.start()

    def add(self, workflow_id: str) -> None:
        with self._lock:
            self.running.add(workflow_id)

    def discard(self, workflow_id: str) -> None:
        with self._lock:
            self.running.discard(workflow_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                ids = list(self.running)
            for workflow_id in ids:
                if self._stop.is_set():
                    return
                with contextlib.suppress(Exception):
                    self.conductor.decide(workflow_id)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def correlated(conductor_url: str, name: str, correlation_id: str) -> list[str]:
    """Ids of workflows `name` started with `correlation_id` (closed ones too)."""
    resp = httpx.get(
        f"{conductor_url}/workflow/{name}/correlated/{correlation_id}",
        params={"includeClosed": "true", "includeTasks": "false"},
        timeout=10,
    )
    resp.raise_for_status()
    return [str(w["workflowId"]) for w in resp.json()]


def start_once(
    conductor_urls: Sequence[str],
    name: str,
    correlation_id: str,
    body: dict[str, Any],
    until: float,
) -> str:
    """Start a workflow exactly once, through Conductor restarts.

    A start request whose answer is lost may still have created the workflow, and a blind
    retry would then start a second one whose merges nobody expects. So every try carries
    the correlation id, and after a failed try the correlated workflows are looked up before
    the next one: one found is the workflow. (The lookup costs Conductor about a second on
    SQLite, so the first try goes without it.) Each try goes to the next of `conductor_urls`:
    on a cluster, one Conductor's restart does not stop the starts."""
    last: Exception | None = None
    tries = 0
    while time.monotonic() < until:
        conductor_url = conductor_urls[tries % len(conductor_urls)]
        tries += 1
        try:
            if last is not None:  # an earlier try may have started it
                found = correlated(conductor_url, name, correlation_id)
                if found:
                    return found[0]
            resp = httpx.post(
                f"{conductor_url}/workflow",
                json={"name": name, "version": 1, "correlationId": correlation_id, "input": body},
                timeout=15,
            )
            resp.raise_for_status()
            return resp.text.strip().strip('"')
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
            time.sleep(1.0)
    raise RuntimeError(f"could not start {name} {correlation_id}: {last}")


# -- chaos ----------------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # seconds since the soak began
    what: str
    detail: str = ""
    seconds: float = 0.0


class Chaos:
    """The two chaos threads: worker kills, and planned server restarts."""

    def __init__(
        self,
        slots: list[WorkerSlot],
        rng: random.Random,
        kill_every: float,
        restarts: list[tuple[float, str, Callable[[], float]]],
        began: float,
        log: Callable[[str], None] = print,
    ) -> None:
        self.slots = slots
        self.rng = rng
        self.kill_every = kill_every
        self.restarts = sorted(restarts, key=lambda r: r[0])
        self.began = began
        self.log = log
        self.events: list[Event] = []
        self.kills = 0
        self.unexpected_exits: list[str] = []
        self.restart_errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._threads = [
            threading.Thread(target=self._killer, name="killer", daemon=True),
            threading.Thread(target=self._restarter, name="restarter", daemon=True),
        ]

    def start(self) -> Chaos:
        for thread in self._threads:
            thread.start()
        return self

    def finish_restarts(self, timeout: float = 600) -> None:
        """Run the planned restarts not yet due now, and wait for them: the report must
        show every one, even when the start phase ended early."""
        self._hurry.set()
        self._threads[1].join(timeout)

    def stop(self) -> None:
        self._hurry.set()
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(600)

    def _note(self, what: str, detail: str = "", seconds: float = 0.0) -> None:
        event = Event(round(time.monotonic() - self.began, 1), what, detail, round(seconds, 1))
        with self._lock:
            self.events.append(event)
        if what != "worker.kill":
            self.log(f"[chaos] t={event.at:.0f}s {what} {detail} {event.seconds or ''}")

    def revive_dead(self) -> None:
        """Restart a worker that exited by itself (noted: the soak reports every one)."""
        for slot in self.slots:
            if slot.process is not None and slot.process.proc.poll() is not None:
                code = slot.process.proc.returncode
                if code not in (-9, -15):
                    self.unexpected_exits.append(f"{slot.worker_ids[-1]} exited with {code}")
                    self._note("worker.exited", f"{slot.worker_ids[-1]} code {code}")
                slot.start(wait=False)

    def _killer(self) -> None:
        while not self._stop.wait(self.kill_every * self.rng.uniform(0.6, 1.4)):
            with self._lock:
                slot = self.rng.choice(self.slots)
            # Only a worker that got ready is killed: on a loaded machine a process can take
            # longer to start than the kill interval, and killing it again while it starts
            # leaves no worker serving at all (measured: 408 kills, no workflow finished).
            if slot.alive() and slot.process is not None and _ready(slot.process):
                victim = slot.worker_ids[-1]
                slot.process.kill()
                self.kills += 1
                self._note("worker.kill", victim)
                slot.start(wait=False)
            self.revive_dead()

    def _restarter(self) -> None:
        for at, name, action in self.restarts:
            while time.monotonic() - self.began < at and not self._hurry.is_set():
                if self._stop.wait(0.5):
                    return
            started = time.monotonic()
            try:
                action()
                self._note("server.restart", name, time.monotonic() - started)
            except Exception as exc:
                self.restart_errors.append(f"{name}: {exc}")
                self._note("server.restart_failed", f"{name}: {exc}"[:300])


def _ready(proc: WorkerProcess) -> bool:
    try:
        return proc.get("/readyz")[0] == 200
    except OSError:
        return False


def restart_actions(stack: Stack) -> list[tuple[str, Callable[[], float]]]:
    """Restart one Conductor, (one) lakeFS and the object store: each on its port and data."""
    conductors: Sequence[ServerProcess] = getattr(stack, "conductors", None) or (stack.conductor,)
    lakefses: Sequence[ServerProcess] = getattr(stack, "lakefs_servers", None) or (stack.lakefs,)
    actions: list[tuple[str, Callable[[], float]]] = [
        (f"conductor ({conductors[0].name})", lambda: conductors[0].restart(SERVER_PATIENCE)),
        (f"lakefs ({lakefses[0].name})", lambda: lakefses[0].restart(SERVER_PATIENCE)),
    ]
    store = stack.store
    if store is not None:

        def store_outage() -> float:
            started = time.monotonic()
            store.stop(kill=True)  # as a crash: no clean shutdown
            time.sleep(3.0)
            store.start()
            store.wait_ready(60)
            return time.monotonic() - started

        actions.append(("objectstore (kill -9, 3 s down)", store_outage))
    return actions


# -- the report -----------------------------------------------------------------------------


@dataclass
class ChaosReport:
    command: str
    started_utc: str
    finished_utc: str = ""
    seconds: float = 0.0
    start_phase_seconds: float = 0.0
    settle_seconds: float = 0.0
    workers: int = 0
    planned_tasks: int = 0
    units_planned: int = 0  # a chain, or a clash pair
    units_started: int = 0  # fewer than planned: the start phase hit --duration-limit
    tasks: int = 0  # logical tasks the started workflows scheduled
    task_attempts: int = 0  # task rows in Conductor (retries and re-scheduled included)
    workflows: dict[str, int] = field(default_factory=dict)  # by kind
    outcomes: dict[str, int] = field(default_factory=dict)  # "kind:STATUS"
    merges: int = 0
    conflicts: int = 0
    kills: int = 0
    worker_starts: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    restarts_skipped: str = ""
    zombies_stood_down: int = 0  # `attempt.zombie` events: superseded attempts that stopped
    max_fence_to_merge_ms: float = 0.0
    gc: dict[str, int] = field(default_factory=dict)
    logs_scanned: int = 0
    problems: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> str:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2, sort_keys=False)

    def raise_for_problems(self) -> None:
        if self.problems:
            shown = "\n  ".join(self.problems[:60])
            more = f"\n  ... and {len(self.problems) - 60} more" if len(self.problems) > 60 else ""
            raise AssertionError(
                f"chaos soak found {len(self.problems)} problem(s):\n  {shown}{more}"
            )

    def summary(self) -> str:
        restarted = ", ".join(f"{r['detail']} {r['seconds']}s" for r in self.restarts) or "none"
        return (
            f"{'OK' if self.ok else 'FAILED'}: {self.tasks} tasks in "
            f"{sum(self.workflows.values())} workflows ({self.task_attempts} task rows), "
            f"{self.merges} merges, {self.conflicts} conflicts, {self.kills} kills, "
            f"{len(self.unexpected_exits)} unexpected exits, restarts: {restarted}"
            f"{' (' + self.restarts_skipped + ')' if self.restarts_skipped else ''}; "
            f"{self.seconds:.0f} s; {len(self.problems)} problems"
        )


# -- verification -----------------------------------------------------------------------------


def _tasks_by_ref(run: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for task in sorted(run.tasks or [], key=lambda t: int(t.seq or 0)):
        out.setdefault(str(task.reference_task_name), []).append(task)
    return out


def _root(tasks: list[Any]) -> Any:
    """The first scheduling of a reference name: the root of its retry chain."""
    by_id = {str(t.task_id): t for t in tasks}
    task = tasks[-1]
    seen = set()
    while task.retried_task_id and str(task.retried_task_id) in by_id:
        if str(task.task_id) in seen:
            break
        seen.add(str(task.task_id))
        task = by_id[str(task.retried_task_id)]
    return task


def expected_executions(
    workflow_id: str, reference: str, task_type: str, repo: str, root: Any
) -> set[str]:
    incarnation = fences.Incarnation.of(root)
    return {
        fences.execution_key(
            fences.slot_key(workflow_id, reference, task_type, fences.Target(repo, BRANCH, p)),
            incarnation,
        )
        for p in PREFIX_SPELLINGS
    }


def first_parent_above(lakefs: LakeFS, repo: str, base: str) -> list[Any]:
    """Every commit on the target's first-parent log above `base`, newest first."""
    found: list[Any] = []
    for commit in lakefs.walk_log(repo, BRANCH, page_size=1000):
        if commit.id == base:
            return found
        found.append(commit)
    raise AssertionError(f"base {base} is not on the first-parent log of {BRANCH}")


def verify_runs(
    started: list[Started],
    runs: dict[str, Any],
    report: ChaosReport,
) -> dict[tuple[str, str], Any]:
    """Each workflow's end against its inputs; returns the expected merges by
    (workflow id, reference name) -> the last task of that reference (its output names the
    merge)."""
    problems = report.problems
    expected: dict[tuple[str, str], Any] = {}
    pairs: dict[str, list[tuple[Started, Any]]] = {}
    for item in started:
        run = runs[item.workflow_id]
        kind = item.planned.kind
        report.outcomes[f"{kind}:{run.status}"] = report.outcomes.get(f"{kind}:{run.status}", 0) + 1
        by_ref = _tasks_by_ref(run)
        report.tasks += len(by_ref)
        report.task_attempts += len(run.tasks or [])
        where = f"{kind} {item.planned.correlation_id} ({item.workflow_id})"
        reasons = [(t.reference_task_name, t.status, t.reason_for_incompletion) for t in run.tasks]
        if kind in ("chain", "flaky"):
            if run.status != "COMPLETED" or set(by_ref) != {"ingest", "transform", "summarize"}:
                problems.append(f"{where}: ended {run.status}, expected COMPLETED: {reasons}")
                continue
            total = (by_ref["summarize"][-1].output_data or {}).get("result", {}).get("total")
            if total != 20:
                problems.append(f"{where}: summarize total {total}, expected 20")
            for ref in WORKSPACE_REFS[kind]:
                expected[(item.workflow_id, ref)] = by_ref[ref][-1]
            chained = (by_ref["transform"][-1].input_data or {}).get("workspace", {}).get("ref")
            ingested = (by_ref["ingest"][-1].output_data or {}).get("workspace", {}).get("ref")
            if chained != ingested:
                problems.append(f"{where}: transform read {chained}, ingest returned {ingested}")
        elif kind == "terminal":
            last = by_ref.get("transform", [None])[-1]
            if (
                run.status != "FAILED"
                or last is None
                or last.status != "FAILED_WITH_TERMINAL_ERROR"
                or not str(last.reason_for_incompletion or "").startswith("handler_terminal")
                or "summarize" in by_ref
                or by_ref["ingest"][-1].status != "COMPLETED"
            ):
                problems.append(
                    f"{where}: ended {run.status}, expected FAILED at transform with "
                    f"handler_terminal: {reasons}"
                )
                continue
            expected[(item.workflow_id, "ingest")] = by_ref["ingest"][-1]
        else:
            pairs.setdefault(item.planned.tag, []).append((item, run))
    for tag, sides in sorted(pairs.items()):
        outcomes = []
        for item, run in sides:
            last = _tasks_by_ref(run).get("clash", [None])[-1]
            if run.status == "COMPLETED" and last is not None and last.status == "COMPLETED":
                outcomes.append("won")
                expected[(item.workflow_id, "clash")] = last
            elif (
                run.status == "FAILED"
                and last is not None
                and last.status == "FAILED_WITH_TERMINAL_ERROR"
                and str(last.reason_for_incompletion or "").startswith("merge_conflict")
            ):
                outcomes.append("conflict")
                report.conflicts += 1
            else:
                reason = None if last is None else (last.status, last.reason_for_incompletion)
                outcomes.append(f"{run.status}: {reason}")
        if sorted(outcomes) != ["conflict", "won"]:
            problems.append(f"clash pair {tag}: {outcomes}, expected one won and one conflict")
    return expected


def verify_target(
    lakefs: LakeFS,
    repo: str,
    base: str,
    started: list[Started],
    runs: dict[str, Any],
    expected: dict[tuple[str, str], Any],
    worker_ids: set[str],
    report: ChaosReport,
) -> None:
    """Every commit above the base, against the expected merges (module docstring)."""
    problems = report.problems
    ours = {s.workflow_id for s in started}
    commits = first_parent_above(lakefs, repo, base)
    report.merges = len(commits)
    landed: dict[tuple[str, str], list[Any]] = {}
    for commit in commits:
        meta = commit.metadata
        record = fences.PublishRecord.parse(commit.id, meta)
        key = (meta.get("perago.workflow_id", ""), meta.get("perago.reference_name", ""))
        if record is None or key[0] not in ours:
            problems.append(f"stray commit {commit.id} on {BRANCH}: {commit.message} {meta}")
            continue
        landed.setdefault(key, []).append(commit)
    for key, found in sorted(landed.items()):
        if len(found) > 1:
            problems.append(f"{key}: {len(found)} merges {[c.id for c in found]}")
        if key not in expected:
            problems.append(f"{key}: merged {[c.id for c in found]} but no merge was expected")
    for key in sorted(set(expected) - set(landed)):
        problems.append(f"{key}: no merge on {BRANCH}")
    for key, last in expected.items():
        if key not in landed:
            continue
        merge = landed[key][0]
        meta = merge.metadata
        workflow_id, ref = key
        tasks = _tasks_by_ref(runs[workflow_id])[ref]
        where = f"{key} merge {merge.id}"
        want = expected_executions(workflow_id, ref, str(last.task_type), repo, _root(tasks))
        if meta.get(fences.META_EXECUTION) not in want:
            problems.append(f"{where}: execution {meta.get(fences.META_EXECUTION)} not its root's")
        out = (last.output_data or {}).get("workspace", {}).get("ref")
        if out != merge.id:
            problems.append(f"{where}: the task's output ref is {out}")
        # The zombie check (module docstring).
        named = [t for t in tasks if str(t.task_id) == meta.get("perago.task_id")]
        worker_id = meta.get("perago.worker_id", "")
        token = meta.get(fences.META_TOKEN, "")
        if not named:
            problems.append(f"{where}: names task {meta.get('perago.task_id')}, not one of its own")
        if worker_id not in worker_ids:
            problems.append(f"{where}: by worker {worker_id!r}, not a process of this soak")
        if not token.startswith(worker_id + fences.TOKEN_SEPARATOR):
            problems.append(f"{where}: token {token!r} is not a delivery of {worker_id!r}")
        if named:
            task = named[0]
            end = int(task.end_time or 0) / 1000
            if end and merge.creation_date > end + ZOMBIE_SLACK_SECONDS:
                problems.append(
                    f"{where}: landed {merge.creation_date - end:.1f} s after its task "
                    f"{task.task_id} ended {task.status}: a zombie's merge"
                )
    # No perago merge anywhere else in the history (through second parents too).
    on_first = {c.id for c in commits}
    for commit in lakefs.walk_log(repo, BRANCH, page_size=1000, first_parent=False):
        if commit.id == base:
            continue
        if fences.PublishRecord.parse(commit.id, commit.metadata) and commit.id not in on_first:
            problems.append(
                f"perago merge {commit.id} off the first-parent line: {commit.metadata}"
            )


def scan_logs(slots: list[WorkerSlot], secrets: list[str], report: ChaosReport) -> None:
    """Secrets in worker logs; and counts of zombies that stood down and the widest
    fence-to-merge window, from the JSON events."""
    for slot in slots:
        for path in slot.logs:
            report.logs_scanned += 1
            text = path.read_text(errors="replace")
            for secret in secrets:
                if secret and secret in text:
                    problems_at = text.count(secret)
                    report.problems.append(f"secret found {problems_at}x in {path}")
            for line in text.splitlines():
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                name = event.get("event")
                if name == "attempt.zombie":
                    report.zombies_stood_down += 1
                elif name == "merge.done" and event.get("merged"):
                    report.max_fence_to_merge_ms = max(
                        report.max_fence_to_merge_ms, float(event.get("fence_to_merge_ms") or 0)
                    )


def verify_gc(
    lakefs: LakeFS, conductor: Conductor, repo: str, slots: list[WorkerSlot], report: ChaosReport
) -> None:
    """gc (with zero thresholds: every workflow is finished) must leave nothing behind."""
    totals: Counter[str] = Counter()
    for i, slot in enumerate(slots):
        last = i == len(slots) - 1
        gc = collect(
            slot.scratch,
            lakefs if last else None,
            conductor if last else None,
            [repo],
            older_than=0,
            intent_older_than=0,
            ledger_older_than=0,
            conductor_retry_seconds=30,
        )
        totals["attempt_dirs"] += len(gc.attempt_dirs)
        totals["staging_branches"] += len(gc.staging_branches)
        totals["intent_branches"] += len(gc.intent_branches)
        totals["ledger_entries"] += len(gc.ledger_entries)
        totals["kept_live"] += len(gc.kept_live)
        totals["unverifiable"] += len(gc.unverifiable)
        for item in gc.kept_live + gc.unverifiable:
            report.problems.append(f"gc kept {item}: {gc.unverifiable_reasons.get(item, 'live')}")
    report.gc = dict(totals)
    for slot in slots:
        if slot.scratch.exists():
            left = [
                p.name for p in slot.scratch.iterdir() if p.is_dir() and not p.name.startswith(".")
            ]
            if left:
                report.problems.append(f"attempt folders left in {slot.scratch}: {left[:10]}")
    for prefix in (fences.STAGING_PREFIX, fences.INTENT_PREFIX):
        left_branches = [name for name, _ in lakefs.list_branches(repo, prefix)]
        if left_branches:
            report.problems.append(f"{prefix}* branches left after gc: {left_branches[:10]}")
    with contextlib.suppress(NotFound):
        entries = list(lakefs.list_keys(repo, LEDGER_BRANCH, LEDGER_PREFIX))
        if entries:
            report.problems.append(f"ledger entries of finished workflows left: {entries[:5]}")


# -- the soak ---------------------------------------------------------------------------------


def seed_base(lakefs: LakeFS, repo: str, workdir: Path) -> str:
    src = workdir / "seed.txt"
    src.write_text("chaos soak base\n")
    lakefs.upload(repo, BRANCH, "c/README.txt", src)
    return lakefs.commit(repo, BRANCH, "chaos soak base", {}).id


def run_soak(
    endpoints: Endpoints,
    workdir: Path,
    *,
    stack: Stack | None = None,
    tasks: int = 1000,
    workers: int = 4,
    duration_limit: float = 1800,
    settle_limit: float = 600,
    kill_every: float = 4.0,
    seed: int = 1,
    max_inflight: int = 24,
    rate: float | None = None,
    restart_at: Sequence[float] | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> ChaosReport:
    """Run the soak (module docstring) and return its report; servers are restarted only
    when `stack` (one this process started) is given.

    Workflows start at a steady `rate` (workflows/s; default: as fast as `max_inflight`
    running workflows allow) until the plan is started or `duration_limit` seconds passed;
    then the soak waits up to `settle_limit` seconds for every workflow to end. The server
    restarts happen at `restart_at` (seconds after the first start; by default at 20 %,
    45 % and 70 % of the start phase the plan's size suggests, at two tasks a second), one
    after the other; any not yet due when the start phase ends happen then."""
    rng = random.Random(seed)
    run_tag = f"s{seed}-{uuid.uuid4().hex[:6]}"
    suffix = run_tag.replace("-", "_")
    report = ChaosReport(command=command, started_utc=now_utc(), workers=workers)
    began = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    lakefs = LakeFS(
        endpoints.lakefs_url, endpoints.lakefs_access_key_id, endpoints.lakefs_secret_access_key
    )
    # The last Conductor: the restarts take the first (`restart_actions`), so on a cluster
    # the sweeper and the status polls keep a server that answers throughout.
    conductor = Conductor(endpoints.conductor_urls[-1])
    repo = f"chaos-{run_tag}"
    lakefs.create_repository(repo)
    base = seed_base(lakefs, repo, workdir)
    os.environ["PERAGO_CHAOS_SUFFIX"] = suffix
    import importlib

    app_module = importlib.reload(chaos_app)
    register_app(conductor, app_module.app, retries=app_module.RETRIES)
    definitions = app_module.workflows(suffix)
    for definition in definitions.values():
        conductor.register_workflow(definition)
    chain_name, pair_name = list(definitions)
    units = plan(tasks, rng, run_tag)
    report.planned_tasks = sum(TASKS_PER_KIND[p.kind] for u in units for p in u)
    log(f"[chaos] repo {repo}, base {base}; {len(units)} units, {report.planned_tasks} tasks")

    slots = worker_slots(endpoints, workdir, workers, repo, suffix)
    for slot in slots:
        slot.start(wait=False)
    for slot in slots:
        assert slot.process is not None
        slot.process.wait_ready(SERVER_PATIENCE)
    log(f"[chaos] {workers} workers ready")

    start_window = duration_limit
    restarts: list[tuple[float, str, Callable[[], float]]] = []
    if stack is not None:
        actions = restart_actions(stack)
        if restart_at is None:
            expected_start = min(start_window, max(40.0, report.planned_tasks / 2.0))
            restart_at = [expected_start * f for f in (0.2, 0.45, 0.7)]
        for at, (name, action) in zip(restart_at, actions, strict=False):
            restarts.append((at, name, action))
    else:
        report.restarts_skipped = (
            "stack from the environment: its servers cannot be restarted, only workers killed"
        )
    sweeper = Sweeper(conductor)
    chaos = Chaos(slots, rng, kill_every, restarts, time.monotonic(), log).start()
    started: list[Started] = []
    running: set[str] = set()
    lock = threading.Lock()
    failed_starts: list[str] = []
    phase_began = time.monotonic()
    deadline = phase_began + start_window  # from the first start, not the setup
    last_check = 0.0

    def poll_running() -> None:
        with lock:
            ids = list(running)
        for workflow_id in ids:
            with contextlib.suppress(Exception):
                status = conductor.call(
                    conductor.workflows.get_execution_status, workflow_id, include_tasks=False
                ).status
                if status in TERMINAL:
                    with lock:
                        running.discard(workflow_id)
                    sweeper.discard(workflow_id)

    def start_unit(unit: list[Planned], head: str, sleep: float) -> None:
        for p in unit:
            ws = {"repository": repo, "branch": BRANCH, "ref_type": "commit", "ref": head}
            if p.kind == "clash":
                name = pair_name
                body: dict[str, Any] = {"workspace": ws, "pair": p.tag, "side": p.side}
            else:
                name = chain_name
                body = {
                    "workspace": ws,
                    "tag": p.tag,
                    "rows": 10,
                    "sleep": sleep,
                    "fail": {"chain": "", "flaky": "flaky", "terminal": "terminal"}[p.kind],
                }
            try:
                workflow_id = start_once(
                    endpoints.conductor_urls, name, p.correlation_id, body, deadline + 300
                )
            except RuntimeError as exc:
                with lock:
                    failed_starts.append(str(exc))
                return
            with lock:
                started.append(Started(p, workflow_id, head, time.monotonic()))
                running.add(workflow_id)
            sweeper.add(workflow_id)

    # Starting a workflow costs Conductor about half a second here: several starters keep
    # the rate up; the in-flight cap (running + being started) keeps the load steady.
    starters = ThreadPoolExecutor(STARTERS, thread_name_prefix="starter")
    pending: list[Future[None]] = []
    try:
        interval = 0.0 if rate is None else 1.0 / rate
        next_start = time.monotonic()
        for unit in units:
            if time.monotonic() >= deadline or failed_starts:
                if not failed_starts:
                    log("[chaos] start deadline reached before the plan was started")
                break
            while time.monotonic() < deadline:
                pending = [f for f in pending if not f.done()]
                with lock:
                    busy = len(running)
                if busy + len(pending) < max_inflight:
                    break
                poll_running()
                time.sleep(0.5)
            while time.monotonic() < next_start:
                time.sleep(0.05)
            next_start = time.monotonic() + interval * len(unit)
            try:
                head = lakefs.branch_head(repo, BRANCH)
            except Exception:
                time.sleep(1.0)
                head = lakefs.branch_head(repo, BRANCH)
            sleep = round(rng.uniform(0.0, 0.3), 2)
            pending.append(starters.submit(start_unit, unit, head, sleep))
            if time.monotonic() - last_check > 10:
                last_check = time.monotonic()
                with lock:
                    counts = (len(started), len(running))
                log(
                    f"[chaos] t={time.monotonic() - phase_began:.0f}s started {counts[0]} "
                    f"running {counts[1]} kills {chaos.kills}"
                )
        starters.shutdown(wait=True)
        report.problems.extend(failed_starts)
        report.start_phase_seconds = round(time.monotonic() - phase_began, 1)
        report.units_started = len({s.planned.tag for s in started})
        report.units_planned = len(units)
        if not started:
            report.problems.append("no workflow was started")
        chaos.finish_restarts()
        chaos.stop()
        log(f"[chaos] {len(started)} workflows started; waiting for them to end")
        settle_began = time.monotonic()
        while running and time.monotonic() - settle_began < settle_limit:
            poll_running()
            chaos.revive_dead()
            time.sleep(1.0)
        report.settle_seconds = round(time.monotonic() - settle_began, 1)
        if running:
            report.problems.append(
                f"{len(running)} workflows still running after {settle_limit:.0f} s: "
                f"{sorted(running)[:10]}"
            )
    finally:
        chaos.stop()
        sweeper.stop()
        for slot in slots:
            if slot.process is not None:
                code = slot.process.stop(60)
                # -15: stopped before it had installed its SIGTERM handler (just restarted).
                if code not in (0, -9, -15):
                    report.unexpected_exits.append(f"{slot.worker_ids[-1]} stopped with {code}")
    report.kills = chaos.kills
    report.worker_starts = sum(s.generation for s in slots)
    report.unexpected_exits = chaos.unexpected_exits + report.unexpected_exits
    report.restarts = [dataclasses.asdict(e) for e in chaos.events if e.what == "server.restart"]
    report.events = [dataclasses.asdict(e) for e in chaos.events]
    report.problems.extend(f"restart failed: {e}" for e in chaos.restart_errors)
    report.workflows = dict(Counter(s.planned.kind for s in started))
    if stack is not None and len(report.restarts) < len(restarts):
        report.problems.append(
            f"only {len(report.restarts)} of {len(restarts)} planned server restarts happened "
            "(the start phase ended first)"
        )

    log("[chaos] verifying")
    runs = {s.workflow_id: conductor.get_workflow(s.workflow_id) for s in started}
    for tag, count in Counter(s.planned.correlation_id for s in started).items():
        if count > 1:
            report.problems.append(f"{tag} started {count} times")
    worker_ids = {w for s in slots for w in s.worker_ids}
    expected = verify_runs(started, runs, report)
    verify_target(lakefs, repo, base, started, runs, expected, worker_ids, report)
    verify_gc(lakefs, conductor, repo, slots, report)
    secrets = sorted(
        {
            DEV_SECRET_ACCESS_KEY,
            STORE_SECRET_ACCESS_KEY,
            endpoints.lakefs_secret_access_key,
            *((endpoints.store.secret_access_key,) if endpoints.store else ()),
        }
    )
    scan_logs(slots, secrets, report)
    report.seconds = round(time.monotonic() - began, 1)
    report.finished_utc = now_utc()
    lakefs.close()
    log(f"[chaos] {report.summary()}")
    return report


@contextlib.contextmanager
def patient_servers(patience: float = SERVER_PATIENCE) -> Iterator[None]:
    """Every `ServerProcess.wait_ready` inside waits at least `patience` seconds.

    `start_stack` bounds Conductor's first start (240 s); on a loaded machine that bound is
    the soak's most likely failure and says nothing about the worker. A server that exits
    still fails at once (wait_ready checks the process)."""
    original = ServerProcess.wait_ready

    def wait_ready(self: ServerProcess, timeout: float) -> float:
        return original(self, max(timeout, patience))

    ServerProcess.wait_ready = wait_ready  # type: ignore[method-assign]
    try:
        yield
    finally:
        ServerProcess.wait_ready = original  # type: ignore[method-assign]


# Conductor's workflow execution lock, in-process (one Conductor). Without it (the devstack's
# default, and Conductor OSS's) two decides of one workflow can interleave: under load the
# soak saw a response timeout and the worker's COMPLETED report of the same task both
# applied (a retry of a completed task, and the next task scheduled with its input unresolved).
# Those are Conductor's races, not the worker's; the soak runs Conductor as production should.
CONDUCTOR_LOCK_ARGS = (
    "--conductor.app.workflow-execution-lock-enabled=true",
    "--conductor.workflow-execution-lock.type=local_only",
)


@contextlib.contextmanager
def locked_conductors() -> Iterator[None]:
    """Every Conductor `start_stack` builds inside gets `CONDUCTOR_LOCK_ARGS`."""
    from perago_worker.devstack import servers

    original = servers.conductor_server

    def conductor_server(*args: Any, **kwargs: Any) -> ServerProcess:
        server = original(*args, **kwargs)
        server.cmd.extend(CONDUCTOR_LOCK_ARGS)
        return server

    servers.conductor_server = conductor_server
    try:
        yield
    finally:
        servers.conductor_server = original


def start_soak_stack(workdir: Path, conductor: str = "sqlite") -> Stack:
    """An S3-backed stack as the soak needs it: patient, and Conductor with its lock.

    On `postgres` (two Conductors and two lakeFS on one PostgreSQL) the devstack already
    configures Conductor's Postgres lock, shared by both servers; the in-process lock would
    replace it with one per server, which does not exclude the other server's decide."""
    with patient_servers():
        if conductor == "postgres":
            return start_stack(workdir, blockstore="s3", conductor="postgres")
        with locked_conductors():
            return start_stack(workdir, blockstore="s3")


@contextlib.contextmanager
def stack_for(args: argparse.Namespace) -> Iterator[tuple[Endpoints, Stack | None]]:
    if args.stack_from_env:
        endpoints = endpoints_from_env(os.environ)
        if endpoints is None:
            raise SystemExit("--stack-from-env: PERAGO_TEST_LAKEFS_URL / _CONDUCTOR_URL unset")
        yield endpoints, None
        return
    stack = start_soak_stack(Path(args.start_stack) / "stack", args.conductor)
    try:
        yield stack.endpoints, stack
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--stack-from-env", action="store_true", help="a running stack (PERAGO_TEST_*)"
    )
    where.add_argument("--start-stack", metavar="DIR", help="start an S3-backed stack in DIR")
    parser.add_argument(
        "--conductor",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="--start-stack's Conductor persistence: one server on SQLite, or two Conductors "
        "and two lakeFS on PostgreSQL (workers split across them; one of each is restarted)",
    )
    parser.add_argument("--tasks", type=int, default=1000, help="logical tasks to start (at least)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--duration-limit", type=float, default=1800, help="start phase bound (s)")
    parser.add_argument("--settle-limit", type=float, default=600, help="wait for the ends (s)")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--max-inflight", type=int, default=24, help="running workflows at most")
    parser.add_argument("--rate", type=float, default=None, help="workflows started per second")
    parser.add_argument(
        "--restart-at",
        default=None,
        help="comma-separated seconds after the first start of the 3 server restarts",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="worker folders (default: DIR/workers)")
    parser.add_argument("--report", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/chaos.py", *(argv or sys.argv[1:])])
    base = Path(args.workdir or (Path(args.start_stack) if args.start_stack else Path("/tmp")))
    workdir = base / f"chaos-workers-{uuid.uuid4().hex[:6]}"
    with stack_for(args) as (endpoints, stack):
        report = run_soak(
            endpoints,
            workdir,
            stack=stack,
            tasks=args.tasks,
            workers=args.workers,
            duration_limit=args.duration_limit,
            settle_limit=args.settle_limit,
            kill_every=args.kill_every,
            seed=args.seed,
            max_inflight=args.max_inflight,
            rate=args.rate,
            restart_at=[float(x) for x in args.restart_at.split(",")] if args.restart_at else None,
            command=command,
        )
    if args.report:
        Path(args.report).write_text(report.as_json() + "\n")
    for problem in report.problems[:60]:
        print(f"  problem: {problem}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
