"""Two Conductors on one PostgreSQL are one Conductor: one queue, one store, one index."""

from __future__ import annotations

import time
from typing import Any

import httpx
from conductor.client.http.models import TaskResult

from perago_testing import one_task_workflow, suffix, wait_until
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import wait_for_workflow
from perago_worker.devstack.servers import CLUSTER_SIZE, Endpoints


def _register_task(url: str, name: str) -> None:
    resp = httpx.post(
        f"{url}/metadata/taskdefs",
        json=[
            {
                "name": name,
                "ownerEmail": "tests@localhost",
                "retryCount": 0,
                "responseTimeoutSeconds": 60,
                "timeoutSeconds": 0,
            }
        ],
        timeout=30,
    )
    assert resp.status_code < 300, resp.text


def _poll_one(conductor: Conductor, task_type: str, worker_id: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = conductor.batch_poll(task_type, worker_id, None, 1, 1000)
        if tasks:
            return tasks[0]
    raise AssertionError(f"nothing to poll for {task_type} via {conductor.url}")


def test_the_stack_runs_two_of_each_server(endpoints: Endpoints) -> None:
    assert endpoints.conductor_persistence == "postgres"
    assert endpoints.blockstore == "s3"
    assert len(set(endpoints.conductor_urls)) == CLUSTER_SIZE == 2
    assert len(set(endpoints.lakefs_urls)) == CLUSTER_SIZE


def test_a_task_scheduled_through_one_conductor_is_polled_through_the_other(
    endpoints: Endpoints,
) -> None:
    a, b = (Conductor(url) for url in endpoints.conductor_urls[:2])
    task_type = f"cluster_queue_{suffix()}"
    _register_task(a.url, task_type)  # metadata written through A ...
    workflow = one_task_workflow(a, task_type, ["n"])
    workflow_id = a.start_workflow(workflow, {"n": 1})  # ... scheduled through A ...

    worker_b = f"cluster-b#{suffix()}"
    task = _poll_one(b, task_type, worker_b)  # ... polled through B: one queue
    assert task.workflow_instance_id == workflow_id
    state = a.task_state(task.task_id)  # A sees B's poll: one execution store
    assert state is not None
    assert (state.status, state.worker_id, state.poll_count) == ("IN_PROGRESS", worker_b, 1)
    # The message left the shared queue: A has nothing more to hand out for it.
    assert a.batch_poll(task_type, "cluster-a#none", None, 1, 1000) == []
    assert a.queue_sizes([task_type], None) == {task_type: 0}

    b.update(
        TaskResult(
            workflow_instance_id=workflow_id,
            task_id=task.task_id,
            worker_id=worker_b,
            status="COMPLETED",
            output_data={"by": "b"},
        )
    )
    run = wait_for_workflow(a, workflow_id, 60)  # completed through B, read through A
    assert run.status == "COMPLETED"
    assert run.tasks[-1].output_data == {"by": "b"}


def test_each_conductor_finds_the_other_s_workflows_in_its_search_index(
    endpoints: Endpoints,
) -> None:
    """`conductor.indexing.type=postgres`: the index is a table both servers write and read
    (with SQLite each server would index into its own file)."""
    a, b = (Conductor(url) for url in endpoints.conductor_urls[:2])
    task_type = f"cluster_index_{suffix()}"
    _register_task(b.url, task_type)
    workflow = one_task_workflow(b, task_type, ["n"])
    workflow_id = b.start_workflow(workflow, {"n": 2})

    def found_by_a() -> bool:
        resp = httpx.get(
            f"{a.url}/workflow/search",
            params={"query": f"workflowType IN ({workflow})", "size": 10},
            timeout=30,
        )
        return resp.status_code == 200 and any(
            r.get("workflowId") == workflow_id for r in resp.json().get("results", [])
        )

    # Indexing is asynchronous (`conductor.postgres.asyncMaxPoolSize` threads).
    assert wait_until(found_by_a, timeout=30), f"{workflow_id} not in A's search"
    httpx.delete(f"{a.url}/workflow/{workflow_id}", params={"reason": "done"}, timeout=30)
