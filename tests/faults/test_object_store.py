"""The object store under lakeFS killed mid-transfer: the presigned data plane keeps the guarantees.

The worker moves object bodies straight to and from the store (VersityGW) on presigned URLs.
Each case SIGKILLs the store while bodies are in flight and starts it again on the same port
and data: a short outage is ridden out by the transfer retries; one longer than the retry
budget fails the attempt retryably, and Conductor's retry publishes. Either way the target
branch gets exactly one merge (`Harness.verify` counts every commit above the input).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_app import big_chunks

from conftest import Harness
from perago_testing import seed, suffix
from perago_worker.devstack.servers import ServerProcess, Stack
from perago_worker.devstack.worker_process import WorkerProcess
from perago_worker.lakefs.presigned import MIB, MULTIPART_THRESHOLD

pytestmark = pytest.mark.faults

OUTAGE_SECONDS = 3.0  # well inside the transfers' retry budget (12 tries, backoff to 5 s)


@pytest.fixture
def store(stack: Stack) -> Iterator[ServerProcess]:
    """The object store's process; up again after the test, whatever the test did to it."""
    if stack.store is None:
        pytest.skip("lakeFS runs on the local blockstore: there is no object store to kill")
    yield stack.store
    if stack.store.proc is None or stack.store.proc.poll() is not None:
        stack.store.start()
        stack.store.wait_ready(60)


def kill(store: ServerProcess) -> None:
    store.stop(kill=True)


def revive(store: ServerProcess) -> None:
    """Start the store again on its port and data."""
    store.start()
    store.wait_ready(60)


def store_retries(worker: WorkerProcess) -> float:
    """`perago_retries_total{server="objectstore"}` of a running worker."""
    status, text = worker.get("/metrics")
    assert status == 200, text
    found = re.search(r'^perago_retries_total\{server="objectstore"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def happened(worker: WorkerProcess, event: str) -> bool:
    return any(line.get("event") == event for line in worker.events())


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_store_killed_mid_upload_and_restarted_merges_exactly_once(
    harness: Harness, store: ServerProcess
) -> None:
    worker = harness.worker("w")
    case = harness.start("slow", files=400, size=64 * 1024)
    harness.wait_event(worker, "post_check.done")  # the handler is done: the stage begins
    kill(store)
    assert not happened(worker, "stage.done"), "the stage ended before the store was killed"
    time.sleep(OUTAGE_SECONDS)
    revive(store)
    assert store_retries(worker) > 0  # presigned transfers met the outage
    harness.verify(case)


def test_store_restarted_mid_download_merges_exactly_once(
    harness: Harness, store: ServerProcess, tmp_path: Path
) -> None:
    count = 300
    ref = many_inputs(harness, tmp_path, count)
    # One transfer thread: the download of the inputs lasts long enough to be cut.
    worker = harness.worker("w", PERAGO_TRANSFER_CONCURRENCY="1")
    case = harness.start("slow", ref=ref)

    def arrived() -> int:
        return len(list(harness.scratch.glob("*/ws/many/*.bin")))

    wait_for(arrived, 60, "a first input downloaded")
    kill(store)
    assert arrived() < count, "the download ended before the store was killed"
    time.sleep(OUTAGE_SECONDS)
    revive(store)
    assert store_retries(worker) > 0
    run = harness.verify(case)
    assert run.tasks[-1].output_data["result"]["inputs"] == count + 20  # and f/in/*


def many_inputs(harness: Harness, tmp_path: Path, count: int) -> str:
    """A commit of `count` 64 KiB objects under `f/many/` on top of the harness's base."""
    branch = f"many-{suffix()}"
    harness.lakefs.create_branch(harness.repo, branch, harness.base, hidden=False)
    files = {f"f/many/{i:04d}.bin": i.to_bytes(4, "big") * (16 * 1024) for i in range(count)}
    return seed(harness.lakefs, harness.repo, files, tmp_path, branch=branch)


def test_store_down_past_the_retry_budget_fails_the_attempt_and_the_retry_publishes_once(
    harness: Harness, store: ServerProcess
) -> None:
    # As many files as transfer threads: none waits for a thread, so every upload meets the
    # outage in flight and gives up one retry budget (12 tries, about 40 s) after the kill.
    # (A file that started later would spend a budget of its own before the attempt fails.)
    worker = harness.worker("w", PERAGO_TRANSFER_CONCURRENCY="32")
    case = harness.start("slow", files=32, size=2 * MIB)
    harness.wait_event(worker, "post_check.done")
    kill(store)  # and down until the attempt gives up
    assert not happened(worker, "stage.done"), "the stage ended before the store was killed"
    harness.wait_task(case, lambda t: t.retry_count >= 1 or t.status == "FAILED", 90)
    failed = harness.conductor.get_workflow(case.workflow_id).tasks[0]
    assert failed.status == "FAILED", failed.status  # retryable, not FAILED_WITH_TERMINAL_ERROR
    assert failed.reason_for_incompletion.startswith("infrastructure: "), failed
    assert harness.commits_since(case.branch, case.input_ref) == []
    revive(store)
    run = harness.verify(case)
    retry = run.tasks[-1]
    assert retry.retry_count >= 1 and retry.task_id != failed.task_id
    merge = harness.lakefs.get_commit(harness.repo, retry.output_data["workspace"]["ref"])
    assert merge.metadata["perago.task_id"] == retry.task_id


def test_store_killed_mid_multipart_upload_merges_the_exact_bytes_once(
    harness: Harness, store: ServerProcess, stack: Stack, tmp_path: Path
) -> None:
    size = 160 * MIB + 12345  # ten 16 MiB parts and a short one
    assert size >= MULTIPART_THRESHOLD
    worker = harness.worker("w")
    case = harness.start("slow", big=size)
    key = f"f/big/{case.params['tag']}.bin"
    harness.wait_event(worker, "post_check.done")
    uploads = stack.workdir / "store-data"
    wait_for(lambda: multipart_parts(uploads), 60, "a part of the multipart upload stored")
    kill(store)
    assert not happened(worker, "stage.done"), "the stage ended before the store was killed"
    time.sleep(OUTAGE_SECONDS)
    revive(store)
    run = harness.verify(case)
    final = run.tasks[-1].output_data["workspace"]["ref"]
    [listed] = [o for page in harness.lakefs.list_objects(harness.repo, final, key) for o in page]
    assert listed.size == size
    assert re.fullmatch(r"[0-9a-f]{32}-\d+", listed.checksum), listed.checksum  # multipart
    got = harness.lakefs.download(harness.repo, final, key, tmp_path / "big.bin", size)
    expected = hashlib.sha256()
    for chunk in big_chunks(case.params["tag"], size):
        expected.update(chunk)
    assert got.sha256 == expected.hexdigest()


def multipart_parts(store_data: Path) -> list[Path]:
    """Parts VersityGW holds of unfinished multipart uploads (`<bucket>/.sgwtmp/multipart`)."""
    return [p for p in store_data.glob("*/.sgwtmp/multipart/*/*/*") if p.is_file()]
