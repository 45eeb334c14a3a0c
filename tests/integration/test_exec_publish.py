"""`perago-worker exec --publish`: one task, once, published through the same fences as a task.

Every test counts *every* commit the target branch gained above its base, not only the one
it expects, and reads the published bytes back from lakeFS.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from perago_testing import cli_env, keys_at, new_repository, read, run_cli, seed
from perago_worker import fences
from perago_worker.devstack.servers import Endpoints
from perago_worker.gc import collect
from perago_worker.lakefs import LakeFS

HERE = Path(__file__).parent
EXECUTION_ID = re.compile(r"execution (manual-\d{13}-[0-9a-f]+)")


def cli(
    endpoints: Endpoints, tmp: Path, *args: str, faults: str = ""
) -> subprocess.CompletedProcess[str]:
    env = cli_env(
        endpoints,
        PYTHONPATH=str(HERE),
        PERAGO_SCRATCH_ROOT=str(tmp / "scratch"),
        PERAGO_FAULT_POINTS=faults,
    )
    return run_cli(env, "exec", "exec_app:app", *args, timeout=120)


def publish(
    endpoints: Endpoints, tmp: Path, repo: str, params: dict[str, Any], *extra: str, **kw: str
) -> subprocess.CompletedProcess[str]:
    args = ["exec_note", "--repository", repo, "--branch", "main", "--publish"]
    return cli(endpoints, tmp, *args, "--params", json.dumps(params), *extra, **kw)


def above(lakefs: LakeFS, repo: str, base: str) -> list[Any]:
    """Every commit on main's first-parent line above `base`, newest first."""
    found = []
    for commit in lakefs.walk_log(repo, "main"):
        if commit.id == base:
            return found
        found.append(commit)
    raise AssertionError(f"base {base} is not on main")


def execution_id_of(result: subprocess.CompletedProcess[str]) -> str:
    match = EXECUTION_ID.search(result.stderr)
    assert match, result.stderr[-2000:]
    return match.group(1)


@pytest.fixture
def repo(lakefs: LakeFS, tmp_path: Path) -> tuple[str, str]:
    name = new_repository(lakefs, "exec-publish")
    return name, seed(lakefs, name, {"notes/seed.txt": b"seed"}, tmp_path)


