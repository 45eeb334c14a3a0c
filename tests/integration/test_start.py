"""`perago-worker ref` and `start`: from a branch name to a finished run, on real servers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from perago_testing import (
    InProcessWorker,
    cli_env,
    keys_at,
    new_repository,
    run_cli,
    seed,
    suffix,
)
from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS

S = suffix()
WORKFLOW = f"wf_start_{S}"


class Note(BaseModel):
    text: str
    fail: bool = False


class Noted(BaseModel):
    chars: int


def build_app() -> Worker:
    app = Worker()

    @app.task(f"note_{S}", workspace=WorkspaceSpec(prefix="/notes"))
    def note(ctx: TaskContext, params: Note) -> Noted:
        if params.fail:
            raise RuntimeError("asked to fail")
        (ctx.workspace.root / "note.txt").write_text(params.text)
        return Noted(chars=len(params.text))

    return app


@pytest.fixture(scope="module")
def served(start_worker: Callable[..., InProcessWorker], conductor: Conductor) -> InProcessWorker:
    worker = start_worker(build_app())
    conductor.register_workflow(
        {
            "name": WORKFLOW,
            "version": 1,
            "schemaVersion": 2,
            "ownerEmail": "tests@localhost",
            "tasks": [
                {
                    "name": f"note_{S}",
                    "taskReferenceName": "note",
                    "type": "SIMPLE",
                    "inputParameters": {
                        "workspace": "${workflow.input.workspace}",
                        "params": "${workflow.input.params}",
                    },
                }
            ],
            "outputParameters": {"workspace": "${note.output.workspace}"},
        }
    )
    return worker


@pytest.fixture(scope="module")
def branch(lakefs: LakeFS, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    repo = new_repository(lakefs, "start")
    head = seed(lakefs, repo, {"notes/README": b"notes"}, tmp_path_factory.mktemp("seed"))
    return repo, "main", head


def cli(endpoints: Endpoints, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(cli_env(endpoints), *args)


def test_ref_prints_the_workspace_object_of_a_branch_head(
    endpoints: Endpoints, branch: tuple[str, str, str]
) -> None:
    repo, name, head = branch
    result = cli(endpoints, "ref", repo, name)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "repository": repo,
        "branch": name,
        "ref_type": "commit",
        "ref": head,
    }


@pytest.mark.parametrize(
    ("repo", "branch_name", "says"),
    [
        ("no-such-repo", "main", "repository 'no-such-repo' does not exist"),
        (None, "no-such-branch", "branch 'no-such-branch' does not exist in repository"),
    ],
)
def test_ref_of_a_missing_repository_or_branch_says_what_to_do_in_one_line(
    endpoints: Endpoints,
    branch: tuple[str, str, str],
    repo: str | None,
    branch_name: str,
    says: str,
) -> None:
    result = cli(endpoints, "ref", repo or branch[0], branch_name)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("perago-worker: error: ") and says in line and "create it" in line


def test_start_wait_runs_the_workflow_and_prints_each_merges_provenance(
    endpoints: Endpoints,
    served: InProcessWorker,
    lakefs: LakeFS,
    branch: tuple[str, str, str],
    tmp_path: Path,
) -> None:
    repo, name, head = branch
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"text": "hello"}))
    args = ["start", WORKFLOW, "--repository", repo, "--branch", name]
    result = cli(endpoints, *args, "--params", f"@{params}", "--wait", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    new_head = lakefs.branch_head(repo, name)
    assert new_head != head and "notes/note.txt" in keys_at(lakefs, repo, new_head)
    out = result.stdout
    assert ": COMPLETED" in out and f'"ref": "{new_head}"' in out
    assert f"merge by note: {new_head}" in out
    assert f"  perago.input_ref: {head}" in out and f"  perago.task_type: note_{S}" in out


def test_start_without_wait_prints_the_workflow_id_and_a_failed_run_exits_1(
    endpoints: Endpoints,
    served: InProcessWorker,
    conductor: Conductor,
    branch: tuple[str, str, str],
) -> None:
    repo, name, _ = branch
    args = ["start", WORKFLOW, "--repository", repo, "--branch", name]
    started = cli(endpoints, *args, "--params", '{"text": "x"}')
    assert started.returncode == 0, started.stderr
    [workflow_id] = started.stdout.splitlines()  # the id alone: the note is on stderr
    assert conductor.get_workflow(workflow_id).input["workspace"]["repository"] == repo
    failed = cli(endpoints, *args, "--params", '{"text": "x", "fail": true}', "--wait")
    assert failed.returncode == 1
    assert "note: FAILED: handler_error: RuntimeError: asked to fail" in failed.stdout


def test_start_of_an_unknown_workflow_names_it(
    endpoints: Endpoints, branch: tuple[str, str, str]
) -> None:
    result = cli(endpoints, "start", "wf_nobody", "--repository", branch[0], "--branch", "main")
    assert result.returncode == 2
    assert "no workflow definition 'wf_nobody'" in result.stderr


def test_start_of_a_workflow_whose_task_type_has_no_definition_says_to_register_it(
    endpoints: Endpoints,
    served: InProcessWorker,
    conductor: Conductor,
    branch: tuple[str, str, str],
) -> None:
    """Conductor accepts such a workflow and would fail its run at that task: refused first."""
    name = f"wf_unregistered_{S}"
    missing = f"never_registered_{S}"
    conductor.register_workflow(
        {
            "name": name,
            "version": 1,
            "schemaVersion": 2,
            "ownerEmail": "tests@localhost",
            "tasks": [
                {"name": f"note_{S}", "taskReferenceName": "a", "type": "SIMPLE"},
                {
                    "name": "fork",
                    "taskReferenceName": "fork",
                    "type": "FORK_JOIN",
                    "forkTasks": [[{"name": missing, "taskReferenceName": "b", "type": "SIMPLE"}]],
                },
                {"name": "join", "taskReferenceName": "join", "type": "JOIN", "joinOn": ["b"]},
            ],
        }
    )
    runs_before = conductor.workflows.get_running_workflow(name, version=1)
    result = cli(endpoints, "start", name, "--repository", branch[0], "--branch", "main")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"uses task type(s) {missing} with no task definition" in line
    assert "perago-worker register" in line and f"note_{S}" not in line  # it is registered
    assert conductor.workflows.get_running_workflow(name, version=1) == runs_before == []


def test_the_handlers_guide_quotes_starts_wait_timeout() -> None:
    from perago_worker.cli import build_parser

    guide = (Path(__file__).parents[2] / "docs" / "handlers.md").read_text()
    start = build_parser().parse_args(["start", "w", "--repository", "r", "--branch", "b"])
    assert f"bounded by `--timeout`, {start.timeout:.0f} s" in guide
