"""Exactly once per execution, on real servers and real worker processes.

Every case counts *all* commits on the target branch above the commit it started from, so a
second merge is caught whatever metadata it carries. The execution identity under test:
retries and re-deliveries share one execution (whatever Conductor recomputes in their
input), a rerun is a new one; the delivery token fences an attempt superseded by any later
poll; a pre-merge hook's veto fails the task terminally with nothing merged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Harness, S
from perago_testing import keys_at, suffix, task_of, workspace
from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import wait_for_workflow
from perago_worker.devstack.servers import free_port
from perago_worker.execution import LEDGER_BRANCH, LEDGER_PREFIX
from perago_worker.gc import collect

pytestmark = pytest.mark.faults

PREFIX_SPELLINGS = ("f/", "/f", "f", "/f/")


def intents(harness: Harness) -> dict[str, str]:
    return dict(harness.lakefs.list_branches(harness.repo, fences.INTENT_PREFIX))


def completed(harness: Harness, workflow_id: str, timeout: float = 60) -> Any:
    run = wait_for_workflow(harness.conductor, workflow_id, timeout)
    assert run.status == "COMPLETED", [(t.status, t.reason_for_incompletion) for t in run.tasks]
    return run


def expected_executions(harness: Harness, case: Any, root: Any) -> set[str]:
    """The execution key of `root` in the case's slot (the spelling of the prefix aside)."""
    incarnation = fences.Incarnation.of(root)
    return {
        fences.execution_key(
            fences.slot_key(
                case.workflow_id,
                "only",
                case.task_type,
                fences.Target(harness.repo, case.branch, prefix),
            ),
            incarnation,
        )
        for prefix in PREFIX_SPELLINGS
    }


# 1 -----------------------------------------------------------------------------------------


def test_retry_with_drifting_input_after_a_kill_at_merge_done_adopts_the_merge(
    harness: Harness,
) -> None:
    doomed = harness.worker("doomed", faults="merge.done")
    case = harness.start("ws", drift=True, files=2)
    assert doomed.proc.wait(60) == -9, doomed.tail()
    [landed] = harness.commits_since(case.branch, case.input_ref)  # merged, then died
    harness.worker("survivor")
    run = harness.verify(case)
    first, last = run.tasks[0], run.tasks[-1]
    assert len(run.tasks) >= 2 and last.retried_task_id
    # The input really drifted: each scheduling carries its own task id in params.nonce.
    nonces = [t.input_data["params"]["nonce"] for t in run.tasks]
    assert nonces == [t.task_id for t in run.tasks] and len(set(nonces)) == len(nonces)
    # The only merge is the one the killed attempt landed; the retry adopted it.
    merge = harness.lakefs.get_commit(harness.repo, last.output_data["workspace"]["ref"])
    assert merge.id == landed.id
    assert merge.metadata["perago.task_id"] == first.task_id
    # Its key is the root incarnation's, not the retry's.
    assert not first.retried_task_id
    assert merge.metadata[fences.META_EXECUTION] in expected_executions(harness, case, first)
    assert merge.metadata[fences.META_ROOT_TASK] == first.task_id


