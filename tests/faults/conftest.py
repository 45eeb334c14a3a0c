"""Fault-suite fixtures: real worker processes sharing one scratch root, killed at will.

`PERAGO_TEST_CONDUCTOR=postgres` runs the suite on the production persistence: PostgreSQL
under two Conductors and two lakeFS servers (`perago_worker.devstack.servers`, started for
this folder in place of the session's stack). The harness then starts its workers
alternately on the first and the second instance, so a second worker of a test polls
another Conductor and merges through another lakeFS than the first; `stack.conductor` and
`stack.lakefs` (what the restart tests restart) are the first instance's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from perago_testing import keys_at, lakefs_client, one_task_workflow, seed, suffix, workspace
from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app, wait_for_workflow
from perago_worker.devstack.servers import (
    CONDUCTOR_PERSISTENCES,
    Endpoints,
    Stack,
    endpoints_from_env,
    running_stack,
)
from perago_worker.devstack.worker_process import WorkerProcess, start_worker
from perago_worker.execution import LEDGER_BRANCH, LEDGER_PREFIX
from perago_worker.gc import collect
from perago_worker.lakefs import LakeFS, NotFound

HERE = Path(__file__).parent
S = suffix()
PERSISTENCE = os.environ.get("PERAGO_TEST_CONDUCTOR", "sqlite")
if PERSISTENCE not in CONDUCTOR_PERSISTENCES:
    raise pytest.UsageError(f"PERAGO_TEST_CONDUCTOR must be one of {CONDUCTOR_PERSISTENCES}")
_CLUSTER: Stack | None = None

if PERSISTENCE == "postgres":

    @pytest.fixture(scope="session")
    def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
        """The postgres stack, in place of the session's (tests/conftest.py); a running one
        when the exports of `devstack up --conductor postgres` are set (the restart tests
        then skip, as on any external stack)."""
        global _CLUSTER
        external = endpoints_from_env(os.environ)
        if external is not None and external.conductor_persistence == "postgres":
            yield external
            return
        with running_stack(tmp_path_factory.mktemp("fault-cluster"), conductor="postgres") as st:
            _CLUSTER = st
            try:
                yield st.endpoints
            finally:
                _CLUSTER = None

    @pytest.fixture(scope="session")
    def stack(endpoints: Endpoints) -> Stack:
        if _CLUSTER is None:
            pytest.skip("the cluster is external (PERAGO_TEST_*_URLS); cannot restart it")
        return _CLUSTER

    # The session-scoped clients follow this folder's `endpoints` (the root conftest's are
    # cached for the session: made here, they would point later folders at the cluster).
    @pytest.fixture(scope="session")
    def lakefs(endpoints: Endpoints) -> Iterator[LakeFS]:
        yield from lakefs_client(endpoints)

    @pytest.fixture(scope="session")
    def conductor(endpoints: Endpoints) -> Conductor:
        return Conductor(endpoints.conductor_url)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if report.failed and _CLUSTER is not None and call.when in ("setup", "call"):
            report.sections.append(("cluster logs", _CLUSTER.log_tails()))


@dataclass
class Case:
    workflow_id: str
    task_type: str
    branch: str
    input_ref: str
    params: dict[str, Any]


class Sweeper:
    """Stands in for a production Conductor's sweeper cadence.

    Conductor's sweeper pops a workflow from the decider queue and leaves the message
    unacknowledged; both the SQLite and the PostgreSQL queue DAO re-offer such messages only
    60 s after their delivery time, on a 60 s schedule (`UNACK_SCHEDULE_MS` in each), so a
    response timeout would take one to two minutes to be noticed on either persistence.
    Asking Conductor to `decide` the running case workflows every second runs Conductor's own
    timeout and retry logic, just sooner (on PostgreSQL under the shared workflow lock).
    """

    def __init__(self, conductor: Conductor) -> None:
        self.conductor = conductor
        self.workflows: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for workflow_id in list(self.workflows):
                with contextlib.suppress(Exception):
                    self.conductor.decide(workflow_id)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Harness:
    endpoints: Endpoints
    lakefs: LakeFS
    conductor: Conductor
    repo: str
    scratch: Path
    workdir: Path
    base: str
    sweeper: Sweeper
    workers: list[WorkerProcess] = field(default_factory=list)

    def worker(self, name: str, *, faults: str = "", **env: str) -> WorkerProcess:
        proc = start_worker(
            "fault_app:app",
            # Alternately the first and the second instance (one, on a single-server stack).
            self.endpoints.instance(len(self.workers)),
            self.workdir / name,
            name=name,
            env={
                "PYTHONPATH": str(HERE),
                "PERAGO_TEST_SUFFIX": S,
                "PERAGO_SCRATCH_ROOT": str(self.scratch),
                "PERAGO_FAULT_POINTS": faults,
                "PERAGO_ALLOWED_REPOSITORIES": json.dumps([self.repo]),
                **env,
            },
            wait=False,
        )
        # Tracked before it is ready: a worker whose readiness wait fails (a slow preflight on a
        # busy machine) is still killed at teardown, instead of polling the next tests' tasks.
        self.workers.append(proc)
        proc.wait_ready()
        return proc

    def start(
        self,
        kind: str,
        *,
        branch: str | None = None,
        ref: str | None = None,
        drift: bool = False,
        **params: Any,
    ) -> Case:
        """One-task workflow on a fresh branch (or `branch`, which must exist) from `ref`.

        `drift=True` adds `params.nonce = ${CPEWF_TASK_ID}`: Conductor substitutes the task id
        of each scheduling, so a retry's input differs from its predecessor's.
        """
        task_type = f"fault_{kind}_{S}"
        ref = ref or self.base
        if branch is None:
            branch = f"case-{suffix()}"
            self.lakefs.create_branch(self.repo, branch, ref, hidden=False)
        params = {"tag": branch, **params}
        task_input = {"workspace": workspace(self.repo, ref, branch), "params": params}
        if drift:
            name = drifting_workflow(self.conductor, task_type, sorted(params))
        else:
            name = one_task_workflow(self.conductor, task_type, sorted(task_input))
        workflow_id = self.conductor.start_workflow(name, task_input)
        self.sweeper.workflows.add(workflow_id)
        return Case(workflow_id, task_type, branch, ref, params)

    def task(self, case: Case) -> Any:
        run = self.conductor.get_workflow(case.workflow_id)
        return run.tasks[-1] if run.tasks else None

    def wait_task(self, case: Case, predicate: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.task(case)
            if task is not None and predicate(task):
                return task
            time.sleep(0.1)
        raise AssertionError(f"task never matched; last: {self.task(case)}")

    def wait_event(self, worker: WorkerProcess, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in worker.events():
                if line.get("event") == event:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no {event} in worker log:\n{worker.tail()}")

    def commits_since(self, branch: str, since: str) -> list[Any]:
        """Every commit on `branch`'s first-parent log above `since`, newest first.

        Whatever its metadata: a second merge, a merge without our keys or a stray commit
        all count.
        """
        log = self.lakefs.log(self.repo, branch, amount=1000)
        for i, commit in enumerate(log):
            if commit.id == since:
                return log[:i]
        raise AssertionError(f"{since} is not on the first-parent log of {branch}")

    def verify(
        self,
        case: Case,
        *,
        status: str = "COMPLETED",
        timeout: float = 180,
        since: str | None = None,
    ) -> Any:
        """The workflow's end, exactly one commit since the input (the merge, with provenance),
        the data, and a clean gc. `since`: count from that commit instead of the input ref."""
        run = wait_for_workflow(self.conductor, case.workflow_id, timeout)
        assert run.status == status, [(t.status, t.reason_for_incompletion) for t in run.tasks]
        commits = self.commits_since(case.branch, since or case.input_ref)
        if status == "COMPLETED":
            assert len(commits) == 1, [(c.id, c.message, c.metadata) for c in commits]
            merge = commits[0]
            final = run.tasks[-1].output_data["workspace"]["ref"]
            assert final == merge.id == self.lakefs.branch_head(self.repo, case.branch)
            assert merge.metadata["perago.workflow_id"] == case.workflow_id
            assert merge.metadata["perago.input_ref"] == case.input_ref
            assert merge.metadata["perago.task_id"] in {t.task_id for t in run.tasks}
            assert merge.metadata.get(fences.META_EXECUTION), merge.metadata
            files = case.params.get("files", 1)
            keys = keys_at(self.lakefs, self.repo, final, f"f/out/{case.params['tag']}/")
            assert len(keys) == files
        else:
            assert commits == [], [(c.id, c.message, c.metadata) for c in commits]
        self.gc_clean()
        return run

    # -- Conductor's operator calls (REST, as in WorkflowResource of Conductor 3.32) --------

    def terminate(self, workflow_id: str, reason: str = "test") -> None:
        resp = httpx.delete(
            f"{self.conductor.url}/workflow/{workflow_id}", params={"reason": reason}, timeout=30
        )
        assert resp.status_code < 300, resp.text

    def rerun(
        self, workflow_id: str, task_id: str, task_input: dict[str, Any] | None = None
    ) -> None:
        body: dict[str, Any] = {"reRunFromWorkflowId": workflow_id, "reRunFromTaskId": task_id}
        if task_input is not None:
            body["taskInput"] = task_input
        resp = httpx.post(
            f"{self.conductor.url}/workflow/{workflow_id}/rerun", json=body, timeout=30
        )
        assert resp.status_code < 300, resp.text

    def ledger_workflows(self) -> set[str]:
        """The workflow ids the execution ledger holds entries for (none: never written)."""
        with contextlib.suppress(NotFound):
            keys = self.lakefs.list_keys(self.repo, LEDGER_BRANCH, LEDGER_PREFIX)
            return {urllib.parse.unquote(k[len(LEDGER_PREFIX) :].split("/", 1)[0]) for k in keys}
        return set()

    def retry(self, workflow_id: str) -> None:
        """`POST /workflow/{id}/retry`: retry the last failed, timed-out or cancelled task."""
        resp = httpx.post(f"{self.conductor.url}/workflow/{workflow_id}/retry", timeout=30)
        assert resp.status_code < 300, resp.text

    def gc(self, *, ledger_older_than: float = 30 * 86400) -> Any:
        """gc as the shipped schedule runs it, with zero thresholds but the ledger's."""
        return collect(
            self.scratch,
            self.lakefs,
            self.conductor,
            [self.repo],
            older_than=0,
            intent_older_than=0,
            ledger_older_than=ledger_older_than,
        )

    def gc_clean(self) -> None:
        """gc with zero thresholds leaves nothing of this test's finished workflows: no attempt
        folder, staging or intent branch at once; their ledger entries outlive the intents
        (a retry by hand still needs them) and go once past the ledger's own window."""
        for proc in self.workers:
            proc.stop()
        recorded = self.sweeper.workflows & self.ledger_workflows()
        self.gc()
        assert [
            p for p in self.scratch.iterdir() if p.is_dir() and not p.name.startswith(".")
        ] == []
        assert list(self.lakefs.list_branches(self.repo, fences.STAGING_PREFIX)) == []
        assert list(self.lakefs.list_branches(self.repo, fences.INTENT_PREFIX)) == []
        assert self.ledger_workflows() >= recorded  # kept: younger than the ledger's window
        self.gc(ledger_older_than=0)
        assert self.ledger_workflows() & self.sweeper.workflows == set()


