"""Sync and async handlers in one app, on real servers: both publish, both fail, both stop.

An `async def` handler runs on the worker's one event loop with the same context, checks,
results, failure mapping and deadline as a plain `def`; its cancellation is asyncio's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from perago_testing import InProcessWorker, read, seed, suffix, task_of, workspace
from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.checks import Check
from perago_worker.lakefs import LakeFS

S = suffix()


class Copy(BaseModel):
    name: str
    pause: float = 0.0
    fail: str = ""


class Copied(BaseModel):
    kind: str
    bytes: int


def _copy(ctx: TaskContext, params: Copy, kind: str) -> Copied:
    root = ctx.workspace.root
    data = (root / "in" / "source.txt").read_bytes()
    out = root / "out" / kind
    out.mkdir(parents=True, exist_ok=True)
    (out / params.name).write_bytes(data + kind.encode())
    return Copied(kind=kind, bytes=len(data))


def build_app() -> Worker:
    app = Worker()
    ws = WorkspaceSpec(prefix="/mixed")
    post = [Check("require_glob", "out/*/*.txt", 1)]

    @app.task(f"sync_copy_{S}", workspace=ws, post=post)
    def sync_copy(ctx: TaskContext, params: Copy) -> Copied:
        return _copy(ctx, params, "sync")

    @app.task(f"async_copy_{S}", workspace=ws, post=post, timeout=3)
    async def async_copy(ctx: TaskContext, params: Copy) -> Copied:
        await asyncio.sleep(params.pause)
        if params.fail == "value":
            raise ValueError("async handler refused the input")
        if params.fail == "nothing":
            return Copied(kind="async", bytes=0)  # writes nothing: the post check fails
        return _copy(ctx, params, "async")

    return app


@pytest.fixture(scope="module")
def worker(start_worker: Callable[..., InProcessWorker]) -> InProcessWorker:
    return start_worker(build_app(), concurrency=8)


@pytest.fixture(scope="module")
def base(lakefs: LakeFS, repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return seed(lakefs, repo, {"mixed/in/source.txt": b"payload"}, tmp_path_factory.mktemp("s"))


def test_a_sync_and_an_async_handler_of_one_app_both_publish_their_files(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, tmp_path: Path
) -> None:
    for kind in ("sync", "async"):
        task = task_of(
            worker.run(
                f"{kind}_copy_{S}",
                {"workspace": workspace(repo, base), "params": {"name": "a.txt"}},
            )
        )
        assert task.status == "COMPLETED", task.reason_for_incompletion
        assert task.output_data["result"] == {"kind": kind, "bytes": 7}
        ref = task.output_data["workspace"]["ref"]
        got = read(lakefs, repo, ref, f"mixed/out/{kind}/a.txt", tmp_path)
        assert got == b"payload" + kind.encode()
        commit = lakefs.get_commit(repo, ref)
        assert commit.metadata["perago.task_id"] == task.task_id


def test_an_async_handlers_exception_fails_the_task_as_a_handler_error(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    before = lakefs.branch_head(repo, "main")
    task = task_of(
        worker.run(
            f"async_copy_{S}",
            {"workspace": workspace(repo, base), "params": {"name": "b.txt", "fail": "value"}},
        )
    )
    assert task.status == "FAILED"
    assert task.reason_for_incompletion.startswith(
        "handler_error: ValueError: async handler refused the input"
    )
    assert lakefs.branch_head(repo, "main") == before  # nothing merged


def test_an_async_handler_is_held_to_its_post_checks(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    before = lakefs.branch_head(repo, "main")
    task = task_of(
        worker.run(
            f"async_copy_{S}",
            {"workspace": workspace(repo, base), "params": {"name": "c.txt", "fail": "nothing"}},
        )
    )
    assert task.status == "FAILED"
    assert task.reason_for_incompletion.startswith("post_check: output workspace failed")
    assert lakefs.branch_head(repo, "main") == before  # nothing merged


def test_an_async_handler_past_its_deadline_is_cancelled_and_reported_timed_out(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    before = lakefs.branch_head(repo, "main")
    abandoned = worker.runner.health()["abandoned_handler_threads"]  # this process's, so far
    task = task_of(
        worker.run(
            f"async_copy_{S}",
            {"workspace": workspace(repo, base), "params": {"name": "d.txt", "pause": 60}},
        )
    )
    assert task.status == "FAILED"
    assert task.reason_for_incompletion.startswith("timed_out: the attempt passed its deadline")
    assert "coroutine was cancelled" in task.reason_for_incompletion
    assert lakefs.branch_head(repo, "main") == before  # nothing merged
    assert worker.runner.health()["abandoned_handler_threads"] == abandoned  # it ended
