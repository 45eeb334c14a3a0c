"""Per-task overhead and throughput: a real perago worker process vs a bare Conductor worker."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conductor.client.http.models.task_def import TaskDef

from _harness import BENCH_DIR, Bench, log, median, percentile, rotated
from _report import Row, Section, Target
from bench_app import NOOP_TASK, WRITE_TASK, app
from perago_worker.devstack.demo import register_app
from perago_worker.devstack.worker_process import start_worker

BARE_TASK = "bench_bare"
WORKFLOWS = {"noop": NOOP_TASK, "write": WRITE_TASK, "bare": BARE_TASK}
TARGET_BRANCH = "tasks"
POLL_TIMEOUT_MS = 500  # the same long poll for both workers (start_worker's default)
CONCURRENCIES = (1, 4, 16)
LATENCY_CONCURRENCY = 4  # the worker's default
WORKFLOW_TIMEOUT = 120.0
OVERHEAD_UNDER_150 = Target("overhead < 150 ms", lambda r: r.perago_median - r.ref_median < 150)


def workflow_name(kind: str) -> str:
    return f"bench_wf_{kind}"


def register(b: Bench) -> None:
    """Task definitions (retries 0), one-task workflows and the branch the tasks merge into."""
    register_app(b.conductor, app, retries=0)
    bare = TaskDef(
        name=BARE_TASK,
        description="bench: completed at once by bench/bare_worker.py",
        retry_count=0,
        timeout_seconds=3600,
        response_timeout_seconds=120,
        timeout_policy="TIME_OUT_WF",
        owner_email="bench@localhost",
    )
    if BARE_TASK in {d.name for d in b.conductor.get_task_defs()}:
        b.conductor.update_task_def(bare)
    else:
        b.conductor.register_task_defs([bare])
    for kind, task in WORKFLOWS.items():
        b.conductor.register_workflow(
            {
                "name": workflow_name(kind),
                "version": 1,
                "schemaVersion": 2,
                "ownerEmail": "bench@localhost",
                "tasks": [
                    {
                        "name": task,
                        "taskReferenceName": "only",
                        "type": "SIMPLE",
                        "inputParameters": {
                            "workspace": "${workflow.input.workspace}",
                            "params": "${workflow.input.params}",
                        },
                    }
                ],
            }
        )
    b.lakefs.create_branch(b.repo, TARGET_BRANCH, b.seed_commit, hidden=False)


def workflow_input(b: Bench) -> dict[str, Any]:
    workspace = {
        "repository": b.repo,
        "branch": TARGET_BRANCH,
        "ref_type": "commit",
        "ref": b.seed_commit,
    }
    return {"workspace": workspace, "params": {}}


def status_of(b: Bench, workflow_id: str) -> str:
    run = b.conductor.call(
        b.conductor.workflows.get_execution_status, workflow_id, include_tasks=False
    )
    return str(run.status)


def failure(b: Bench, workflow_id: str, status: str) -> RuntimeError:
    run = b.conductor.get_workflow(workflow_id)
    reasons = [
        f"{t.reference_task_name}: {t.status} {t.reason_for_incompletion or ''}"
        for t in run.tasks or []
    ]
    return RuntimeError(f"workflow {workflow_id} ended {status}: {'; '.join(reasons)}")


def wait_completed(b: Bench, workflow_id: str, deadline: float) -> None:
    """Poll every 20 ms until the workflow leaves RUNNING; it must end COMPLETED."""
    while True:
        status = status_of(b, workflow_id)
        if status == "COMPLETED":
            return
        if status != "RUNNING":
            raise failure(b, workflow_id, status)
        if time.perf_counter() > deadline:
            raise TimeoutError(f"workflow {workflow_id} still RUNNING")
        time.sleep(0.02)


def latency_once(b: Bench, kind: str) -> float:
    """Seconds from start_workflow to seeing COMPLETED."""
    started = time.perf_counter()
    workflow_id = b.conductor.start_workflow(workflow_name(kind), workflow_input(b))
    wait_completed(b, workflow_id, started + WORKFLOW_TIMEOUT)
    return time.perf_counter() - started


def throughput_once(b: Bench, kind: str, count: int) -> float:
    """Tasks per second for `count` workflows started at once (8 starting threads)."""
    name, task_input = workflow_name(kind), workflow_input(b)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: b.conductor.start_workflow(name, task_input), range(count)))
    deadline = started + WORKFLOW_TIMEOUT + count * 2.0
    for workflow_id in ids:  # roughly the order they complete in: few polls per workflow
        wait_completed(b, workflow_id, deadline)
    return count / (time.perf_counter() - started)


# -- the two workers ----------------------------------------------------------------------


@contextlib.contextmanager
def perago_worker(b: Bench, concurrency: int) -> Iterator[None]:
    worker = start_worker(
        "bench_app:app",
        b.endpoints,
        b.workdir / f"perago-worker-c{concurrency}",
        env={
            "PYTHONPATH": str(BENCH_DIR),
            "PERAGO_CONCURRENCY": str(concurrency),
            "PERAGO_TRANSFER_CONCURRENCY": str(b.parallelism),
            "PERAGO_POLL_TIMEOUT_MS": str(POLL_TIMEOUT_MS),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        },
        name=f"perago-c{concurrency}",
        wait=False,  # wait below, inside the try: a worker that never gets ready is stopped too
    )
    try:
        worker.wait_ready(timeout=90)
        yield
    except BaseException:
        log(f"perago worker log tail:\n{worker.tail(30)}")
        raise
    finally:
        code = worker.stop(timeout=60)
        if code != 0:
            log(f"perago worker exited with {code}; log {worker.log_path}")
        FENCE_WINDOWS_MS.extend(fence_windows(worker.events()))


# Every merge's window, from the attempt fence's answer to the merge's answer (docs/fences.md).
FENCE_WINDOWS_MS: list[float] = []


def fence_windows(events: list[dict[str, Any]]) -> list[float]:
    """The `fence_to_merge_ms` figure of every merge a worker sent (its `merge.done` events)."""
    return [
        float(e["fence_to_merge_ms"])
        for e in events
        if e.get("event") == "merge.done" and e.get("merged") and "fence_to_merge_ms" in e
    ]


@contextlib.contextmanager
def bare_worker(b: Bench, threads: int) -> Iterator[None]:
    folder = b.workdir / f"bare-worker-t{threads}"
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "ready"
    log_path = folder / "bare.log"
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(BENCH_DIR / "bare_worker.py"),
                "--url",
                b.endpoints.conductor_url,
                "--task",
                BARE_TASK,
                "--threads",
                str(threads),
                "--poll-timeout-ms",
                str(POLL_TIMEOUT_MS),
                "--ready-file",
                str(ready),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bare worker did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=POLL_TIMEOUT_MS / 1000 + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- the case -----------------------------------------------------------------------------


def case_tasks(b: Bench, *, sequential: int, burst: int) -> Section:
    section = Section(
        "3. Per-task overhead and throughput",
        f"A real `perago-worker run bench_app:app` process (bench/bench_app.py; default "
        f"settings: object cache on in copy mode, INFO JSON logs to a file) against "
        f"bench/bare_worker.py, which completes each task at once with empty output. Both use "
        f"the same Conductor adapter and a {POLL_TIMEOUT_MS} ms long poll of one task. "
        f"Latency: {sequential} sequential one-task workflows per repeat, from `start_workflow` "
        f"to seeing COMPLETED (polling every 20 ms), worker concurrency "
        f"{LATENCY_CONCURRENCY}; p50/p95 per repeat, median over repeats. `bench_noop` "
        f"materializes `tiny/` (3 files), changes nothing (no commit, no merge) and reports; "
        f"`bench_write` adds one file, so it also stages, commits, claims and merges. "
        f"Throughput: {burst} workflows started at once, until all are COMPLETED, with "
        f"PERAGO_CONCURRENCY (bare: threads) 1, 4 and 16.",
    )
    register(b)
    lat: dict[str, dict[str, list[float]]] = {
        k: {"p50": [], "p95": []} for k in ("noop", "write", "bare")
    }
    rate: dict[int, dict[str, list[float]]] = {c: {"perago": [], "bare": []} for c in CONCURRENCIES}
    for i, concurrency in enumerate(CONCURRENCIES):
        for who in rotated(["perago", "bare"], i):
            workers = perago_worker if who == "perago" else bare_worker
            kinds = ["noop", "write"] if who == "perago" else ["bare"]
            with workers(b, concurrency):
                for kind in kinds:  # warm up both ends (JIT, imports, connections, cache)
                    for _ in range(3):
                        latency_once(b, kind)
                for rep in range(b.repeat):
                    if concurrency == LATENCY_CONCURRENCY:
                        for kind in kinds:
                            samples = [latency_once(b, kind) * 1000 for _ in range(sequential)]
                            lat[kind]["p50"].append(percentile(samples, 50))
                            lat[kind]["p95"].append(percentile(samples, 95))
                            log(
                                f"latency {kind} #{rep + 1}: p50 {percentile(samples, 50):.1f} ms,"
                                f" p95 {percentile(samples, 95):.1f} ms"
                            )
                    tps = throughput_once(b, kinds[0], burst)
                    rate[concurrency][who].append(tps)
                    log(f"throughput {who} c={concurrency} #{rep + 1}: {tps:.1f} tasks/s")
    for kind, label in (("noop", "no-op task"), ("write", "one-file task")):
        for q in ("p50", "p95"):
            overhead = median(lat[kind][q]) - median(lat["bare"][q])
            section.rows.append(
                Row(
                    f"{label}, {q} latency",
                    "bare worker",
                    "ms",
                    lat[kind][q],
                    lat["bare"][q],
                    target=OVERHEAD_UNDER_150 if (kind, q) == ("noop", "p50") else None,
                    extra=f"overhead {overhead:+.0f} ms",
                )
            )
    for concurrency in CONCURRENCIES:
        section.rows.append(
            Row(
                f"no-op tasks, {burst} at once, concurrency {concurrency}",
                "bare worker",
                "tasks/s",
                rate[concurrency]["perago"],
                rate[concurrency]["bare"],
                better="higher",
            )
        )
    section.notes.append(
        "The ratio of latencies is necessarily < 1 (the bare worker does nothing); the "
        "figure that matters is the overhead, perago p50 minus bare p50."
    )
    if FENCE_WINDOWS_MS:
        w = FENCE_WINDOWS_MS
        section.notes.append(
            f"Fence-to-merge window (attempt fence answered -> merge answered) over the "
            f"{len(w)} merges of `bench_write` in this case: p50 {percentile(w, 50):.1f} ms, "
            f"p95 {percentile(w, 95):.1f} ms, p99 {percentile(w, 99):.1f} ms, max {max(w):.1f} ms "
            "(docs/fences.md)."
        )
    return section
