"""Per-task overhead and throughput: a real perago worker process vs a bare Conductor worker."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from conductor.client.http.models.task_def import TaskDef

import _calls
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
# Issue 16: a one-file task's p50 overhead, and no-op throughput at 4 and 16 against the bare
# worker measured in the same run.
OVERHEAD_AT_MOST_100 = Target("overhead <= 100 ms", lambda r: r.perago_median - r.ref_median <= 100)
THROUGHPUT_TARGET = Target("ratio >= 0.9", lambda r: r.ratio >= 0.9)
THROUGHPUT_TARGETED = (4, 16)


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


def latency_once(b: Bench, kind: str, parts: list[dict[str, float]] | None = None) -> float:
    """Seconds from start_workflow to seeing COMPLETED; with `parts`, where they went."""
    started = time.perf_counter()
    workflow_id = b.conductor.start_workflow(workflow_name(kind), workflow_input(b))
    wait_completed(b, workflow_id, started + WORKFLOW_TIMEOUT)
    seconds = time.perf_counter() - started
    if parts is not None:  # read after the clock stopped: not part of the sample
        parts.append(latency_parts(b, workflow_id, seconds * 1000))
    return seconds


# Where one sample's time went, from Conductor's own timestamps (ms, one clock: the server's).
PARTS = {
    "queued": "scheduled -> polled (the task waiting for a worker's poll)",
    "worker": "polled -> updated (the worker's own time, its report included)",
    "decide": "updated -> workflow ended (Conductor deciding after the report)",
    "rest": "the rest (the start request, the harness's 20 ms status polling)",
}


def latency_parts(b: Bench, workflow_id: str, total_ms: float) -> dict[str, float]:
    run = b.conductor.get_workflow(workflow_id)
    [task] = run.tasks or []
    created, ended = float(run.create_time or 0), float(run.end_time or 0)
    return {
        "queued": float(task.start_time or 0) - float(task.scheduled_time or 0),
        "worker": float(task.end_time or 0) - float(task.start_time or 0),
        "decide": ended - float(task.end_time or 0),
        "rest": total_ms - (ended - created),
    }


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
def perago_worker(
    b: Bench, concurrency: int, extra_env: dict[str, str] | None = None
) -> Iterator[int]:
    """A `perago-worker run bench_app:app` process; yields its pid."""
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
            **(extra_env or {}),
        },
        name=f"perago-c{concurrency}",
        wait=False,  # wait below, inside the try: a worker that never gets ready is stopped too
    )
    try:
        worker.wait_ready(timeout=90)
        yield worker.proc.pid
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
def bare_worker(b: Bench, threads: int) -> Iterator[int]:
    """bench/bare_worker.py with `threads` polling threads; yields its pid."""
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
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=POLL_TIMEOUT_MS / 1000 + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- where the CPU goes ---------------------------------------------------------------------


def listening_pid(port: int) -> int | None:
    """The process listening on loopback TCP `port` (/proc/net/tcp's socket inode, found
    among /proc/<pid>/fd), or None: the servers of a stack the harness did not start."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (/proc/<pid>/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids(b: Bench) -> dict[str, int]:
    """lakeFS, Conductor and the store (when there is one), by the ports they listen on."""
    urls = {"lakeFS": b.endpoints.lakefs_url, "Conductor": b.endpoints.conductor_url}
    if b.endpoints.store is not None:
        urls["store"] = b.endpoints.store.url
    pids = {}
    for name, url in urls.items():
        port = urllib.parse.urlsplit(url).port
        pid = listening_pid(port) if port else None
        if pid is not None:
            pids[name] = pid
    return pids


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process, this bench process included."""
    own = os.times()
    return {**{n: cpu_seconds(p) for n, p in pids.items()}, "bench": own.user + own.system}


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's first line."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


# -- the call list ----------------------------------------------------------------------------


def case_calls(b: Bench, *, samples: int, profile: bool = True) -> Section:
    """Every HTTP round trip of `samples` sequential tasks of each kind, at concurrency 1."""
    section = Section(
        "3b. Round trips per task",
        f"A `perago-worker run bench_app:app` process at concurrency 1 with every HTTP request "
        f"recorded (bench/_calls.py: `http.client`, so urllib3 and lakefs-sdk too, and httpx, "
        f"so conductor-python): thread, server, method, path pattern and time. {samples} "
        f"sequential one-task workflows of each kind after 3 warm-up tasks; the figures are "
        f"per task over all of them (warm-ups included). The poll loop's figure includes "
        f"the idle long polls between tasks ({POLL_TIMEOUT_MS} ms each).",
    )
    register(b)
    servers = {
        f"{u.hostname}:{u.port}": name
        for name, url in (
            ("lakeFS", b.endpoints.lakefs_url),
            ("Conductor", b.endpoints.conductor_url),
            ("store", b.endpoints.store.url if b.endpoints.store else ""),
        )
        if url
        for u in [urllib.parse.urlsplit(url)]
    }
    for kind in ("noop", "write"):
        out = b.workdir / f"calls-{kind}.jsonl"
        out.unlink(missing_ok=True)
        latencies = []
        with perago_worker(b, 1, {"PERAGO_BENCH_CALLS": str(out)}):
            for _ in range(3):
                latency_once(b, kind)
            for _ in range(samples):
                latencies.append(latency_once(b, kind) * 1000)
        records = _calls.load(out)
        tasks = samples + 3
        table = _calls.summarize(records, tasks, servers)
        section.tables.append(
            f"`{WORKFLOWS[kind]}` ({tasks} tasks, p50 {percentile(latencies, 50):.1f} ms):\n\n"
            + table
        )
        section.tables.append(
            f"One `{WORKFLOWS[kind]}` attempt in order (ms from its first call):\n\n"
            + _calls.timeline(records, servers)
        )
        log(f"calls {kind}:\n{table}")
    if profile:
        prof = b.workdir / "profile-noop.pstats"
        with perago_worker(b, 4, {"PERAGO_BENCH_PROFILE": str(prof)}):
            latency_once(b, "noop")
            throughput_once(b, "noop", max(samples, 50))
        section.tables.append(
            "cProfile of every worker thread over a no-op throughput run (concurrency 4; "
            "cProfile roughly doubles the CPU, so read the shares, not the times):\n\n"
            + profile_table(prof)
        )
    return section


def profile_table(path: Path, top: int = 30) -> str:
    """The functions with the most own time (pstats), as a Markdown table."""
    import pstats

    stats = pstats.Stats(str(path))
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    lines = ["| own s | share | calls | function |", "|---|---|---|---|"]
    for (file, line, name), (_cc, calls, own, _cum, _callers) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        lines.append(f"| {own:.3f} | {100 * own / total:.1f} % | {calls} | `{name}` {where} |")
    return "\n".join(lines)


# -- the case -----------------------------------------------------------------------------


def case_tasks(
    b: Bench,
    *,
    sequential: int,
    burst: int,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
) -> Section:
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
        f"PERAGO_CONCURRENCY (bare: threads) {', '.join(map(str, concurrencies))}. "
        f"Around each throughput run the harness reads the CPU time of the worker, lakeFS, "
        f"Conductor, the store and itself (the 8 starting threads and the status polls), "
        f"and the machine's busy share from /proc/stat.",
    )
    register(b)
    lat: dict[str, dict[str, list[float]]] = {
        k: {"p50": [], "p95": []} for k in ("noop", "write", "bare")
    }
    parts: dict[str, list[dict[str, float]]] = {k: [] for k in lat}
    rate: dict[int, dict[str, list[float]]] = {c: {"perago": [], "bare": []} for c in concurrencies}
    # CPU ms per task of each process in each throughput run, and the machine's busy share.
    cpu: dict[tuple[int, str], list[dict[str, float]]] = {}
    pids = server_pids(b)
    for i, concurrency in enumerate(concurrencies):
        for who in rotated(["perago", "bare"], i):
            workers = perago_worker if who == "perago" else bare_worker
            kinds = ["noop", "write"] if who == "perago" else ["bare"]
            with workers(b, concurrency) as worker_pid:
                for kind in kinds:  # warm up both ends (JIT, imports, connections, cache)
                    for _ in range(3):
                        latency_once(b, kind)
                for rep in range(b.repeat):
                    if concurrency == LATENCY_CONCURRENCY:
                        for kind in kinds:
                            samples = [
                                latency_once(b, kind, parts[kind]) * 1000 for _ in range(sequential)
                            ]
                            lat[kind]["p50"].append(percentile(samples, 50))
                            lat[kind]["p95"].append(percentile(samples, 95))
                            log(
                                f"latency {kind} #{rep + 1}: p50 {percentile(samples, 50):.1f} ms,"
                                f" p95 {percentile(samples, 95):.1f} ms"
                            )
                    watched = {**pids, "worker": worker_pid}
                    before, busy_before = cpu_snapshot(watched), machine_busy()
                    tps = throughput_once(b, kinds[0], burst)
                    after, busy_after = cpu_snapshot(watched), machine_busy()
                    used = {n: 1000 * (after[n] - before[n]) / burst for n in after}
                    used["machine busy %"] = (
                        100
                        * (busy_after[0] - busy_before[0])
                        / max(1, busy_after[1] - busy_before[1])
                    )
                    cpu.setdefault((concurrency, who), []).append(used)
                    rate[concurrency][who].append(tps)
                    log(f"throughput {who} c={concurrency} #{rep + 1}: {tps:.1f} tasks/s")
    measured = [("noop", "no-op task"), ("write", "one-file task")] if lat["bare"]["p50"] else []
    for kind, label in measured:
        for q in ("p50", "p95"):
            overhead = median(lat[kind][q]) - median(lat["bare"][q])
            section.rows.append(
                Row(
                    f"{label}, {q} latency",
                    "bare worker",
                    "ms",
                    lat[kind][q],
                    lat["bare"][q],
                    target={
                        ("noop", "p50"): OVERHEAD_UNDER_150,
                        ("write", "p50"): OVERHEAD_AT_MOST_100,
                    }.get((kind, q)),
                    extra=f"overhead {overhead:+.0f} ms",
                )
            )
    for concurrency in concurrencies:
        section.rows.append(
            Row(
                f"no-op tasks, {burst} at once, concurrency {concurrency}",
                "bare worker",
                "tasks/s",
                rate[concurrency]["perago"],
                rate[concurrency]["bare"],
                better="higher",
                target=THROUGHPUT_TARGET if concurrency in THROUGHPUT_TARGETED else None,
            )
        )
    if parts["bare"]:
        lines = [
            "Where the latency samples' time went, from Conductor's timestamps of each "
            "workflow and its task (median ms over all samples of all repeats; "
            + "; ".join(f"`{k}`: {v}" for k, v in PARTS.items())
            + "):\n",
            "| worker, task | " + " | ".join(PARTS) + " |",
            "|---|" + "---|" * len(PARTS),
        ]
        for kind, label in (
            ("bare", "bare"),
            ("noop", "perago, no-op"),
            ("write", "perago, one-file"),
        ):
            cells = [f"{median([p[k] for p in parts[kind]]):.1f}" for k in PARTS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        section.tables.append("\n".join(lines))
    if cpu:
        names = ["worker", "lakeFS", "Conductor", "store", "bench", "machine busy %"]
        names = [n for n in names if any(n in u for runs in cpu.values() for u in runs)]
        lines = [
            "CPU ms per task in the throughput runs (median over repeats; `machine busy %`: "
            "all cores, every process):\n",
            "| run | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for (concurrency, who), runs in sorted(cpu.items()):
            cells = [f"{median([u.get(n, float('nan')) for u in runs]):.1f}" for n in names]
            lines.append(f"| {who}, concurrency {concurrency} | " + " | ".join(cells) + " |")
        section.tables.append("\n".join(lines))
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
