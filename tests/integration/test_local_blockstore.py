"""The local-blockstore path, whatever the session's blockstore: bodies through lakeFS.

This module starts its own lakeFS on the local blockstore (about 1 s) and an in-process
worker on it, sharing the session's Conductor. With `data_path: auto` the worker streams
bodies through the lakeFS API (the local blockstore cannot presign), and a workspace task
still materializes, publishes and merges once with its provenance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from handlers import build_app

from perago_testing import (
    InProcessWorker,
    keys_at,
    make_settings,
    new_repository,
    read,
    seed,
    suffix,
    task_of,
    workspace,
)
from perago_worker.attempt import Deps
from perago_worker.conductor import Conductor
from perago_worker.devstack import tools
from perago_worker.devstack.demo import register_app
from perago_worker.devstack.servers import (
    DEV_ACCESS_KEY_ID,
    DEV_SECRET_ACCESS_KEY,
    Endpoints,
    free_port,
    lakefs_server,
)
from perago_worker.lakefs import LakeFS
from perago_worker.lakefs.api import ApiTransfers
from perago_worker.runner import Lifecycle, Runner

S = suffix()


@pytest.fixture(scope="module")
def local_lakefs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LakeFS]:
    """A lakeFS of this module's own on its local blockstore; the client is `auto`."""
    port = free_port()
    server = lakefs_server(
        tmp_path_factory.mktemp("local-lakefs"),
        port,
        tools.lakefs_binaries().lakefs,
        name="lakefs-local",
    )
    server.start()
    try:
        server.wait_ready(60)
        client = LakeFS(
            f"http://127.0.0.1:{port}", DEV_ACCESS_KEY_ID, DEV_SECRET_ACCESS_KEY, data_path="auto"
        )
        yield client
        client.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_repo(local_lakefs: LakeFS) -> str:
    return new_repository(local_lakefs, "local-blockstore")


@pytest.fixture(scope="module")
def worker(
    local_lakefs: LakeFS,
    local_repo: str,
    endpoints: Endpoints,
    conductor: Conductor,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[InProcessWorker]:
    app = build_app(S)
    settings = make_settings(
        dataclasses.replace(endpoints, lakefs_url=local_lakefs.endpoint, store=None),
        tmp_path_factory.mktemp("scratch"),
        allowed_repositories=[local_repo],
    )
    register_app(conductor, app, retries=0)
    runner = Runner(app, Deps(settings, local_lakefs, conductor), Lifecycle())
    runner.lifecycle.preflight_ok = True
    runner.start()
    yield InProcessWorker(runner, settings, conductor, app)
    runner.drain()


@pytest.fixture(scope="module")
def base(local_lakefs: LakeFS, local_repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    files = {"in/data.txt": b"hello\n", "docs/readme.md": b"# readme\n", "keep.bin": b"\x00" * 9}
    return seed(local_lakefs, local_repo, files, tmp_path_factory.mktemp("seed"))


def test_the_storage_config_names_the_local_blockstore_and_no_presigning(
    local_lakefs: LakeFS,
) -> None:
    storage = local_lakefs.storage_config()
    assert (storage.blockstore_type, storage.pre_sign_support) == ("local", False)


def test_auto_streams_bodies_through_the_lakefs_api(local_lakefs: LakeFS) -> None:
    chosen = local_lakefs.transfers
    assert chosen.mode == "api"
    assert isinstance(chosen, ApiTransfers) and chosen is local_lakefs.api


def test_a_workspace_task_is_merged_once_with_its_provenance(
    worker: InProcessWorker,
    local_lakefs: LakeFS,
    local_repo: str,
    base: str,
    tmp_path: Path,
) -> None:
    branch = f"b-{suffix()}"
    local_lakefs.create_branch(local_repo, branch, base, hidden=False)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(local_repo, base, branch),
            "params": {
                "ops": [
                    {"op": "write", "path": "out/new.txt", "content": "fresh"},
                    {"op": "append", "path": "in/data.txt", "content": "world\n"},
                    {"op": "delete", "path": "docs/readme.md"},
                ]
            },
        },
    )
    task = task_of(run)
    assert run.status == "COMPLETED", task.reason_for_incompletion
    output: dict[str, Any] = task.output_data
    new_ref = output["workspace"]["ref"]
    assert output["workspace"] == workspace(local_repo, new_ref, branch)
    assert output["result"]["files"] == ["in/data.txt", "keep.bin", "out/new.txt"]

    # Merged once: the branch's head is the output ref, one merge commit above the base.
    assert local_lakefs.branch_head(local_repo, branch) == new_ref
    [merge, *_] = local_lakefs.log(local_repo, branch, amount=2)
    assert merge.id == new_ref and merge.parents[0] == base and len(merge.parents) == 2
    assert keys_at(local_lakefs, local_repo, new_ref) == {"in/data.txt", "keep.bin", "out/new.txt"}
    assert read(local_lakefs, local_repo, new_ref, "out/new.txt", tmp_path) == b"fresh"
    assert read(local_lakefs, local_repo, new_ref, "in/data.txt", tmp_path) == b"hello\nworld\n"
    assert read(local_lakefs, local_repo, new_ref, "keep.bin", tmp_path) == b"\x00" * 9

    meta = local_lakefs.get_commit(local_repo, new_ref).metadata
    assert meta["perago.workflow_id"] == run.workflow_id
    assert meta["perago.task_id"] == task.task_id
    assert meta["perago.task_type"] == f"ops_{S}"
    assert meta["perago.input_ref"] == base
    for key in ("reference_name", "retry_count", "worker_id", "version"):
        assert meta[f"perago.{key}"], key


def test_a_failed_task_leaves_the_target_branch_as_it_was(
    worker: InProcessWorker, local_lakefs: LakeFS, local_repo: str, base: str
) -> None:
    branch = f"b-{suffix()}"
    local_lakefs.create_branch(local_repo, branch, base, hidden=False)
    run = worker.run(
        f"ops_{S}",
        {
            "workspace": workspace(local_repo, base, branch),
            "params": {
                "ops": [
                    {"op": "write", "path": "out/half.txt", "content": "half"},
                    {"op": "raise", "content": "handler gave up"},
                ]
            },
        },
    )
    task = task_of(run)
    assert (run.status, task.status) == ("FAILED", "FAILED")
    assert "handler gave up" in (task.reason_for_incompletion or "")
    assert [c.id for c in local_lakefs.walk_log(local_repo, branch, first_parent=False)] == [
        c.id for c in local_lakefs.walk_log(local_repo, base, first_parent=False)
    ]
