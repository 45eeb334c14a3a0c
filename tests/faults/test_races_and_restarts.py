"""Zombies, re-delivery, server restarts and drains, with real processes and servers."""

from __future__ import annotations

import signal
import time

import pytest
from conductor.client.http.models.task_result import TaskResult

from conftest import Harness
from perago_testing import wait_until
from perago_worker.devstack.servers import Stack

pytestmark = pytest.mark.faults


def test_zombie_that_outlives_its_timeout_never_merges_while_the_retry_does(
    harness: Harness,
) -> None:
    zombie_host = harness.worker("zombie", faults="lease.disabled", PERAGO_CONCURRENCY="1")
    case = harness.start("ws", first_attempt_sleep=14)
    first = harness.wait_task(case, lambda t: t.status == "IN_PROGRESS")
    harness.worker("healthy")
    retry = harness.wait_task(case, lambda t: t.retry_count >= 1, timeout=90)
    assert retry.task_id != first.task_id
    # The zombie wakes after the retry published, stages, and is stopped by the attempt fence.
    zombie = harness.wait_event(zombie_host, "attempt.zombie", timeout=60)
    assert zombie["task_id"] == first.task_id
    run = harness.verify(case)
    merge = harness.lakefs.get_commit(harness.repo, run.tasks[-1].output_data["workspace"]["ref"])
    assert merge.metadata["perago.task_id"] == retry.task_id


def test_two_workers_given_the_same_task_id_publish_once(harness: Harness) -> None:
    # One slot: while its attempt sleeps, the first worker cannot poll the task again.
    first_worker = harness.worker("first", PERAGO_CONCURRENCY="1")
    case = harness.start("slow", first_attempt_sleep=20)
    task = harness.wait_task(case, lambda t: t.status == "IN_PROGRESS")
    # The second worker is polling before the task is re-queued: were it still booting when the
    # first attempt stands down, the first worker's freed slot would take the task back itself.
    second = harness.worker("second")
    # An IN_PROGRESS update without extendLease re-queues the same task id at once.
    harness.conductor.update(
        TaskResult(
            workflow_instance_id=case.workflow_id,
            task_id=task.task_id,
            status="IN_PROGRESS",
            callback_after_seconds=0,
        )
    )
    redelivered = harness.wait_task(
        case,
        lambda t: (t.worker_id or "").startswith(second_worker_id(second) + "#"),
        timeout=60,
    )
    assert redelivered.task_id == task.task_id
    # The first attempt's lease check sees another worker holding the task: it stands down.
    assert harness.wait_event(first_worker, "attempt.zombie")["task_id"] == task.task_id
    run = harness.verify(case)
    assert len(run.tasks) == 1  # same task id, no retry: only the live attempt reported
    merge = harness.lakefs.get_commit(harness.repo, run.tasks[0].output_data["workspace"]["ref"])
    assert merge.metadata["perago.worker_id"] == second_worker_id(second)
    # ... by the second delivery itself: the token Conductor holds is the merge's token.
    assert merge.metadata["perago.token"] == redelivered.worker_id


def second_worker_id(proc: object) -> str:
    from perago_worker.devstack.worker_process import WorkerProcess

    assert isinstance(proc, WorkerProcess)
    return f"second-{__import__('os').getpid()}-{proc.port}"


def test_conductor_restart_while_a_task_runs(harness: Harness, stack: Stack) -> None:
    worker = harness.worker("w")
    case = harness.start("slow", first_attempt_sleep=3)
    harness.wait_event(worker, "materialize.done")
    stack.conductor.restart()
    harness.verify(case)


def test_lakefs_restart_mid_upload(harness: Harness, stack: Stack) -> None:
    worker = harness.worker("w")
    case = harness.start("slow", files=400, size=64 * 1024, sleep=1)
    harness.wait_event(worker, "post_check.done")
    stack.lakefs.restart()
    harness.verify(case)


def test_sigterm_during_a_long_handler_drains_it_to_completion(harness: Harness) -> None:
    worker = harness.worker("w")
    case = harness.start("slow", first_attempt_sleep=4)
    harness.wait_task(case, lambda t: t.status == "IN_PROGRESS")
    time.sleep(0.5)
    worker.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert worker.get("/readyz")[0] == 503  # out of the Service before it stops
    assert worker.proc.wait(60) == 0
    run = harness.verify(case)
    assert len(run.tasks) == 1 and run.tasks[0].retry_count == 0


def test_sigterm_during_a_download_drains_it_to_completion(harness: Harness) -> None:
    worker = harness.worker("w", PERAGO_TRANSFER_CONCURRENCY="1")
    case = harness.start("slow")
    harness.wait_event(worker, "attempt.start")
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    run = harness.verify(case)
    assert len(run.tasks) == 1


def test_drain_deadline_aborts_and_reports_failed_for_an_immediate_retry(harness: Harness) -> None:
    worker = harness.worker("w", PERAGO_DRAIN_GRACE_SECONDS="1")
    case = harness.start("slow", first_attempt_sleep=20)
    harness.wait_task(case, lambda t: t.status == "IN_PROGRESS")
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    # Reported FAILED at the deadline, so Conductor schedules the retry at once.
    assert wait_until(lambda: len(harness.conductor.get_workflow(case.workflow_id).tasks) >= 2, 10)
    aborted = harness.conductor.get_workflow(case.workflow_id).tasks[0]
    assert aborted.status == "FAILED"
    assert "aborted" in aborted.reason_for_incompletion
    harness.worker("next")
    run = harness.verify(case)
    assert run.tasks[-1].retry_count == 1