@pytest.mark.parametrize("ledger", ["kept by gc", "deleted by hand"])
def test_a_retry_by_hand_after_gc_removed_the_intent_returns_the_merge(
    harness: Harness, ledger: str
) -> None:
    # Merged, never reported; the workflow is terminated, and gc (zero thresholds) removes the
    # intent. A person then retries the workflow: the retry must find the merge in the target's
    # history, whether the ledger still knows the execution (gc keeps a workflow's entries
    # while Conductor knows it) or its entries were deleted by hand.
    doomed = harness.worker("doomed", faults="merge.done")
    case = harness.start("ws", drift=True, files=2)
    assert doomed.proc.wait(60) == -9, doomed.tail()
    [landed] = harness.commits_since(case.branch, case.input_ref)
    harness.terminate(case.workflow_id)
    harness.wait_task(case, lambda t: t.status == "CANCELED", timeout=20)
    report = harness.gc()
    assert intents(harness) == {} and report.intent_branches, report
    assert case.workflow_id in harness.ledger_workflows()  # terminal, still known: kept
    if ledger == "deleted by hand":
        keys = [
            k
            for k in harness.lakefs.list_keys(harness.repo, LEDGER_BRANCH, LEDGER_PREFIX)
            if case.workflow_id in k
        ]
        harness.lakefs.delete_objects(harness.repo, LEDGER_BRANCH, keys)
        assert case.workflow_id not in harness.ledger_workflows()
    harness.retry(case.workflow_id)
    survivor = harness.worker("survivor")
    run = harness.verify(case)  # every commit since the input: exactly one
    first, last = run.tasks[0], run.tasks[-1]
    retried = {t.task_id: t.retried_task_id for t in run.tasks}
    chain = [last.task_id]
    while retried.get(chain[-1]):
        chain.append(retried[chain[-1]])
    assert len(chain) >= 2 and chain[-1] == first.task_id, [
        (t.task_id, t.status, t.retried_task_id) for t in run.tasks
    ]
    assert last.output_data["workspace"]["ref"] == landed.id
    assert [e for e in survivor.events() if e.get("event") == "handler.done"] == []


