"""examples/: the quick start's handlers and workflow, registered and run on real servers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from perago_testing import cli_env, keys_at, new_repository, read, run_cli, seed
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import Endpoints
from perago_worker.devstack.worker_process import WorkerProcess, start_worker
from perago_worker.lakefs import LakeFS

EXAMPLES = Path(__file__).parents[2] / "examples"
WORKFLOW = json.loads((EXAMPLES / "quickstart.workflow.json").read_text())


def cli(endpoints: Endpoints, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(cli_env(endpoints, PYTHONPATH=str(EXAMPLES)), *args, timeout=240)


@pytest.fixture(scope="module")
def worker(
    endpoints: Endpoints, conductor: Conductor, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    registered = cli(endpoints, "register", "quickstart:app")
    assert registered.returncode == 0, registered.stderr
    conductor.register_workflow(WORKFLOW)
    proc = start_worker(
        "quickstart:app",
        endpoints,
        tmp_path_factory.mktemp("quickstart"),
        env={"PYTHONPATH": str(EXAMPLES)},
    )
    yield proc
    proc.stop()


def test_the_quickstart_workflow_ingests_cleans_and_totals_with_one_merge_per_workspace_task(
    endpoints: Endpoints, worker: WorkerProcess, lakefs: LakeFS, tmp_path: Path
) -> None:
    repo = new_repository(lakefs, "quickstart")
    base = seed(lakefs, repo, {"README.md": b"sales data\n"}, tmp_path)
    params = json.dumps({"rows": 9, "min_amount": 12})
    args = ["start", WORKFLOW["name"], "--repository", repo, "--branch", "main"]
    result = cli(endpoints, *args, "--params", params, "--wait", "--timeout", "180")
    assert result.returncode == 0, result.stdout + result.stderr
    head = lakefs.branch_head(repo, "main")
    # Rows 0..8 with amounts 10 + i, rows 2, 5, 8 empty: 13, 14, 16, 17 are >= 12.
    assert '"kept": 4' in result.stdout and '"average": 15.0' in result.stdout
    assert {"sales/raw/sales.csv", "sales/clean/sales.csv"} <= keys_at(lakefs, repo, head)
    cleaned = read(lakefs, repo, head, "sales/clean/sales.csv", tmp_path).decode()
    assert cleaned.splitlines() == ["id,amount", "3,13", "4,14", "6,16", "7,17"]
    merges = [line for line in result.stdout.splitlines() if line.startswith("merge by ")]
    assert [m.split(":")[0] for m in merges] == ["merge by ingest", "merge by clean"]
    history = [c.id for c in lakefs.log(repo, "main", amount=10)]
    assert base in history and history.index(base) == 2  # exactly two merges on top of it
