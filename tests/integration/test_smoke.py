"""The servers and both clients work end to end: the ground every other test stands on."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from conductor.client.http.models.task_def import TaskDef
from conductor.client.http.models.task_result import TaskResult

from perago_worker.conductor import Conductor
from perago_worker.lakefs import LakeFS


def test_lakefs_commits_an_uploaded_object(lakefs: LakeFS, repo: str, tmp_path: Path) -> None:
    branch = f"smoke-{uuid.uuid4().hex[:6]}"
    lakefs.create_branch(repo, branch, "main", hidden=False)
    source = tmp_path / "hello.txt"
    source.write_bytes(b"hello lakeFS\n")
    lakefs.upload(repo, branch, "greetings/hello.txt", source)
    commit = lakefs.commit(repo, branch, "smoke", {"who": "smoke-test"})

    assert lakefs.get_commit(repo, commit.id).metadata == {"who": "smoke-test"}
    [page] = list(lakefs.list_objects(repo, commit.id, "greetings/"))
    assert [(o.key, o.size) for o in page] == [("greetings/hello.txt", 13)]
    target = tmp_path / "back.txt"
    lakefs.download(repo, commit.id, "greetings/hello.txt", target, 13)
    assert target.read_bytes() == b"hello lakeFS\n"


def test_conductor_runs_a_one_task_workflow_polled_by_the_sdk_client(conductor: Conductor) -> None:
    suffix = uuid.uuid4().hex[:6]
    task_type, workflow = f"smoke_task_{suffix}", f"smoke_wf_{suffix}"
    conductor.register_task_defs(
        [
            TaskDef(
                name=task_type,
                retry_count=0,
                response_timeout_seconds=30,
                timeout_seconds=60,
                owner_email="smoke@example.com",
            )
        ]
    )
    conductor.register_workflow(
        {
            "name": workflow,
            "version": 1,
            "schemaVersion": 2,
            "ownerEmail": "smoke@example.com",
            "tasks": [
                {
                    "name": task_type,
                    "taskReferenceName": "only",
                    "type": "SIMPLE",
                    "inputParameters": {"n": "${workflow.input.n}"},
                }
            ],
            "outputParameters": {"answer": "${only.output.answer}"},
        }
    )
    workflow_id = conductor.start_workflow(workflow, {"n": 41})

    polled = []
    deadline = time.monotonic() + 30
    while not polled and time.monotonic() < deadline:
        polled = conductor.batch_poll(task_type, "smoke-worker", None, 1, 1000)
    assert len(polled) == 1
    task = polled[0]
    assert task.input_data == {"n": 41}
    conductor.update(
        TaskResult(
            workflow_instance_id=workflow_id,
            task_id=task.task_id,
            status="COMPLETED",
            output_data={"answer": task.input_data["n"] + 1},
        )
    )

    deadline = time.monotonic() + 30
    while True:
        run = conductor.get_workflow(workflow_id)
        if run.status != "RUNNING" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert run.status == "COMPLETED"
    assert run.output == {"answer": 42}