@contextlib.contextmanager
def hanging_server() -> Iterator[str]:
    """A Conductor URL whose server accepts connections and never answers (a hung one)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize("outage", ["down", "hung"])
def test_gc_during_a_conductor_outage_deletes_nothing_a_killed_attempt_left(
    harness: Harness, outage: str
) -> None:
    # A real attempt killed after its claim leaves a staging branch, an intent and its ledger
    # entry; its workflow is terminated. gc with every threshold 0 but Conductor down (a
    # closed port) or hung (answers nothing) deletes none of them, and lists them as
    # unverifiable; with Conductor back, the same gc deletes them all.
    doomed = harness.worker("doomed", faults="claim.done")
    case = harness.start("ws")
    assert doomed.proc.wait(60) == -9, doomed.tail()
    harness.terminate(case.workflow_id)
    harness.wait_task(case, lambda t: t.status == "CANCELED", timeout=20)
    staged = dict(harness.lakefs.list_branches(harness.repo, fences.STAGING_PREFIX))
    claimed = intents(harness)
    assert staged and claimed and case.workflow_id in harness.ledger_workflows()
    with contextlib.ExitStack() as stack:
        if outage == "down":
            url = f"http://127.0.0.1:{free_port()}/api"
        else:
            url = stack.enter_context(hanging_server())
        started = time.monotonic()
        report = collect(
            harness.scratch,
            harness.lakefs,
            Conductor(url, request_timeout=1),
            [harness.repo],
            older_than=0,
            intent_older_than=0,
            ledger_older_than=0,
            conductor_retry_seconds=2,
        )
        elapsed = time.monotonic() - started
    assert report.staging_branches == report.intent_branches == report.ledger_entries == []
    assert dict(harness.lakefs.list_branches(harness.repo, fences.STAGING_PREFIX)) == staged
    assert intents(harness) == claimed
    assert case.workflow_id in harness.ledger_workflows()
    assert len(report.unverifiable) >= 3, report.unverifiable  # staging, intent, ledger group
    assert elapsed < 60, "every Conductor call is bounded"
    harness.verify(case, status="TERMINATED")  # gc with Conductor back leaves nothing


# 2 -----------------------------------------------------------------------------------------


def test_rerun_while_the_old_attempt_lives_in_the_same_worker_merges_once_by_the_new_delivery(
    harness: Harness,
) -> None:
    # Several slots: the worker polls the rerun while the old attempt still sleeps in it.
    worker = harness.worker("w", PERAGO_CONCURRENCY="4")
    case = harness.start("slow", sleep=8)
    first = harness.wait_task(case, lambda t: t.status == "IN_PROGRESS")
    first_token = str(first.worker_id)
    worker_id, sep, nonce = first_token.partition(fences.TOKEN_SEPARATOR)
    assert sep and worker_id and nonce, first_token
    harness.wait_event(worker, "materialize.done")  # the old attempt is in its handler
    harness.terminate(case.workflow_id)
    harness.wait_task(case, lambda t: t.status == "CANCELED", timeout=20)
    harness.rerun(case.workflow_id, first.task_id)
    second = harness.wait_task(
        case, lambda t: t.status == "IN_PROGRESS" and t.worker_id != first_token, timeout=20
    )
    assert second.task_id == first.task_id  # rerun-from-task keeps the task id ...
    assert second.poll_count == first.poll_count  # ... and the poll count: only the token differs
    assert second.worker_id.startswith(worker_id + fences.TOKEN_SEPARATOR)  # same process
    # The old attempt wakes ~1.5 s before the new one: its fence sees the new delivery.
    run = harness.verify(case)
    [merge] = harness.commits_since(case.branch, case.input_ref)
    assert merge.metadata[fences.META_TOKEN] == second.worker_id != first_token
    assert task_of(run).worker_id != first_token  # no report of the old attempt landed
    # Both attempts ran the handler in this one process; only one published.
    events = worker.events()
    handled = [e for e in events if e.get("event") == "handler.done"]
    assert len(handled) == 2, worker.tail()
    merged = [e for e in events if e.get("event") == "merge.done"]
    assert len(merged) == 1, worker.tail()
    stood_down = [
        e
        for e in events
        if e.get("event") in ("attempt.zombie", "fence.rejected") and first_token in str(e.values())
    ]
    assert stood_down, worker.tail(120)


# 3 -----------------------------------------------------------------------------------------


def test_rerun_into_another_branch_runs_the_handler_again_and_merges_there_once(
    harness: Harness,
) -> None:
    harness.worker("w")
    case = harness.start("ws", marker=True)
    run = completed(harness, case.workflow_id)
    [first] = harness.commits_since(case.branch, case.input_ref)
    task = task_of(run)
    assert task.output_data["workspace"]["ref"] == first.id
    other = f"case-{suffix()}"
    harness.lakefs.create_branch(harness.repo, other, case.input_ref, hidden=False)
    harness.rerun(
        case.workflow_id,
        task.task_id,
        {"workspace": workspace(harness.repo, case.input_ref, other), "params": case.params},
    )
    moved = dataclasses.replace(case, branch=other)
    rerun = harness.verify(moved)  # exactly one merge on the new branch
    # The first branch got nothing new.
    assert harness.lakefs.branch_head(harness.repo, case.branch) == first.id
    assert [c.id for c in harness.commits_since(case.branch, case.input_ref)] == [first.id]
    # The handler ran again: a fresh marker, not the first run's staged commit merged again.
    [second] = harness.commits_since(other, case.input_ref)
    tag = case.params["tag"]
    marks_first = keys_at(harness.lakefs, harness.repo, first.id, f"f/marks/{tag}/")
    marks_second = keys_at(harness.lakefs, harness.repo, second.id, f"f/marks/{tag}/")
    assert len(marks_first) == len(marks_second) == 1 and marks_first != marks_second
    assert second.metadata[fences.META_STAGED] != first.metadata[fences.META_STAGED]
    assert second.metadata[fences.META_EXECUTION] != first.metadata[fences.META_EXECUTION]
    assert task_of(rerun).output_data["workspace"]["branch"] == other


# 4 -----------------------------------------------------------------------------------------


def test_rerun_of_a_completed_workflow_merges_anew_and_returns_the_new_ref(
    harness: Harness, tmp_path: Path
) -> None:
    harness.worker("w")
    case = harness.start("ws", marker=True)
    run = completed(harness, case.workflow_id)
    [first] = harness.commits_since(case.branch, case.input_ref)
    task = task_of(run)
    # Someone else commits on the target in between.
    src = tmp_path / "unrelated.txt"
    src.write_text("not ours\n")
    harness.lakefs.upload(harness.repo, case.branch, "unrelated.txt", src)
    unrelated = harness.lakefs.commit(harness.repo, case.branch, "unrelated", {}).id
    harness.rerun(case.workflow_id, task.task_id)  # same input
    rerun = harness.verify(case, since=unrelated)  # one merge above the unrelated commit
    ref = task_of(rerun).output_data["workspace"]["ref"]
    assert ref != first.id
    new = harness.lakefs.get_commit(harness.repo, ref)
    assert new.parents[0] == unrelated
    assert [c.id for c in harness.commits_since(case.branch, case.input_ref)] == [
        ref,
        unrelated,
        first.id,
    ]
    assert new.metadata[fences.META_EXECUTION] != first.metadata[fences.META_EXECUTION]
    # The handler ran twice: both runs' markers are on the branch.
    tag = case.params["tag"]
    assert len(keys_at(harness.lakefs, harness.repo, ref, f"f/marks/{tag}/")) == 2


def test_rerun_from_a_task_that_is_itself_a_retry_is_a_new_execution(harness: Harness) -> None:
    """A rerun keeps the task's `retriedTaskId`: only the ledger tells it from a retry."""
    doomed = harness.worker("doomed", faults="merge.done")
    case = harness.start("ws", marker=True)
    assert doomed.proc.wait(60) == -9, doomed.tail()
    harness.worker("survivor")
    run = completed(harness, case.workflow_id, timeout=120)
    retry = run.tasks[-1]
    # The completing task is a retry of the killed one.
    assert retry.status == "COMPLETED" and retry.retried_task_id
    [first] = harness.commits_since(case.branch, case.input_ref)  # adopted, not merged again
    harness.rerun(case.workflow_id, retry.task_id)  # same input, from the retry itself
    rerun = completed(harness, case.workflow_id, timeout=120)
    ref = rerun.tasks[-1].output_data["workspace"]["ref"]
    commits = harness.commits_since(case.branch, case.input_ref)
    assert [c.id for c in commits] == [ref, first.id]  # exactly one new merge, the rerun's
    new = commits[0]
    assert new.metadata[fences.META_EXECUTION] != first.metadata[fences.META_EXECUTION]
    assert new.metadata[fences.META_ROOT_TASK] == retry.task_id  # a new root: the rerun task
    tag = case.params["tag"]
    assert len(keys_at(harness.lakefs, harness.repo, ref, f"f/marks/{tag}/")) == 2


