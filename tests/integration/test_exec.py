"""`perago-worker exec`: one task, once, on real lakeFS data, without Conductor."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from perago_testing import cli_env, new_repository, run_cli, seed
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data(lakefs: LakeFS, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    repo = new_repository(lakefs, "exec")
    files = {"x/in.txt": b"one\ntwo\n", "x/old.txt": b"old"}
    return repo, seed(lakefs, repo, files, tmp_path_factory.mktemp("seed"))


def cli(endpoints: Endpoints, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(endpoints, PYTHONPATH=str(HERE), PERAGO_SCRATCH_ROOT=str(tmp / "scratch"))
    return run_cli(env, "exec", "exec_app:app", *args, timeout=120)


def test_exec_on_a_branch_prints_the_result_and_the_change_set_and_publishes_nothing(
    endpoints: Endpoints, lakefs: LakeFS, data: tuple[str, str], tmp_path: Path
) -> None:
    repo, head = data
    result = cli(endpoints, tmp_path, "exec_edit", "--repository", repo, "--branch", "main")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "COMPLETED" and report["result"] == {"lines": 2}
    assert report["input"] == {
        "repository": repo,
        "branch": "main",
        "ref_type": "commit",
        "ref": head,
    }
    assert report["changes"] == {
        "added": [{"path": "out.txt", "size": 8}],
        "modified": [{"path": "in.txt", "size": 8}],
        "deleted": ["old.txt"],
    }
    assert lakefs.branch_head(repo, "main") == head  # nothing published
    assert "workspace" not in report and not any((tmp_path / "scratch" / "exec").iterdir())


def test_exec_keep_leaves_the_workspace_for_inspection(
    endpoints: Endpoints, data: tuple[str, str], tmp_path: Path
) -> None:
    repo, head = data
    result = cli(endpoints, tmp_path, "exec_edit", "--repository", repo, "--ref", head, "--keep")
    report = json.loads(result.stdout)
    kept = Path(report["workspace"])
    assert (kept / "in.txt").read_text() == "ONE\nTWO\n" and (kept / "out.txt").exists()


def test_exec_failures_print_the_kind_and_reason_a_task_would_get(
    endpoints: Endpoints, data: tuple[str, str], tmp_path: Path
) -> None:
    repo, head = data
    args = ["exec_edit", "--repository", repo, "--ref", head, "--params", '{"fail": true}']
    result = cli(endpoints, tmp_path, *args)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["status"], report["kind"]) == ("FAILED", "handler_error")
    assert report["reason"] == "handler_error: ValueError: the input is not what I expected"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--ref", "main"], "is a branch, tag or abbreviation"),
        ([], "give --ref COMMIT or --branch B"),
        (["--branch", "nope"], "branch 'nope' does not exist"),
    ],
)
def test_exec_refuses_an_unusable_input_in_one_line(
    endpoints: Endpoints, data: tuple[str, str], tmp_path: Path, args: list[str], says: str
) -> None:
    result = cli(endpoints, tmp_path, "exec_edit", "--repository", data[0], *args)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert says in line


def test_exec_runs_a_workspace_free_task(endpoints: Endpoints, tmp_path: Path) -> None:
    args = ["exec_hello", "--repository", "unused", "--params", '{"name": "ada"}']
    result = cli(endpoints, tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "COMPLETED", "result": {"text": "hello ada"}}


# -- a worker polling a domain the workflow does not use ------------------------------------


def test_a_worker_polling_a_domain_says_when_its_tasks_wait_without_one(
    endpoints: Endpoints, conductor: Conductor, tmp_path: Path
) -> None:
    import time

    from perago_testing import one_task_workflow
    from perago_worker.app import load_app
    from perago_worker.devstack.demo import register_app
    from perago_worker.devstack.worker_process import start_worker

    register_app(conductor, load_app("exec_app:app"), retries=0)
    name = one_task_workflow(conductor, "exec_hello", ["params"])
    worker = start_worker(
        "exec_app:app",
        endpoints,
        tmp_path / "alice",
        env={
            "PYTHONPATH": str(HERE),
            "PERAGO_ENVIRONMENT": "personal-alice",  # polls domain "alice"
            "PERAGO_QUEUE_DEPTH_EVERY_SECONDS": "1",
        },
        skip_preflight=True,
    )
    workflow_id = conductor.start_workflow(name, {"params": {"name": "bob"}})  # no domain
    try:
        deadline = time.monotonic() + 30
        warned: list[dict[str, object]] = []
        while not warned and time.monotonic() < deadline:
            warned = [e for e in worker.events() if e.get("event") == "queue.undomained"]
            time.sleep(0.2)
        assert warned, "no queue.undomained warning"
        event = warned[0]
        assert (event["task_type"], event["domain"]) == ("exec_hello", "alice")
        assert 'taskToDomain {"exec_hello": "alice"}' in str(event["hint"])
        assert conductor.get_workflow(workflow_id).tasks[0].status == "SCHEDULED"
    finally:
        import httpx

        httpx.delete(
            f"{conductor.url}/workflow/{workflow_id}", params={"reason": "test done"}, timeout=30
        )
        worker.stop()
