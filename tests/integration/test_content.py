"""Real servers: a task publishes exactly the bytes its handler changed, and the object cache
never serves an attempt anything but the committed bytes of the ref it asked for.

Each test reproduces a defect found on real servers: a rewrite with the same bytes was
staged (and lakeFS answered the commit "no changes"); a same-size in-place edit that kept
the mtime was invisible, and was then filed in the cache under the original object, so the
next attempt was served the edited bytes; and in the former `link` cache mode a warm cache
hard-linked its entry into the workspace, so an in-place edit of a file served from the cache
changed the entry itself, and every later attempt on that commit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel

from perago_testing import (
    InProcessWorker,
    make_settings,
    read,
    seed,
    suffix,
    task_of,
    workspace,
)
from perago_worker import TaskContext, TerminalError, Worker, WorkspaceSpec
from perago_worker.attempt import Deps
from perago_worker.cache import ObjectCache
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app
from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS
from perago_worker.runner import Lifecycle, Runner

S = suffix()
STAT_TASK = f"content_{S}"
HASH_TASK = f"content_hash_{S}"
FILES = {
    "data/a.txt": b"alpha alpha alpha\n",
    "data/b.txt": b"bravo bravo bravo\n",
    "data/c.bin": bytes(range(256)) * 64,
}


class ContentOp(BaseModel):
    op: Literal["rewrite_same", "edit_keep_mtime", "write"]
    path: str
    content: str = ""


class ContentParams(BaseModel):
    ops: list[ContentOp] = []
    fail_after: bool = False


class ContentResult(BaseModel):
    seen: dict[str, str]  # SHA-256 of every file as the handler found it


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_handler(ctx: TaskContext, params: ContentParams) -> ContentResult:
    root = ctx.workspace.root
    seen = {
        p.relative_to(root).as_posix(): sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    for op in params.ops:
        path = root / op.path
        if op.op == "rewrite_same":
            path.write_bytes(path.read_bytes())
        elif op.op == "edit_keep_mtime":
            before = path.stat()
            with path.open("r+b") as fh:  # same size, same inode, then the old mtime back
                fh.write(op.content.encode())
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        elif op.op == "write":
            path.write_text(op.content)
    if params.fail_after:
        raise TerminalError("failing on purpose after touching the workspace")
    return ContentResult(seen=seen)


def build_app() -> Worker:
    app = Worker()
    app.task(STAT_TASK, workspace=WorkspaceSpec())(content_handler)
    app.task(HASH_TASK, workspace=WorkspaceSpec(verify="hash"))(content_handler)
    return app


@pytest.fixture(scope="module")
def worker(
    endpoints: Endpoints,
    lakefs: LakeFS,
    conductor: Conductor,
    repo: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InProcessWorker]:
    """An in-process worker with the object cache on, as a deployment runs it."""
    settings = make_settings(
        endpoints,
        tmp_path_factory.mktemp("scratch"),
        allowed_repositories=[repo],
        cache_max_bytes=64 << 20,
    )
    cache = ObjectCache(settings.scratch_root / ".cache", settings.cache_max_bytes)
    app = build_app()
    register_app(conductor, app, retries=0)
    runner = Runner(app, Deps(settings, lakefs, conductor, cache), Lifecycle())
    runner.lifecycle.preflight_ok = True
    runner.start()
    yield InProcessWorker(runner, settings, conductor, app)
    runner.drain()


def base(lakefs: LakeFS, repo: str, tmp_path: Path) -> tuple[str, str]:
    """A branch holding FILES at a fresh commit (its own objects: a cold cache for them)."""
    branch = f"b-{suffix()}"
    lakefs.create_branch(repo, branch, "main", hidden=False)
    tagged = {key: data + suffix().encode() for key, data in FILES.items()}
    return branch, seed(lakefs, repo, tagged, tmp_path, branch=branch)


def metric(name: str, task_type: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"task_type": task_type, **labels}) or 0.0


def run_task(
    worker: InProcessWorker, task_type: str, repo: str, ref: str, branch: str, **params: Any
) -> Any:
    return worker.run(task_type, {"workspace": workspace(repo, ref, branch), "params": params})


def ok(run: Any) -> dict[str, Any]:
    assert run.status == "COMPLETED", task_of(run).reason_for_incompletion
    output: dict[str, Any] = task_of(run).output_data
    return output


def test_rewriting_files_with_their_own_bytes_uploads_nothing_and_returns_the_input_ref(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch, ref = base(lakefs, repo, tmp_path)
    uploads_before = metric("perago_files_total", STAT_TASK, direction="up")

    output = ok(
        run_task(
            worker,
            STAT_TASK,
            repo,
            ref,
            branch,
            ops=[
                {"op": "rewrite_same", "path": "data/a.txt"},
                {"op": "rewrite_same", "path": "data/c.bin"},
            ],
        )
    )

    assert output["workspace"]["ref"] == ref
    assert lakefs.branch_head(repo, branch) == ref
    assert metric("perago_files_total", STAT_TASK, direction="up") == uploads_before


def test_a_same_size_edit_that_restores_the_mtime_is_published(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch, ref = base(lakefs, repo, tmp_path)
    original = read(lakefs, repo, ref, "data/a.txt", tmp_path)

    output = ok(
        run_task(
            worker,
            STAT_TASK,
            repo,
            ref,
            branch,
            ops=[{"op": "edit_keep_mtime", "path": "data/a.txt", "content": "ALPHA"}],
        )
    )

    new_ref = output["workspace"]["ref"]
    assert new_ref != ref and lakefs.branch_head(repo, branch) == new_ref
    assert read(lakefs, repo, new_ref, "data/a.txt", tmp_path) == b"ALPHA" + original[5:]
    assert lakefs.changed_paths(repo, ref, new_ref, limit=10) == ["data/a.txt"]


def test_a_verify_hash_task_publishes_exactly_the_files_whose_bytes_changed(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch, ref = base(lakefs, repo, tmp_path)

    output = ok(
        run_task(
            worker,
            HASH_TASK,
            repo,
            ref,
            branch,
            ops=[
                {"op": "rewrite_same", "path": "data/a.txt"},
                {"op": "edit_keep_mtime", "path": "data/b.txt", "content": "BRAVO"},
            ],
        )
    )

    assert lakefs.changed_paths(repo, ref, output["workspace"]["ref"], limit=10) == ["data/b.txt"]


def test_after_a_failed_attempt_edited_its_input_in_place_the_next_gets_the_committed_bytes(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch, ref = base(lakefs, repo, tmp_path)
    committed = {key: sha(read(lakefs, repo, ref, key, tmp_path)) for key in FILES}
    failed = run_task(
        worker,
        STAT_TASK,
        repo,
        ref,
        branch,
        ops=[{"op": "edit_keep_mtime", "path": "data/a.txt", "content": "EDITED"}],
        fail_after=True,
    )
    assert task_of(failed).status == "FAILED_WITH_TERMINAL_ERROR"
    hits_before = metric("perago_cache_hits_total", STAT_TASK)

    output = ok(run_task(worker, STAT_TASK, repo, ref, branch))

    assert output["result"]["seen"] == committed
    # The untouched files of the failed attempt were cached and served; the edited one not.
    assert metric("perago_cache_hits_total", STAT_TASK) - hits_before == len(FILES) - 1


def test_after_a_published_in_place_edit_each_ref_materializes_its_own_bytes(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch, ref = base(lakefs, repo, tmp_path)
    edited = ok(
        run_task(
            worker,
            STAT_TASK,
            repo,
            ref,
            branch,
            ops=[{"op": "edit_keep_mtime", "path": "data/c.bin", "content": "EDIT"}],
        )
    )["workspace"]["ref"]

    for input_ref in (ref, edited, ref):
        committed = {key: sha(read(lakefs, repo, input_ref, key, tmp_path)) for key in FILES}
        seen = ok(run_task(worker, STAT_TASK, repo, input_ref, branch))["result"]["seen"]
        assert seen == committed, input_ref
    assert committed["data/c.bin"] != sha(read(lakefs, repo, edited, "data/c.bin", tmp_path))


def test_an_in_place_edit_of_a_file_served_from_a_warm_cache_never_reaches_the_next_attempt(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    branch, ref = base(lakefs, repo, tmp_path)
    committed = {key: sha(read(lakefs, repo, ref, key, tmp_path)) for key in FILES}
    ok(run_task(worker, STAT_TASK, repo, ref, branch))  # warms the cache with every file
    hits_before = metric("perago_cache_hits_total", STAT_TASK)

    failed = run_task(
        worker,
        STAT_TASK,
        repo,
        ref,
        branch,
        ops=[{"op": "edit_keep_mtime", "path": "data/a.txt", "content": "EDITED"}],
        fail_after=True,
    )

    assert task_of(failed).status == "FAILED_WITH_TERMINAL_ERROR"
    # The edited attempt was served every file from the cache, the edited one included.
    assert metric("perago_cache_hits_total", STAT_TASK) - hits_before == len(FILES)
    assert lakefs.branch_head(repo, branch) == ref  # nothing was published
    hash_hits_before = metric("perago_cache_hits_total", HASH_TASK)

    output = ok(run_task(worker, HASH_TASK, repo, ref, branch))

    assert output["result"]["seen"] == committed
    # Served from the cache again, every file: the edit never reached an entry.
    assert metric("perago_cache_hits_total", HASH_TASK) - hash_hits_before == len(FILES)