# 5 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("point", ["fence.passed", "claim.done"])
def test_worker_killed_between_fence_and_merge_leaves_exactly_one_merge(
    harness: Harness, point: str
) -> None:
    before = intents(harness)
    doomed = harness.worker("doomed", faults=point)
    case = harness.start("ws", files=2)
    assert doomed.proc.wait(60) == -9, doomed.tail()
    assert harness.commits_since(case.branch, case.input_ref) == []  # died before the merge
    claimed = set(intents(harness)) - set(before)
    assert len(claimed) == (1 if point == "claim.done" else 0), claimed
    harness.worker("survivor")
    run = harness.verify(case)
    assert len(run.tasks) >= 2


def test_worker_killed_while_adopting_then_a_survivor_merges_exactly_once(
    harness: Harness,
) -> None:
    before = intents(harness)
    first = harness.worker("first", faults="claim.done")
    case = harness.start("ws", files=2)
    assert first.proc.wait(60) == -9, first.tail()
    [(intent, staged)] = [(n, h) for n, h in intents(harness).items() if n not in before]
    adopter = harness.worker("adopter", faults="adopt.merging")
    assert adopter.proc.wait(90) == -9, adopter.tail()
    assert harness.commits_since(case.branch, case.input_ref) == []
    assert intents(harness).get(intent) == staged
    harness.worker("survivor")
    run = harness.verify(case)
    assert len(run.tasks) >= 3
    merge = harness.lakefs.get_commit(harness.repo, run.tasks[-1].output_data["workspace"]["ref"])
    assert merge.metadata[fences.META_STAGED] == staged  # the first attempt's claimed commit


# 6 -----------------------------------------------------------------------------------------

_FORKS: set[str] = set()


