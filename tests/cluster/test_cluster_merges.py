"""Two workers, each on its own Conductor and its own lakeFS of one cluster, race their
merges into ONE branch: every workflow completes and the branch gains exactly one merge per
task, each carrying its own execution's provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path

from perago_testing import keys_at, one_task_workflow, seed, suffix, workspace
from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app, wait_for_workflow
from perago_worker.devstack.servers import Endpoints
from perago_worker.devstack.worker_process import WorkerProcess, start_worker
from perago_worker.lakefs import LakeFS

HERE = Path(__file__).parent
S = suffix()
TASKS = 8  # four per worker at two attempts in flight each: both hold tasks at once


def _worker(endpoints: Endpoints, index: int, repo: str, workdir: Path) -> WorkerProcess:
    name = f"cluster-worker-{'ab'[index]}"
    return start_worker(
        "cluster_app:app",
        endpoints.instance(index),
        workdir / name,
        name=name,
        env={
            "PYTHONPATH": str(HERE),
            "PERAGO_TEST_SUFFIX": S,
            "PERAGO_ALLOWED_REPOSITORIES": json.dumps([repo]),
            "PERAGO_CONCURRENCY": "2",
        },
    )


def test_two_workers_on_two_conductors_and_two_lakefs_merge_once_per_task(
    endpoints: Endpoints, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    os.environ["PERAGO_TEST_SUFFIX"] = S
    import cluster_app

    conductors = [Conductor(url) for url in endpoints.conductor_urls[:2]]
    register_app(conductors[0], cluster_app.app, retries=3)
    task_type = f"cluster_ws_{S}"
    workflow = one_task_workflow(conductors[0], task_type, ["params", "workspace"])
    base = seed(lakefs, repo, {"c/in/seed.txt": b"seed"}, tmp_path)

    workers = [_worker(endpoints, i, repo, tmp_path) for i in range(2)]
    try:
        started: dict[str, str] = {}  # workflow id -> tag
        for i in range(TASKS):
            tag = f"t{i:02d}"
            # Half the workflows are started through each Conductor.
            workflow_id = conductors[i % 2].start_workflow(
                workflow,
                {"workspace": workspace(repo, base, "main"), "params": {"tag": tag, "sleep": 1.0}},
            )
            started[workflow_id] = tag
        runs = {wid: wait_for_workflow(conductors[0], wid, 240) for wid in started}
    finally:
        for proc in workers:
            proc.stop()
    failed = {
        wid: [(t.status, t.reason_for_incompletion) for t in run.tasks]
        for wid, run in runs.items()
        if run.status != "COMPLETED"
    }
    assert failed == {}, (failed, workers[0].tail(), workers[1].tail())

    # EVERY commit on main's first-parent log above the base: a second merge of a task, a
    # merge without provenance or a stray commit would all count.
    log = lakefs.log(repo, "main", amount=1000)
    above = [c for c in log[: [c.id for c in log].index(base)]]
    assert len(above) == TASKS, [(c.id, c.message, c.metadata) for c in above]
    by_workflow = {c.metadata["perago.workflow_id"]: c for c in above}
    assert set(by_workflow) == set(started)
    assert len({c.metadata[fences.META_EXECUTION] for c in above}) == TASKS
    for workflow_id, commit in by_workflow.items():
        task = runs[workflow_id].tasks[-1]
        assert commit.metadata["perago.task_id"] == task.task_id
        assert commit.metadata["perago.input_ref"] == base
        # The merge's delivery token is the poll's, of the worker that reported the task.
        assert commit.metadata[fences.META_TOKEN].startswith(f"{task.worker_id}#")
        assert commit.metadata["perago.worker_id"] == task.worker_id
        assert commit.metadata[fences.META_STAGED]
        assert task.output_data["workspace"]["ref"] == commit.id
    # Both instances did work: each worker polled its own Conductor from the one queue and
    # merged through its own lakeFS.
    merged_by = {c.metadata["perago.worker_id"].split("-")[2] for c in above}
    assert merged_by == {"a", "b"}, merged_by
    head = lakefs.branch_head(repo, "main")
    assert keys_at(lakefs, repo, head, "c/out/") == {
        f"c/out/{tag}/part.txt" for tag in started.values()
    }
