"""Specification of `perago_worker.gc`'s decisions: delete only on Conductor's clear word.

Pure logic: small fakes stand in for lakeFS and Conductor (the real-server cases are in
tests/integration/test_operations.py). A staging branch goes only when its task is terminal
or Conductor answers 404; an intent branch only when its workflow is terminal or 404; any
other answer keeps the branch and lists it as unverifiable, with the reason.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from perago_worker import cli, execution, fences
from perago_worker.conductor import ConductorError
from perago_worker.gc import GcReport, collect
from perago_worker.lakefs import CommitInfo, NotFound

REPO = "audio-lake"
OLD = time.time() - 30 * 86400
CONFIG = {"version": "3.32.3", "buildDate": "2026-01-01"}

Answer = str | BaseException | None  # a status, an error to raise, or an empty answer


# -- fakes -------------------------------------------------------------------------------------


@dataclass
class FakeLakeFS:
    branches: dict[str, str] = field(default_factory=dict)  # name -> head commit id
    commits: dict[str, CommitInfo] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def add_intent(self, name: str, metadata: dict[str, str], created: float = OLD) -> None:
        commit_id = f"c{len(self.commits):063d}"
        self.commits[commit_id] = CommitInfo(commit_id, [], "staged", metadata, int(created))
        self.branches[name] = commit_id

    def add_staging(self, task_id: str, created: float = OLD) -> str:
        name = fences.staging_branch(task_id, "0a1b2c3d", created)
        self.branches[name] = "head"
        return name

    def list_branches(self, repository: str, prefix: str) -> Iterator[tuple[str, str]]:
        assert repository == REPO
        for name in sorted(self.branches):
            if name.startswith(prefix):
                yield name, self.branches[name]

    def get_commit(self, repository: str, ref: str) -> CommitInfo:
        return self.commits[ref]

    def delete_branch(self, repository: str, name: str) -> bool:
        self.deleted.append(name)
        return self.branches.pop(name, None) is not None

    # The execution ledger: objects on the ledger branch (absent until one is written).
    ledger: dict[str, float] = field(default_factory=dict)  # key -> mtime

    def add_ledger(self, workflow_id: str, task_id: str, mtime: float = OLD) -> str:
        key = execution.ledger_key(workflow_id, "s" * 64, fences.Incarnation(task_id, 0, 1, 2))
        self.ledger[key] = mtime
        return key

    def list_objects(self, repository: str, ref: str, prefix: str) -> Iterator[list[Any]]:
        assert ref == execution.LEDGER_BRANCH
        if not self.ledger:
            raise NotFound(404, "branch not found")
        yield [
            SimpleNamespace(key=k, mtime=m)
            for k, m in sorted(self.ledger.items())
            if k.startswith(prefix)
        ]

    def delete_objects(self, repository: str, branch: str, keys: list[str]) -> None:
        for key in keys:
            self.deleted.append(key)
            self.ledger.pop(key, None)


def _answer(value: Answer, kind: str) -> Any:
    if isinstance(value, BaseException):
        raise value
    return None if value is None else SimpleNamespace(status=value, kind=kind)


@dataclass
class FakeConductor:
    """Answers like `Conductor`: `call(fn, ..., retry_seconds=)` and the SDK's resources.

    `Conductor.call` turns the SDK's errors into `ConductorError(status)` (0: unreachable);
    the fakes raise those directly, or any other exception a client could raise.
    """

    tasks_by_id: dict[str, Answer] = field(default_factory=dict)
    workflows_by_id: dict[str, Answer] = field(default_factory=dict)
    config: Any = field(default_factory=lambda: dict(CONFIG))  # or an exception to raise
    url: str = "http://conductor.test/api"
    budgets: list[float | None] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tasks = SimpleNamespace(get_task=self._get_task)
        self.workflows = SimpleNamespace(get_execution_status=self._get_workflow)
        self.metadata = SimpleNamespace(api_client=SimpleNamespace(call_api=self._call_api))

    def call(self, fn: Any, *args: Any, retry_seconds: float | None = None, **kwargs: Any) -> Any:
        self.budgets.append(retry_seconds)
        return fn(*args, **kwargs)

    def _get_task(self, task_id: str, **_: Any) -> Any:
        self.asked.append(f"task {task_id}")
        return _answer(self.tasks_by_id.get(task_id, ConductorError(404, "not found")), "task")

    def _get_workflow(self, workflow_id: str, include_tasks: bool = True, **_: Any) -> Any:
        assert include_tasks is False, "gc needs the status only"
        self.asked.append(f"workflow {workflow_id}")
        default = ConductorError(404, "not found")
        return _answer(self.workflows_by_id.get(workflow_id, default), "workflow")

    def _call_api(self, path: str, method: str, **_: Any) -> Any:
        assert (path, method) == ("/admin/config", "GET")
        self.asked.append("config")
        if isinstance(self.config, BaseException):
            raise self.config
        return self.config


def run(lakefs: FakeLakeFS, conductor: FakeConductor, tmp_path: Path, **kwargs: Any) -> GcReport:
    options: dict[str, Any] = {"older_than": 3600, "intent_older_than": 86400, **kwargs}
    return collect(tmp_path, lakefs, conductor, [REPO], **options)  # type: ignore[arg-type]


def intent_name(i: int = 0) -> str:
    return f"{fences.INTENT_PREFIX}{i:048x}"


def item(name: str) -> str:
    return f"{REPO}:{name}"


# Every answer that does not prove a branch is unneeded, as Conductor.call raises it.
DOUBTS: dict[str, BaseException] = {
    "unreachable": ConductorError(0, "Connection refused"),
    "timeout": ConductorError(0, "Request timeout: timed out"),
    "5xx": ConductorError(503, "Service Unavailable"),
    "500": ConductorError(500, "Internal Server Error"),
    "401": ConductorError(401, "Unauthorized"),
    "403": ConductorError(403, "Forbidden"),
    "409": ConductorError(409, "Conflict"),
    "transport": httpx.ConnectError("connection refused"),
    "os-error": ConnectionRefusedError(111, "Connection refused"),
    "bug": RuntimeError("client closed"),
}


# -- staging branches --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        "COMPLETED",
        "FAILED",
        "FAILED_WITH_TERMINAL_ERROR",
        "CANCELED",
        "TIMED_OUT",
        "SKIPPED",
        "COMPLETED_WITH_ERRORS",
    ],
)
def test_staging_branch_of_a_terminal_task_is_deleted(tmp_path: Path, status: str) -> None:
    lakefs = FakeLakeFS()
    name = lakefs.add_staging("task1")
    report = run(lakefs, FakeConductor(tasks_by_id={"task1": status}), tmp_path)
    assert report.staging_branches == [item(name)]
    assert lakefs.deleted == [name]
    assert report.unverifiable == [] and report.kept_live == []


def test_staging_branch_whose_task_conductor_answers_404_is_deleted(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    name = lakefs.add_staging("gone")
    report = run(lakefs, FakeConductor(), tmp_path)
    assert report.staging_branches == [item(name)]
    assert lakefs.deleted == [name]


@pytest.mark.parametrize("status", ["IN_PROGRESS", "SCHEDULED"])
def test_staging_branch_of_a_live_task_is_kept_live(tmp_path: Path, status: str) -> None:
    lakefs = FakeLakeFS()
    name = lakefs.add_staging("task1")
    report = run(lakefs, FakeConductor(tasks_by_id={"task1": status}), tmp_path)
    assert report.kept_live == [item(name)]
    assert lakefs.deleted == [] and report.staging_branches == []


@pytest.mark.parametrize("doubt", list(DOUBTS), ids=list(DOUBTS))
def test_staging_branch_is_kept_when_conductor_cannot_say(tmp_path: Path, doubt: str) -> None:
    lakefs = FakeLakeFS()
    name = lakefs.add_staging("task1")
    report = run(lakefs, FakeConductor(tasks_by_id={"task1": DOUBTS[doubt]}), tmp_path)
    assert lakefs.deleted == []
    assert report.staging_branches == [] and report.kept_live == []
    assert report.unverifiable == [item(name)]
    assert report.unverifiable_reasons[item(name)]


def test_staging_branch_is_kept_when_conductor_answers_without_a_status(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    name = lakefs.add_staging("task1")
    report = run(lakefs, FakeConductor(tasks_by_id={"task1": None}), tmp_path)
    assert lakefs.deleted == []
    assert report.unverifiable == [item(name)]
    assert "no task status" in report.unverifiable_reasons[item(name)]


def test_a_404_for_a_task_id_the_branch_name_may_have_truncated_deletes_nothing(
    tmp_path: Path,
) -> None:
    lakefs = FakeLakeFS()
    long_id = "t" * 50
    name = lakefs.add_staging(long_id)
    parsed = fences.parse_staging_branch(name)
    assert parsed is not None and parsed[0] != long_id, "the name truncates the id"
    report = run(lakefs, FakeConductor(), tmp_path)  # 404 for the truncated id
    assert lakefs.deleted == []
    assert report.unverifiable == [item(name)]
    assert "truncated" in report.unverifiable_reasons[item(name)]


def test_a_uuid_task_id_survives_the_branch_name_and_its_404_is_believed(
    tmp_path: Path,
) -> None:
    task_id = "3f0c2a5e-8b1d-4c6f-9a7e-0d2b4c6e8f10"
    lakefs = FakeLakeFS()
    name = lakefs.add_staging(task_id)
    assert fences.parse_staging_branch(name) == (task_id, float(int(OLD)))
    report = run(lakefs, FakeConductor(), tmp_path)
    assert report.staging_branches == [item(name)]


def test_young_staging_branch_is_neither_asked_about_nor_deleted(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_staging("task1", created=time.time())
    conductor = FakeConductor(tasks_by_id={"task1": "COMPLETED"})
    report = run(lakefs, conductor, tmp_path)
    assert lakefs.deleted == [] and report == GcReport()
    assert not [a for a in conductor.asked if a.startswith("task")]


# -- intent branches ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"])
def test_intent_of_a_terminal_workflow_is_deleted(tmp_path: Path, status: str) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1"})
    report = run(lakefs, FakeConductor(workflows_by_id={"wf1": status}), tmp_path)
    assert report.intent_branches == [item(intent_name())]
    assert lakefs.deleted == [intent_name()]


def test_intent_whose_workflow_conductor_answers_404_is_deleted(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf-gone"})
    conductor = FakeConductor()
    report = run(lakefs, conductor, tmp_path)
    assert report.intent_branches == [item(intent_name())]
    assert lakefs.deleted == [intent_name()]
    assert "workflow wf-gone" in conductor.asked


@pytest.mark.parametrize("status", ["RUNNING", "PAUSED"])
def test_intent_of_a_workflow_that_can_still_retry_is_kept_live(
    tmp_path: Path, status: str
) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1"})
    report = run(lakefs, FakeConductor(workflows_by_id={"wf1": status}), tmp_path)
    assert report.kept_live == [item(intent_name())]
    assert lakefs.deleted == []


@pytest.mark.parametrize("doubt", list(DOUBTS), ids=list(DOUBTS))
def test_intent_is_kept_when_conductor_cannot_say(tmp_path: Path, doubt: str) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1"})
    report = run(lakefs, FakeConductor(workflows_by_id={"wf1": DOUBTS[doubt]}), tmp_path)
    assert lakefs.deleted == []
    assert report.intent_branches == [] and report.kept_live == []
    assert report.unverifiable == [item(intent_name())]
    reason = report.unverifiable_reasons[item(intent_name())]
    if isinstance(DOUBTS[doubt], ConductorError):
        # `Conductor 503: ...` with an HTTP answer; without one (status 0), the cause alone.
        assert str(DOUBTS[doubt]) in reason


def test_intent_is_kept_when_conductor_answers_without_a_status(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1"})
    report = run(lakefs, FakeConductor(workflows_by_id={"wf1": None}), tmp_path)
    assert lakefs.deleted == []
    assert report.unverifiable == [item(intent_name())]


@pytest.mark.parametrize(
    "metadata",
    [{}, {"perago.workflow_id": ""}, {"perago.publish_key": "abc", "perago.task_id": "t1"}],
    ids=["no-metadata", "empty-id", "other-keys-only"],
)
def test_intent_without_a_workflow_id_is_kept_unverifiable(
    tmp_path: Path, metadata: dict[str, str]
) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), metadata)
    conductor = FakeConductor()  # would answer 404 to anything asked
    report = run(lakefs, conductor, tmp_path)
    assert lakefs.deleted == []
    assert report.unverifiable == [item(intent_name())]
    assert "perago.workflow_id" in report.unverifiable_reasons[item(intent_name())]
    assert not [a for a in conductor.asked if a.startswith("workflow")]


def test_intent_reads_only_the_workflow_id_of_its_commit_metadata(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1", "perago.execution": "e" * 64})
    conductor = FakeConductor(workflows_by_id={"wf1": "COMPLETED"})
    report = run(lakefs, conductor, tmp_path)
    assert report.intent_branches == [item(intent_name())]
    assert "workflow wf1" in conductor.asked


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"])
def test_young_intent_of_a_terminal_workflow_is_kept_until_old_enough(
    tmp_path: Path, status: str
) -> None:
    """A finished workflow can still be rerun or retried by hand: keep its memory a while."""
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1"}, created=time.time())
    conductor = FakeConductor(workflows_by_id={"wf1": status})
    report = run(lakefs, conductor, tmp_path)
    assert lakefs.deleted == [] and report == GcReport()
    report = run(lakefs, conductor, tmp_path, intent_older_than=0)
    assert report.intent_branches == [item(intent_name())]


def test_young_intent_whose_workflow_conductor_answers_404_is_deleted(tmp_path: Path) -> None:
    """No workflow, nothing that can retry it: its age does not matter."""
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf-gone"}, created=time.time())
    report = run(lakefs, FakeConductor(), tmp_path)
    assert report.intent_branches == [item(intent_name())]
    assert lakefs.deleted == [intent_name()]


def test_young_intents_that_are_live_or_unverifiable_are_listed(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    now = time.time()
    lakefs.add_intent(intent_name(1), {"perago.workflow_id": "wf-running"}, created=now)
    lakefs.add_intent(intent_name(2), {"perago.workflow_id": "wf-doubt"}, created=now)
    lakefs.add_intent(intent_name(3), {}, created=now)  # nothing to ask, nothing to do yet
    conductor = FakeConductor(workflows_by_id={"wf-running": "RUNNING", "wf-doubt": DOUBTS["5xx"]})
    report = run(lakefs, conductor, tmp_path)
    assert lakefs.deleted == []
    assert report.kept_live == [item(intent_name(1))]
    assert report.unverifiable == [item(intent_name(2))]


# -- a server that is not (provably) Conductor ---------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        ConductorError(0, "Connection refused"),
        ConductorError(503, "Service Unavailable"),
        ConductorError(401, "Unauthorized"),
        ConductorError(403, "Forbidden"),
        ConductorError(404, "No static resource"),
        None,
        ["not", "a", "map"],
        "<html>",
    ],
    ids=["unreachable", "503", "401", "403", "404", "empty", "list", "html"],
)
def test_nothing_is_deleted_unless_the_server_shows_it_is_conductor(
    tmp_path: Path, config: Any
) -> None:
    """A wrong URL whose server answers 404 to everything must not read as "all gone"."""
    lakefs = FakeLakeFS()
    staging = lakefs.add_staging("task1")
    lakefs.add_intent(intent_name(), {"perago.workflow_id": "wf1"})
    conductor = FakeConductor(config=config)  # every task and workflow would answer 404
    report = run(lakefs, conductor, tmp_path)
    assert lakefs.deleted == []
    assert report.staging_branches == [] and report.intent_branches == []
    assert sorted(report.unverifiable) == sorted([item(staging), item(intent_name())])
    for reason in report.unverifiable_reasons.values():
        assert "cannot verify the server is Conductor" in reason
    assert conductor.asked == ["config"], "probed once, then nothing asked per branch"


def test_a_server_with_a_config_map_but_no_version_is_trusted(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    name = lakefs.add_staging("task1")
    report = run(lakefs, FakeConductor(config={"conductor.app.stack": "x"}), tmp_path)
    assert report.staging_branches == [item(name)]


# -- bounded calls, dry run, several branches ---------------------------------------------------


@pytest.mark.parametrize("budget", [None, 1.5])
def test_every_conductor_call_carries_a_short_retry_budget(
    tmp_path: Path, budget: float | None
) -> None:
    lakefs = FakeLakeFS()
    lakefs.add_staging("task1")
    lakefs.add_staging("task2")
    lakefs.add_intent(intent_name(1), {"perago.workflow_id": "wf1"})
    conductor = FakeConductor(tasks_by_id={"task1": DOUBTS["5xx"]})
    kwargs = {} if budget is None else {"conductor_retry_seconds": budget}
    run(lakefs, conductor, tmp_path, **kwargs)
    expected = 5.0 if budget is None else budget
    assert len(conductor.budgets) == 4  # the probe, two tasks, one workflow
    assert set(conductor.budgets) == {expected}


def test_dry_run_reports_the_same_and_deletes_nothing(tmp_path: Path) -> None:
    def populate() -> tuple[FakeLakeFS, FakeConductor]:
        lakefs = FakeLakeFS()
        lakefs.add_staging("done")
        lakefs.add_staging("live")
        lakefs.add_staging("doubt")
        lakefs.add_intent(intent_name(1), {"perago.workflow_id": "wf-done"})
        lakefs.add_intent(intent_name(2), {"perago.workflow_id": "wf-running"})
        lakefs.add_intent(intent_name(3), {"perago.workflow_id": "wf-doubt"})
        lakefs.add_intent(intent_name(4), {"perago.workflow_id": "wf-gone"})
        conductor = FakeConductor(
            tasks_by_id={"done": "COMPLETED", "live": "IN_PROGRESS", "doubt": DOUBTS["403"]},
            workflows_by_id={
                "wf-done": "COMPLETED",
                "wf-running": "RUNNING",
                "wf-doubt": DOUBTS["unreachable"],
            },
        )
        return lakefs, conductor

    lakefs, conductor = populate()
    dry = run(lakefs, conductor, tmp_path, dry_run=True)
    assert lakefs.deleted == []
    lakefs, conductor = populate()
    real = run(lakefs, conductor, tmp_path)
    assert dry == real
    stage = {n.split("-")[2]: n for n in lakefs.branches if n.startswith(fences.STAGING_PREFIX)}
    assert real.staging_branches == [item(fences.staging_branch("done", "0a1b2c3d", OLD))]
    assert real.intent_branches == [item(intent_name(1)), item(intent_name(4))]
    assert sorted(real.kept_live) == sorted([item(stage["live"]), item(intent_name(2))])
    assert sorted(real.unverifiable) == sorted([item(stage["doubt"]), item(intent_name(3))])
    assert sorted(lakefs.deleted) == sorted(
        [fences.staging_branch("done", "0a1b2c3d", OLD), intent_name(1), intent_name(4)]
    )


def test_without_servers_only_attempt_folders_are_collected(tmp_path: Path) -> None:
    assert collect(tmp_path, None, None, [REPO], older_than=0) == GcReport()


# -- the CLI's report ----------------------------------------------------------------------------


def test_cli_gc_prints_unverifiable_branches_with_their_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = GcReport(
        staging_branches=[f"{REPO}:perago-stage-a"],
        kept_live=[f"{REPO}:perago-stage-b"],
    )
    report.keep_unverifiable(f"{REPO}:{intent_name()}", "ConductorError: Conductor 503: down")
    monkeypatch.setattr("perago_worker.gc.collect", lambda *a, **k: report)
    monkeypatch.setattr(cli, "clients", lambda settings: (None, None))
    monkeypatch.setenv("PERAGO_SCRATCH_ROOT", str(tmp_path))
    args = argparse.Namespace(
        config=None,
        repository=[REPO],
        older_than=0.0,
        intent_older_than=0.0,
        ledger_older_than=0.0,
        dry_run=False,
    )
    assert cli.cmd_gc(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"removed staging branch {REPO}:perago-stage-a" in out
    assert f"kept (live) {REPO}:perago-stage-b" in out
    assert f"kept (unverifiable) {REPO}:{intent_name()}: ConductorError: Conductor 503: down" in out
    assert out[-1].endswith("; kept 1 live, 1 unverifiable")


# --- the execution ledger ------------------------------------------------------------------


LEDGER_WINDOW = 10 * 86400  # the window these tests give gc.collect's ledger_older_than
YOUNG_LEDGER = time.time() - 5 * 86400  # inside it, though older than the intents' window


def _ledger_gc(answer: Answer, *, mtime: float = OLD) -> tuple[FakeLakeFS, Any]:
    lakefs = FakeLakeFS()
    lakefs.add_ledger("wf-1", "t-1", mtime)
    conductor = FakeConductor(workflows_by_id={"wf-1": answer})
    report = collect(
        Path("/nonexistent-scratch"),
        lakefs,  # type: ignore[arg-type]
        conductor,  # type: ignore[arg-type]
        [REPO],
        older_than=0,
        intent_older_than=3600,
        ledger_older_than=LEDGER_WINDOW,
    )
    return lakefs, report


def test_ledger_entries_of_a_workflow_conductor_no_longer_knows_are_removed() -> None:
    lakefs, report = _ledger_gc(ConductorError(404, "not found"))
    assert lakefs.ledger == {}
    assert len(report.ledger_entries) == 1


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"])
def test_ledger_entries_of_a_terminal_workflow_outlive_its_intents_for_the_ledger_window(
    status: str,
) -> None:
    # A terminal workflow can still be retried by hand; its entries tell a retry of a rerun
    # from a retry of the run before it.
    lakefs, report = _ledger_gc(status, mtime=YOUNG_LEDGER)
    assert len(lakefs.ledger) == 1
    assert report.ledger_entries == []
    lakefs, report = _ledger_gc(status)
    assert lakefs.ledger == {} and len(report.ledger_entries) == 1


def test_ledger_entries_inside_the_window_are_not_even_asked_about() -> None:
    lakefs = FakeLakeFS()
    lakefs.add_ledger("wf-1", "t-1", YOUNG_LEDGER)
    conductor = FakeConductor(workflows_by_id={"wf-1": ConductorError(404, "not found")})
    collect(
        Path("/nonexistent-scratch"),
        lakefs,  # type: ignore[arg-type]
        conductor,  # type: ignore[arg-type]
        [REPO],
        older_than=0,
        intent_older_than=0,
        ledger_older_than=LEDGER_WINDOW,
    )
    assert len(lakefs.ledger) == 1
    assert [a for a in conductor.asked if "wf-1" in a] == []


@pytest.mark.parametrize(
    "answer", ["RUNNING", ConductorError(503, "unavailable"), ConductorError(403, "forbidden")]
)
def test_ledger_entries_of_a_live_or_unverifiable_workflow_are_kept(answer: Answer) -> None:
    lakefs, report = _ledger_gc(answer)
    assert len(lakefs.ledger) == 1
    assert report.ledger_entries == []


# -- one answer per workflow per round; manual executions ---------------------------------------


def test_a_workflows_intents_and_ledger_entries_cost_one_conductor_read(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    for i in range(3):
        lakefs.add_intent(intent_name(i), {"perago.workflow_id": "wf1"})
    lakefs.add_ledger("wf1", "task1")
    conductor = FakeConductor(workflows_by_id={"wf1": ConductorError(404, "not found")})
    report = run(lakefs, conductor, tmp_path)
    assert len(report.intent_branches) == 3 and len(report.ledger_entries) == 1
    assert conductor.asked.count("workflow wf1") == 1


def test_a_doubt_about_a_workflow_is_asked_again_not_remembered(tmp_path: Path) -> None:
    lakefs = FakeLakeFS()
    for i in range(2):
        lakefs.add_intent(intent_name(i), {"perago.workflow_id": "wf1"})
    conductor = FakeConductor(workflows_by_id={"wf1": DOUBTS["5xx"]})
    report = run(lakefs, conductor, tmp_path)
    assert len(report.unverifiable) == 2 and conductor.asked.count("workflow wf1") == 2


def test_a_manual_executions_leftovers_go_as_a_finished_workflows_without_asking(
    tmp_path: Path,
) -> None:
    manual = fences.manual_execution_id(OLD)
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": manual})
    staging = lakefs.add_staging(manual)
    lakefs.add_ledger(manual, manual)
    conductor = FakeConductor()
    report = run(lakefs, conductor, tmp_path)
    assert report.intent_branches == [item(intent_name())]
    assert report.staging_branches == [item(staging)] and len(report.ledger_entries) == 1
    assert [a for a in conductor.asked if manual in a] == []


def test_a_young_manual_intent_is_kept_like_a_finished_workflows(tmp_path: Path) -> None:
    manual = fences.manual_execution_id(time.time())
    lakefs = FakeLakeFS()
    lakefs.add_intent(intent_name(), {"perago.workflow_id": manual}, created=time.time())
    report = run(lakefs, FakeConductor(), tmp_path)
    assert report.intent_branches == [] and intent_name() in lakefs.branches