def test_exec_publish_merges_once_with_manual_provenance_and_prints_the_merge(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    result = publish(endpoints, tmp_path, name, {"name": "a", "text": "alpha"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    [merge] = above(lakefs, name, base)
    assert report["status"] == "COMPLETED"
    assert report["result"] == {"path": "notes/a.txt"}
    assert report["output"] == {
        "repository": name,
        "branch": "main",
        "ref_type": "commit",
        "ref": merge.id,
    }
    assert report["changes"] == {
        "added": [{"path": "a.txt", "size": 5}],
        "modified": [],
        "deleted": [],
    }
    assert merge.metadata[fences.META_MANUAL] == "true"
    assert merge.metadata["perago.workflow_id"] == report["execution_id"]
    assert merge.metadata["perago.input_ref"] == base
    assert fences.META_EXECUTION in merge.metadata and "perago.workflow_url" not in merge.metadata
    assert report["merge"]["commit"] == merge.id
    assert report["merge"]["provenance"][fences.META_MANUAL] == "true"
    assert read(lakefs, name, merge.id, "notes/a.txt", tmp_path) == b"alpha"
    assert fences.is_manual(execution_id_of(result))


def test_rerunning_with_the_execution_id_adopts_the_merge_instead_of_merging_again(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    first = publish(endpoints, tmp_path, name, {"name": "b", "text": "beta"})
    execution = json.loads(first.stdout)["execution_id"]
    # Different bytes on purpose: the same execution is the same logical task, whatever
    # its re-run's input says, as a task's retry is.
    again = publish(
        endpoints, tmp_path, name, {"name": "b", "text": "other"}, "--execution-id", execution
    )
    assert again.returncode == 0, again.stderr[-3000:]
    [merge] = above(lakefs, name, base)
    assert json.loads(again.stdout)["output"]["ref"] == merge.id
    assert read(lakefs, name, "main", "notes/b.txt", tmp_path) == b"beta"


def test_rerunning_with_the_execution_id_after_gc_removed_its_intent_and_ledger_merges_once(
    endpoints: Endpoints, lakefs: LakeFS, conductor: Any, repo: tuple[str, str], tmp_path: Path
) -> None:
    # gc removes a manual execution's intent and ledger entries on a timer; a re-run with its
    # id must still find the merge, in the target's history (a manual execution is never
    # taken as fresh).
    name, base = repo
    first = publish(endpoints, tmp_path, name, {"name": "c", "text": "gamma"})
    assert first.returncode == 0, first.stderr[-3000:]
    execution = json.loads(first.stdout)["execution_id"]
    report = collect(
        tmp_path / "scratch", lakefs, conductor, [name], older_than=0, intent_older_than=0
    )
    assert report.intent_branches and report.ledger_entries, report
    again = publish(
        endpoints, tmp_path, name, {"name": "c", "text": "other"}, "--execution-id", execution
    )
    assert again.returncode == 0, again.stderr[-3000:]
    [merge] = above(lakefs, name, base)
    assert json.loads(again.stdout)["output"]["ref"] == merge.id
    assert read(lakefs, name, "main", "notes/c.txt", tmp_path) == b"gamma"


def test_a_run_without_the_execution_id_is_a_new_execution(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    ids = {
        json.loads(publish(endpoints, tmp_path, name, {"name": n}).stdout)["execution_id"]
        for n in ("c1", "c2")
    }
    assert len(ids) == 2
    assert {c.metadata["perago.workflow_id"] for c in above(lakefs, name, base)} == ids


@pytest.mark.parametrize("point", ["stage.committed", "claim.done", "merge.done"])
def test_a_run_killed_at_a_publish_step_is_finished_by_its_rerun_with_one_merge(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path, point: str
) -> None:
    name, base = repo
    killed = publish(endpoints, tmp_path, name, {"name": "k", "text": "kept"}, faults=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    execution = execution_id_of(killed)
    rerun = publish(
        endpoints, tmp_path, name, {"name": "k", "text": "kept"}, "--execution-id", execution
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    [merge] = above(lakefs, name, base)
    assert merge.metadata["perago.workflow_id"] == execution
    assert json.loads(rerun.stdout)["output"]["ref"] == merge.id
    assert read(lakefs, name, "main", "notes/k.txt", tmp_path) == b"kept"


def test_two_runs_of_one_execution_at_once_land_one_merge(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    execution = fences.manual_execution_id(time.time())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(
                lambda text: publish(
                    endpoints,
                    tmp_path / text,
                    name,
                    {"name": "r", "text": text},
                    "--execution-id",
                    execution,
                ),
                ["one", "two"],
            )
        )
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    [merge] = above(lakefs, name, base)
    assert {json.loads(r.stdout)["output"]["ref"] for r in runs} == {merge.id}


def test_a_failing_handler_publishes_nothing_and_says_why(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    result = publish(endpoints, tmp_path, name, {"name": "f", "fail": True})
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert (report["status"], report["kind"]) == ("FAILED", "handler_error")
    assert "refusing on purpose" in report["reason"]
    assert above(lakefs, name, base) == []


def test_a_failed_post_check_publishes_nothing(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    result = publish(endpoints, tmp_path, name, {"name": "p", "leave_tmp": True})
    report = json.loads(result.stdout)
    assert (result.returncode, report["status"], report["kind"]) == (1, "FAILED", "post_check")
    assert "half.tmp" in report["reason"]
    assert above(lakefs, name, base) == []
    assert keys_at(lakefs, name, "main", "notes/") == {"notes/seed.txt"}


def test_a_conflicting_change_on_the_branch_fails_as_a_merge_conflict(
    endpoints: Endpoints, lakefs: LakeFS, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, base = repo
    moved = seed(lakefs, name, {"notes/x.txt": b"theirs"}, tmp_path)
    args = ["exec_note", "--repository", name, "--ref", base, "--branch", "main", "--publish"]
    result = cli(endpoints, tmp_path, *args, "--params", json.dumps({"name": "x", "text": "ours"}))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["kind"] == "merge_conflict" and "notes/x.txt" in report["reason"]
    assert [c.id for c in above(lakefs, name, base)] == [moved]


def test_gc_leaves_nothing_of_a_finished_manual_execution(
    endpoints: Endpoints, lakefs: LakeFS, conductor: Any, repo: tuple[str, str], tmp_path: Path
) -> None:
    name, _ = repo
    killed = publish(endpoints, tmp_path, name, {"name": "g"}, faults="claim.done")
    assert killed.returncode == -9
    assert len(list(lakefs.list_branches(name, fences.INTENT_PREFIX))) == 1
    report = collect(
        tmp_path / "scratch", lakefs, conductor, [name], older_than=0, intent_older_than=0
    )
    assert (len(report.intent_branches), len(report.staging_branches)) == (1, 1)
    assert report.ledger_entries and len(report.attempt_dirs) == 1
    assert not report.unverifiable and not report.kept_live
    assert not list(lakefs.list_branches(name, fences.INTENT_PREFIX))
    assert not list(lakefs.list_branches(name, fences.STAGING_PREFIX))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--branch", "main", "--publish", "--keep"], "--keep inspects a dry run"),
        (["--ref", "0" * 64, "--publish"], "give --branch B with --ref COMMIT"),
        (["--branch", "main", "--execution-id", "manual-1-ab"], "it needs --publish"),
        (
            ["--branch", "main", "--publish", "--execution-id", "wf-123"],
            "is not a manual execution id",
        ),
        (
            ["--branch", "main", "--publish", "--execution-id", "manual-9999999999999-abcdef01"],
            "starts in the future",
        ),
    ],
)
def test_exec_publish_refuses_unusable_options_in_one_line(
    endpoints: Endpoints, repo: tuple[str, str], tmp_path: Path, args: list[str], says: str
) -> None:
    result = cli(endpoints, tmp_path, "exec_note", "--repository", repo[0], *args)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert says in line
