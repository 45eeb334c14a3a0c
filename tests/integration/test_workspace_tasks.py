"""Workspace tasks end to end on the real servers: the contract, the pipeline, every failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from handlers import build_app

from perago_testing import (
    InProcessWorker,
    keys_at,
    new_repository,
    read,
    seed,
    suffix,
    task_of,
    workspace,
)
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import wait_for_workflow
from perago_worker.devstack.demo_app import WORKFLOW
from perago_worker.devstack.demo_app import app as demo_app
from perago_worker.lakefs import LakeFS

S = suffix()


@pytest.fixture(scope="module")
def other_repo(lakefs: LakeFS) -> str:
    return new_repository(lakefs, "other")


@pytest.fixture(scope="module")
def worker(start_worker: Any, repo: str, other_repo: str) -> InProcessWorker:
    return start_worker(build_app(S), allowed_repositories=[repo, other_repo, "demo-chain"])


@pytest.fixture(scope="module")
def base(lakefs: LakeFS, repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    files = {
        "in/data.txt": b"hello\n",
        "audio/render/stems/drums.wav": b"drums",
        "audio/render/stems/bass.wav": b"bass",
        "audio/other/keep.txt": b"outside the prefix",
        "docs/readme.md": b"# readme\n",
    }
    return seed(lakefs, repo, files, tmp_path_factory.mktemp("seed"))


def ops(*items: dict[str, str]) -> dict[str, Any]:
    return {"ops": list(items)}


def head(lakefs: LakeFS, repo: str, branch: str = "main") -> str:
    return lakefs.branch_head(repo, branch)


def new_branch(lakefs: LakeFS, repo: str, source: str) -> str:
    name = f"b-{suffix()}"
    lakefs.create_branch(repo, name, source, hidden=False)
    return name


def assert_failed(run: Any, status: str, *fragments: str) -> str:
    task = task_of(run)
    assert run.status == "FAILED"
    assert task.status == status, task.reason_for_incompletion
    reason = task.reason_for_incompletion or ""
    for fragment in fragments:
        assert fragment in reason, reason
    assert len(reason) <= 1000
    return reason


# -- success paths -------------------------------------------------------------------------


def test_demo_workflow_chains_three_tasks_through_output_workspace(
    start_worker: Any, lakefs: LakeFS, conductor: Conductor, tmp_path: Path
) -> None:
    repo = new_repository(lakefs, "demo-chain")  # fresh: a reused stack keeps old ones
    ref = seed(lakefs, repo, {"README": b"x"}, tmp_path)
    start_worker(demo_app)
    conductor.register_workflow(WORKFLOW)
    run = wait_for_workflow(
        conductor,
        conductor.start_workflow(WORKFLOW["name"], {"workspace": workspace(repo, ref), "rows": 50}),
    )

    assert run.status == "COMPLETED"
    out = run.output
    assert out["summary"]["total"] == 50
    assert sum(out["counts"].values()) == 50
    final = out["workspace"]["ref"]
    assert out["workspace"] == workspace(repo, final)
    assert lakefs.branch_head(repo, "main") == final
    commit = lakefs.get_commit(repo, final)
    assert commit.metadata["perago.task_type"] == "demo_transform"
    assert commit.metadata["perago.workflow_id"] == run.workflow_id
    assert {"data/raw/events.jsonl", "data/curated/by_kind.json"} <= keys_at(lakefs, repo, final)
    ingest, transform = (t for t in run.tasks if t.reference_task_name in ("ingest", "transform"))
    assert transform.input_data["workspace"] == ingest.output_data["workspace"]


def test_new_file_is_merged_and_output_is_next_input_shape(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "out/new.txt", "content": "fresh"}),
        },
    )
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion
    output = task_of(run).output_data
    assert set(output) == {"workspace", "result"}
    new_ref = output["workspace"]["ref"]
    assert output["workspace"] == workspace(repo, new_ref, branch)
    assert new_ref != base and head(lakefs, repo, branch) == new_ref
    assert read(lakefs, repo, new_ref, "out/new.txt", tmp_path) == b"fresh"
    assert "out/new.txt" in output["result"]["files"]
    meta = lakefs.get_commit(repo, new_ref).metadata
    for key in (
        "workflow_id",
        "task_id",
        "task_type",
        "reference_name",
        "retry_count",
        "worker_id",
        "input_ref",
        "version",
    ):
        assert meta[f"perago.{key}"], key
    assert meta["perago.input_ref"] == base
    assert meta["perago.task_id"] == task_of(run).task_id


def test_prefix_maps_keys_to_the_workspace_root_and_back(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_prefix_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "mix.wav", "content": "mixed"}),
        },
    )
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion
    result = task_of(run).output_data["result"]
    assert result["files"] == ["mix.wav", "stems/bass.wav", "stems/drums.wav"]
    new_ref = task_of(run).output_data["workspace"]["ref"]
    assert read(lakefs, repo, new_ref, "audio/render/mix.wav", tmp_path) == b"mixed"
    assert "mix.wav" not in keys_at(lakefs, repo, new_ref)  # nothing landed at the repo root
    assert read(lakefs, repo, new_ref, "audio/other/keep.txt", tmp_path) == b"outside the prefix"


def test_deletions_and_modifications_propagate(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops(
                {"op": "delete", "path": "docs/readme.md"},
                {"op": "append", "path": "in/data.txt", "content": "world\n"},
            ),
        },
    )
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion
    new_ref = task_of(run).output_data["workspace"]["ref"]
    keys = keys_at(lakefs, repo, new_ref)
    assert "docs/readme.md" not in keys
    assert read(lakefs, repo, new_ref, "in/data.txt", tmp_path) == b"hello\nworld\n"
    assert read(lakefs, repo, new_ref, "audio/render/stems/bass.wav", tmp_path) == b"bass"


def test_no_change_task_returns_the_input_ref_without_a_commit(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(f"ops_{S}", {"workspace": workspace(repo, base, branch), "params": ops()})
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion
    assert task_of(run).output_data["workspace"]["ref"] == base
    assert head(lakefs, repo, branch) == base


def test_workspace_free_task_outputs_only_its_result_and_has_no_workspace(
    worker: InProcessWorker,
) -> None:
    run = worker.run(f"free_{S}", {"params": {"message": "hi"}})
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion
    output = task_of(run).output_data
    assert set(output) == {"result"}
    assert output["result"]["echo"] == "hi"
    assert output["result"]["had_workspace"] is False
    assert "workspace-free" in output["result"]["error"]


def test_checks_pass_when_the_workspace_satisfies_them(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"checked_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "out/result.txt", "content": "ok"}),
        },
    )
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion


# -- bad input: terminal, nothing published ------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "fragments"),
    [
        ({"extra": 1}, ("invalid_input", "workspace.extra", "Extra inputs")),
        ({"ref_type": "branch"}, ("invalid_input", "workspace.ref_type")),
        ({"repository": "Bad_Name"}, ("invalid_input", "workspace.repository")),
    ],
    ids=["unknown-key", "ref-type-not-commit", "bad-repository-name"],
)
def test_malformed_workspace_is_a_terminal_failure_naming_the_field(
    worker: InProcessWorker, repo: str, base: str, patch: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    ws = {**workspace(repo, base), **patch}
    run = worker.run(f"ops_{S}", {"workspace": ws, "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", *fragments)


def test_unknown_top_level_key_is_rejected(worker: InProcessWorker, repo: str, base: str) -> None:
    run = worker.run(f"ops_{S}", {"workspace": workspace(repo, base), "params": {}, "prefix": "/x"})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "invalid_input", "prefix")


def test_branch_name_as_ref_is_rejected_as_mutable(
    worker: InProcessWorker, repo: str, base: str
) -> None:
    run = worker.run(f"ops_{S}", {"workspace": workspace(repo, "main"), "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "workspace.ref", "'main'", "immutable")


def test_unknown_commit_is_terminal(worker: InProcessWorker, repo: str) -> None:
    run = worker.run(f"ops_{S}", {"workspace": workspace(repo, "0" * 64), "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "unknown_ref", "0" * 12)


def test_unknown_repository_is_terminal(
    worker: InProcessWorker, other_repo: str, base: str
) -> None:
    run = worker.run(f"ops_{S}", {"workspace": workspace(other_repo, base), "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "unknown_ref")


def test_repository_outside_the_target_roots_is_terminal(
    worker: InProcessWorker, base: str
) -> None:
    run = worker.run(f"ops_{S}", {"workspace": workspace("not-allowed-repo", base), "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "forbidden_repository", "not-allowed-repo")


def test_bad_params_are_terminal_and_name_the_field(
    worker: InProcessWorker, repo: str, base: str
) -> None:
    run = worker.run(
        f"ops_{S}", {"workspace": workspace(repo, base), "params": {"ops": [{"op": "fly"}]}}
    )
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "bad_params", "params.ops.0.op")


def test_workspace_given_to_a_workspace_free_task_is_rejected(
    worker: InProcessWorker, repo: str, base: str
) -> None:
    run = worker.run(f"free_{S}", {"workspace": workspace(repo, base), "params": {"message": "x"}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "invalid_input", "workspace-free")


def test_missing_workspace_for_a_workspace_task_is_rejected(worker: InProcessWorker) -> None:
    run = worker.run(f"ops_{S}", {"params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "invalid_input", "workspace")


# -- checks, handler failures, results ------------------------------------------------------


def test_pre_check_failure_is_terminal(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch = new_branch(lakefs, repo, "main")
    lakefs.delete_objects(repo, branch, sorted(keys_at(lakefs, repo, branch, "in/")))
    ref = seed(lakefs, repo, {"elsewhere/x.txt": b"x"}, tmp_path, branch)  # no in/ folder
    run = worker.run(f"checked_{S}", {"workspace": workspace(repo, ref, branch), "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "pre_check", "require_dir('in')")
    assert head(lakefs, repo, branch) == ref


@pytest.mark.parametrize(
    ("writes", "fragment"),
    [
        ([], "require_file('out/result.txt')"),
        (
            [
                {"op": "write", "path": "out/result.txt", "content": "ok"},
                {"op": "write", "path": "out/left.tmp", "content": "junk"},
            ],
            "forbid_glob('**/*.tmp')",
        ),
        ([{"op": "write", "path": "out/result.bin", "content": "ok"}], "require_glob('out/*.txt')"),
    ],
    ids=["require_file", "forbid_glob", "require_glob"],
)
def test_post_check_failure_is_retryable_and_publishes_nothing(
    worker: InProcessWorker,
    lakefs: LakeFS,
    repo: str,
    base: str,
    writes: list[dict[str, str]],
    fragment: str,
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"checked_{S}", {"workspace": workspace(repo, base, branch), "params": ops(*writes)}
    )
    assert_failed(run, "FAILED", "post_check", fragment)
    assert head(lakefs, repo, branch) == base


def test_handler_exception_is_retryable(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops(
                {"op": "write", "path": "half.txt", "content": "half"},
                {"op": "raise", "content": "disk on fire"},
            ),
        },
    )
    assert_failed(run, "FAILED", "handler_error", "ValueError", "disk on fire")
    assert head(lakefs, repo, branch) == base
    assert "half.txt" not in keys_at(lakefs, repo, branch)


def test_terminal_error_from_handler_is_terminal(
    worker: InProcessWorker, repo: str, base: str
) -> None:
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base),
            "params": ops({"op": "terminal", "content": "row 7 is malformed"}),
        },
    )
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "handler_terminal", "row 7 is malformed")


def test_workspace_free_handler_failures_map_like_workspace_ones(worker: InProcessWorker) -> None:
    assert_failed(
        worker.run(f"free_{S}", {"params": {"message": "x", "fail": "raise"}}),
        "FAILED",
        "handler_error",
        "RuntimeError",
    )
    assert_failed(
        worker.run(f"free_{S}", {"params": {"message": "x", "fail": "terminal"}}),
        "FAILED_WITH_TERMINAL_ERROR",
        "handler_terminal",
        "free task refuses",
    )


def test_result_failing_its_model_is_terminal(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": {
                "ops": [{"op": "write", "path": "r.txt", "content": "r"}],
                "bad_result": True,
            },
        },
    )
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "invalid_result", "result.files")
    assert head(lakefs, repo, branch) == base


def test_merge_conflict_between_two_workflows_is_terminal_and_names_the_path(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    branch = new_branch(lakefs, repo, base)
    first = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "docs/readme.md", "content": "first"}),
        },
    )
    assert first.status == "COMPLETED"
    winner = head(lakefs, repo, branch)
    second = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "docs/readme.md", "content": "second"}),
        },
    )
    assert_failed(second, "FAILED_WITH_TERMINAL_ERROR", "merge_conflict", "docs/readme.md")
    assert head(lakefs, repo, branch) == winner
    assert read(lakefs, repo, winner, "docs/readme.md", tmp_path) == b"first"


def test_symlink_to_a_host_file_is_refused_and_its_content_goes_nowhere(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP-SECRET-HOST-CONTENT")
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops(
                {"op": "write", "path": "fine.txt", "content": "fine"},
                {"op": "symlink", "path": "leak.txt", "target": str(secret)},
            ),
        },
    )
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "unpublishable", "leak.txt", "symbolic link")
    assert head(lakefs, repo, branch) == base
    assert not list(lakefs.list_branches(repo, "perago-stage-"))
    for ref in {base, head(lakefs, repo, branch)}:
        assert "leak.txt" not in keys_at(lakefs, repo, ref)


def test_hard_link_to_a_host_file_is_refused(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    branch = new_branch(lakefs, repo, base)
    host = Path(worker.settings.scratch_root) / "host-file.txt"  # same file system as attempts
    host.write_text("host bytes")
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "hardlink", "path": "linked.txt", "target": str(host)}),
        },
    )
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "unpublishable", "linked.txt", "hard link")
    assert head(lakefs, repo, branch) == base


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        (["a", "a/b"], "which is also a file"),
        (["evil/../../escape.txt"], "'..' segment"),
        (["double//slash.txt"], "empty segment"),
    ],
    ids=["file-and-folder", "dotdot", "empty-segment"],
)
def test_keys_that_cannot_be_mapped_safely_are_terminal_and_named(
    worker: InProcessWorker,
    lakefs: LakeFS,
    repo: str,
    tmp_path: Path,
    keys: list[str],
    fragment: str,
) -> None:
    branch = new_branch(lakefs, repo, "main")
    ref = seed(lakefs, repo, {k: b"x" for k in keys}, tmp_path, branch)
    scratch = Path(worker.settings.scratch_root)
    before = set(scratch.parent.rglob("escape.txt"))
    run = worker.run(f"ops_{S}", {"workspace": workspace(repo, ref, branch), "params": {}})
    assert_failed(run, "FAILED_WITH_TERMINAL_ERROR", "unsafe_key", fragment)
    assert set(scratch.parent.rglob("escape.txt")) == before


def test_attempt_folders_and_staging_branches_are_removed_after_success(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    branch = new_branch(lakefs, repo, base)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "clean.txt", "content": "c"}),
        },
    )
    assert run.status == "COMPLETED"
    scratch = Path(worker.settings.scratch_root)
    assert [p for p in scratch.iterdir() if p.is_dir() and not p.name.startswith(".")] == []
    assert not list(lakefs.list_branches(repo, "perago-stage-"))


def test_keep_failed_workspaces_leaves_the_failed_attempt_folder_for_debugging(
    start_worker: Any, lakefs: LakeFS, repo: str, base: str
) -> None:
    s2 = suffix()
    keeper = start_worker(build_app(s2), allowed_repositories=[repo], keep_failed_workspaces=True)
    branch = new_branch(lakefs, repo, base)
    run = keeper.run(
        f"checked_{s2}",
        {
            "workspace": workspace(repo, base, branch),
            "params": ops({"op": "write", "path": "out/evidence.tmp", "content": "look at me"}),
        },
    )
    assert_failed(run, "FAILED", "post_check")
    scratch = Path(keeper.settings.scratch_root)
    [kept] = [p for p in scratch.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert (kept / "ws" / "out" / "evidence.tmp").read_text() == "look at me"
    assert (kept / "ws" / "in" / "data.txt").read_bytes() == b"hello\n"
    assert not list(lakefs.list_branches(repo, "perago-stage-"))
