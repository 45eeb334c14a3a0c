"""Volume on the real servers with a real worker process: a >256 MiB object, 5,000 files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from perago_testing import keys_at, suffix, workspace
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app, wait_for_workflow
from perago_worker.devstack.servers import Endpoints
from perago_worker.devstack.worker_process import WorkerProcess, start_worker
from perago_worker.lakefs import LakeFS

S = suffix()
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def worker(
    endpoints: Endpoints,
    conductor: Conductor,
    tmp_path_factory: pytest.TempPathFactory,
    repo: str,
    monkeypatch_module: Any,
) -> Iterator[WorkerProcess]:
    monkeypatch_module.setenv("PERAGO_TEST_SUFFIX", S)
    import importlib

    import volume_app

    importlib.reload(volume_app)
    register_app(conductor, volume_app.app, retries=0)
    proc = start_worker(
        "volume_app:app",
        endpoints,
        tmp_path_factory.mktemp("volume-worker"),
        env={
            "PYTHONPATH": str(HERE),
            "PERAGO_TEST_SUFFIX": S,
            "PERAGO_ALLOWED_REPOSITORIES": f'["{repo}"]',
        },
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def run_one(
    conductor: Conductor, task_type: str, task_input: dict[str, Any], timeout: float = 300
) -> Any:
    from perago_testing import one_task_workflow

    name = one_task_workflow(conductor, task_type, sorted(task_input))
    return wait_for_workflow(conductor, conductor.start_workflow(name, task_input), timeout)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_300_mib_object_streams_through_with_flat_memory(
    worker: WorkerProcess, lakefs: LakeFS, conductor: Conductor, repo: str, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    sent = hashlib.sha256()
    with big.open("wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(300):
            fh.write(block)
            sent.update(block)
    branch = f"big-{suffix()}"
    lakefs.create_branch(repo, branch, "main", hidden=False)
    lakefs.upload(repo, branch, "big/input.bin", big)
    ref = lakefs.commit(repo, branch, "big object", {}).id
    big.unlink()

    run = run_one(
        conductor, f"vol_stream_{S}", {"workspace": workspace(repo, ref, branch), "params": {}}
    )

    assert run.status == "COMPLETED", run.tasks[0].reason_for_incompletion
    out = run.tasks[0].output_data
    assert out["result"]["bytes"] == 300 << 20
    objs = {
        o.key: o
        for page in lakefs.list_objects(repo, out["workspace"]["ref"], "big/")
        for o in page
    }
    assert objs["big/copy.bin"].size == 300 << 20
    # The content, not lakeFS's checksum: a multipart upload's ETag is not the content's MD5.
    copy = lakefs.download(repo, out["workspace"]["ref"], "big/copy.bin", tmp_path / "c", 300 << 20)
    assert copy.sha256 == sent.hexdigest()
    assert peak_rss_mib(worker.proc.pid) < 200


def test_five_thousand_small_files_materialize_and_publish(
    worker: WorkerProcess, lakefs: LakeFS, conductor: Conductor, repo: str, tmp_path: Path
) -> None:
    branch = f"many-{suffix()}"
    lakefs.create_branch(repo, branch, "main", hidden=False)
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1024)

    def put(i: int) -> None:
        lakefs.upload(repo, branch, f"many/d{i % 50:02d}/f{i:05d}.bin", src)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(5000)))
    ref = lakefs.commit(repo, branch, "5000 files", {}).id

    run = run_one(
        conductor, f"vol_count_{S}", {"workspace": workspace(repo, ref, branch), "params": {}}
    )

    assert run.status == "COMPLETED", run.tasks[0].reason_for_incompletion
    out = run.tasks[0].output_data
    assert out["result"] == {"files": 5000, "bytes": 5000 * 1024}
    keys = keys_at(lakefs, repo, out["workspace"]["ref"], "many/")
    assert len(keys) == 5001 and "many/count.txt" in keys