def drifting_workflow(conductor: Conductor, task_type: str, param_keys: list[str]) -> str:
    """A one-task workflow whose `params.nonce` is the id of the task being scheduled."""
    params: dict[str, Any] = {k: f"${{workflow.input.params.{k}}}" for k in param_keys}
    params["nonce"] = "${CPEWF_TASK_ID}"
    return one_task_workflow(
        conductor,
        task_type,
        [],
        input_parameters={"workspace": "${workflow.input.workspace}", "params": params},
        name=f"wf_drift_{task_type}_{'_'.join(param_keys)}",
    )


@pytest.fixture(scope="module")
def fault_defs(conductor: Conductor) -> None:
    os.environ["PERAGO_TEST_SUFFIX"] = S
    import fault_app

    importlib.reload(fault_app)
    register_app(conductor, fault_app.app, retries=3)


@pytest.fixture
def harness(
    endpoints: Endpoints,
    lakefs: LakeFS,
    conductor: Conductor,
    repo: str,
    fault_defs: None,
    tmp_path: Path,
) -> Iterator[Harness]:
    base = (
        seed(
            lakefs,
            repo,
            {f"f/in/{i:03d}.txt": b"input" * 200 for i in range(20)},
            tmp_path,
            branch="main",
        )
        if not keys_at(lakefs, repo, "main", "f/in/")
        else lakefs.branch_head(repo, "main")
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    h = Harness(endpoints, lakefs, conductor, repo, scratch, tmp_path, base, Sweeper(conductor))
    yield h
    h.sweeper.stop()
    for proc in h.workers:
        if proc.proc.poll() is None:
            proc.kill()