def fork_workflow(harness: Harness, task_type: str) -> str:
    name = f"wf_fork_{task_type}"
    if name not in _FORKS:
        harness.conductor.register_workflow(
            {
                "name": name,
                "version": 1,
                "schemaVersion": 2,
                "ownerEmail": "tests@localhost",
                "tasks": [
                    {
                        "name": "fork",
                        "taskReferenceName": "fork",
                        "type": "FORK_JOIN_DYNAMIC",
                        "inputParameters": {
                            "forkTaskName": task_type,
                            "forkTaskInputs": "${workflow.input.inputs}",
                        },
                    },
                    {"name": "join", "taskReferenceName": "join", "type": "JOIN"},
                ],
            }
        )
        _FORKS.add(name)
    return name


def test_dynamic_fork_of_four_workspace_tasks_on_one_branch_merges_each_once(
    harness: Harness,
) -> None:
    harness.worker("w", PERAGO_CONCURRENCY="4")
    task_type = f"fault_ws_{S}"
    branch = f"case-{suffix()}"
    harness.lakefs.create_branch(harness.repo, branch, harness.base, hidden=False)
    tags = [f"{branch}-{i}" for i in range(4)]
    inputs = [
        {"workspace": workspace(harness.repo, harness.base, branch), "params": {"tag": tag}}
        for tag in tags
    ]
    workflow_id = harness.conductor.start_workflow(
        fork_workflow(harness, task_type), {"inputs": inputs}
    )
    harness.sweeper.workflows.add(workflow_id)
    run = completed(harness, workflow_id, timeout=90)
    forked = [t for t in run.tasks if t.reference_task_name.startswith(f"_{task_type}_")]
    done = [t for t in forked if t.status == "COMPLETED"]
    assert len(done) == 4, [(t.reference_task_name, t.status) for t in forked]
    # Conductor added `__index` to each forked task's input; the worker accepted it.
    assert sorted(t.input_data["__index"] for t in done) == [0, 1, 2, 3]
    commits = harness.commits_since(branch, harness.base)
    assert len(commits) == 4, [(c.id, c.metadata) for c in commits]
    assert {c.metadata["perago.workflow_id"] for c in commits} == {workflow_id}
    assert {c.metadata["perago.task_id"] for c in commits} == {t.task_id for t in done}
    assert {t.output_data["workspace"]["ref"] for t in done} == {c.id for c in commits}
    assert len({c.metadata[fences.META_EXECUTION] for c in commits}) == 4
    head = harness.lakefs.branch_head(harness.repo, branch)
    for tag in tags:
        assert len(keys_at(harness.lakefs, harness.repo, head, f"f/out/{tag}/")) == 1, tag
    harness.gc_clean()


# 7 -----------------------------------------------------------------------------------------

REJECT = """\
name: reject
on:
  pre-merge:
    branches:
      - {branch}
hooks:
  - id: no
    type: lua
    properties:
      script: 'error("rejected by policy")'
"""


def test_a_pre_merge_hook_veto_fails_the_task_terminally_and_merges_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    harness.worker("w")
    branch = f"case-{suffix()}"
    harness.lakefs.create_branch(harness.repo, branch, harness.base, hidden=False)
    action = tmp_path / "reject.yaml"
    action.write_text(REJECT.format(branch=branch))
    harness.lakefs.upload(harness.repo, branch, "_lakefs_actions/reject.yaml", action)
    actions = harness.lakefs.commit(harness.repo, branch, "reject every merge", {}).id
    before = intents(harness)
    # Pre-merge hooks come from the merge source: the staged commit inherits the action.
    case = harness.start("ws", branch=branch, ref=actions)
    run = wait_for_workflow(harness.conductor, case.workflow_id, 60)
    assert run.status == "FAILED", [(t.status, t.reason_for_incompletion) for t in run.tasks]
    [task] = run.tasks  # terminal: no retry
    assert task.status == "FAILED_WITH_TERMINAL_ERROR", task.reason_for_incompletion
    assert task.reason_for_incompletion.startswith("merge_rejected"), task.reason_for_incompletion
    assert [c.id for c in harness.commits_since(branch, harness.base)] == [actions]
    assert set(intents(harness)) - set(before) == set()  # the claim was released
    harness.verify(case, status="FAILED")
