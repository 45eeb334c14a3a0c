"""Scale curve: 1, 2, 4 and 8 worker processes draining one-file tasks into one branch.

    .venv/bin/python bench/scale.py --start-stack DIR [--processes 1,2,4,8] [--tasks 400]
        [--concurrency 4] [--report FILE.json] [--markdown FILE.md] [--chart FILE.png]
    .venv/bin/python bench/scale.py --stack-from-env ...   (a running stack)

`--start-stack` starts the production-shaped stack: PostgreSQL, two Conductors and two
lakeFS servers on it, over the S3-compatible store (`devstack up --conductor postgres`).
Worker processes are split round-robin over both Conductors and both lakeFS servers, so
merges into the one target branch race across servers.

For each point (a number of worker processes) it:

1. creates a fresh repository whose `main` holds one seed file under `s/`;
2. starts `--tasks` one-task workflows (bench/scale_app.py: one 64-byte file at a path
   unique to the workflow, the workspace pinned to the seed commit) **before** any worker
   runs, so the backlog is the same for every point and the start requests (Conductor's
   cost, not the worker's) are outside the measurement;
3. starts the worker processes (`perago-worker run`, `--concurrency` slots each, the
   defaults otherwise), waits for every workflow to complete, scrapes every worker's
   `/metrics` and stops them;
4. verifies from Conductor and lakeFS alone: every workflow completed, the target holds
   exactly one perago merge per workflow above the seed and no other commit, and each
   task's output ref is its own merge.

Figures per point: tasks/s and merges/s over the middle 80 % of completions (the first and
last 10 % are worker start and drain), p50/p95 of a task's time in the worker (Conductor's
`startTime` to `endTime`: poll to completion), merge retries (the publish fence's tries
beyond the first: each is a 429 or a timeout of a contended merge), lakeFS call retries
(`perago_retries_total{server="lakefs"}`), and the CPU seconds of every process class per
task (which says where a saturated machine's time goes).

The reference is the branch itself: `merge_ceiling` merges prepared one-commit branches
into one branch from 1, 8 and 32 threads (split over the lakeFS servers) with nothing else
running: the most merges per second this stack's branch takes. Where perago's merges/s
reaches it, the branch is the limit; below it, something else is (on a 2-core machine,
the CPU every server and worker shares).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import scale_app  # noqa: E402
from _tasks import machine_busy  # noqa: E402
from perago_worker import fences  # noqa: E402
from perago_worker.conductor import Conductor  # noqa: E402
from perago_worker.devstack.demo import register_app  # noqa: E402
from perago_worker.devstack.servers import Endpoints, endpoints_from_env, start_stack  # noqa: E402
from perago_worker.devstack.worker_process import WorkerProcess, start_worker  # noqa: E402
from perago_worker.lakefs import LakeFS, is_transient  # noqa: E402

BRANCH = "main"
STARTERS = 8  # threads starting the backlog's workflows
# One client for every Conductor request: `httpx.get` makes a client (and its TLS context)
# per call, about 25 ms of CPU each, which made this process the machine's biggest user.
HTTP = httpx.Client(timeout=30)
POINT_LIMIT_SECONDS = 1800.0  # one point's drain, at most
CEILING_THREADS = (1, 8, 32)
# Process classes by what their command line holds, first match wins: PostgreSQL's backends
# name their database ("postgres: perago lakefs ..."), Conductor's command line its JDBC URL.
PROCESS_CLASSES = (
    ("PostgreSQL", "postgres: "),
    ("PostgreSQL", "bin/postgres "),
    ("store", "versitygw"),
    ("worker", "perago_worker.cli"),
    ("worker", "perago-worker"),
    ("bench", "bench/scale.py"),
    ("lakeFS", "bin/lakefs"),
    ("Conductor", "conductor-server"),
)


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- pure figures -----------------------------------------------------------------------------


def middle_window(times: Sequence[float], trim: float = 0.1) -> tuple[float, float, int]:
    """(start, end, events from start to end) between the `trim` and `1 - trim` quantiles.

    The first and last tenth of a drain are its ramp (workers starting one after the other,
    slots emptying at the end); the middle is the steady state."""
    ordered = sorted(times)
    if len(ordered) < 3:
        return 0.0, 0.0, 0
    lo = math.floor(trim * (len(ordered) - 1))
    hi = math.ceil((1 - trim) * (len(ordered) - 1))
    return ordered[lo], ordered[hi], hi - lo


def middle_rate(times: Sequence[float], trim: float = 0.1) -> float:
    """Events per second over `middle_window`. Too few events, or all at one instant, give
    0.0 (no rate can be told) rather than a division by zero."""
    start, end, events = middle_window(times, trim)
    return events / (end - start) if end > start else 0.0


def quantile(values: Sequence[float], q: float) -> float:
    """The `q` quantile by linear interpolation (statistics' 'inclusive' method)."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return float(cuts[max(0, min(98, round(q * 100) - 1))])


def limit_of(merges_per_second: float, ceiling: float, busy: float, share: float = 0.8) -> str:
    """What bounds a point: the branch when its merge rate reaches `share` of the ceiling;
    else the CPU when the machine was busy `share` of the steady window or more."""
    if ceiling > 0 and merges_per_second >= share * ceiling:
        return "branch merge rate"
    if busy >= share:
        return f"CPU ({busy:.0%} busy)"
    return f"neither ({busy:.0%} busy): the slots wait on round trips"


# -- CPU by process class ---------------------------------------------------------------------


def cpu_by_class() -> dict[str, float]:
    """CPU seconds so far of every live process, summed by `PROCESS_CLASSES` (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for name, needle in PROCESS_CLASSES:
            if needle in cmdline:
                totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
                break
    return totals


@dataclass(frozen=True)
class Sample:
    at: float  # time.time(), comparable with Conductor's task times
    cpu: dict[str, float]
    busy: float
    total: float


class CpuSampler:
    """`cpu_by_class` and the machine's jiffies every `every` seconds, on a thread: the CPU
    of the steady window alone (worker start-up, about a second of imports per process, and
    the drain's tail left out) is read afterwards with `window_cpu`."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while True:
            self.samples.append(Sample(time.time(), cpu_by_class(), *machine_busy()))
            if self._stop.wait(self.every):
                return


def sampler_span(samples: Sequence[Sample], start: float, end: float, at: float) -> bool:
    """Whether `at` falls between the samples `window_cpu` reads for (`start`, `end`)."""
    inside = [s.at for s in samples if start <= s.at <= end]
    return len(inside) >= 2 and inside[0] < at <= inside[-1]


def window_cpu(
    samples: Sequence[Sample], start: float, end: float
) -> tuple[dict[str, float], float, float]:
    """CPU seconds by class between the first sample at or after `start` and the last at or
    before `end`, the share of the machine's cores busy meanwhile, and the seconds spanned
    (all zero when no two samples fall inside)."""
    inside = [s for s in samples if start <= s.at <= end]
    if len(inside) < 2:
        return {}, 0.0, 0.0
    first, last = inside[0], inside[-1]
    cpu = {k: round(last.cpu.get(k, 0.0) - first.cpu.get(k, 0.0), 3) for k in sorted(last.cpu)}
    total = last.total - first.total
    busy = (last.busy - first.busy) / total if total > 0 else 0.0
    return cpu, round(busy, 3), round(last.at - first.at, 2)


# -- one point --------------------------------------------------------------------------------


@dataclass
class Point:
    processes: int
    concurrency: int
    tasks: int
    repository: str = ""
    drain_seconds: float = 0.0  # first task start to last task end
    tasks_per_second: float = 0.0
    merges_per_second: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    merge_retries: int = 0
    lakefs_retries: int = 0
    # The steady window (middle 80 % of completions): CPU ms per completed task by process
    # class, the machine's busy share, and the rate its cores would allow at that CPU cost.
    cpu_ms_per_task: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0
    cpu_bound_tasks_per_second: float = 0.0
    limit: str = ""
    repeat: int = 0
    problems: list[str] = field(default_factory=list)


def seed(lakefs: LakeFS, repository: str, scratch: Path) -> str:
    lakefs.create_repository(repository)
    seed_file = scratch / "seed.txt"
    seed_file.write_text("scale seed\n")
    lakefs.upload(repository, BRANCH, "s/seed.txt", seed_file)
    return lakefs.commit(repository, BRANCH, "seed", {"perago.bench": "scale"}).id


def start_backlog(
    conductor_urls: Sequence[str], workflow: str, repository: str, base: str, tasks: int
) -> list[str]:
    """Start `tasks` workflows (spread over every Conductor); their ids in start order."""
    ws = {"repository": repository, "branch": BRANCH, "ref_type": "commit", "ref": base}

    def one(i: int) -> str:
        url = conductor_urls[i % len(conductor_urls)]
        body = {"workspace": ws, "name": f"t{i:05d}"}
        for attempt in range(5):
            try:
                resp = HTTP.post(
                    f"{url}/workflow",
                    json={"name": workflow, "version": 1, "input": body},
                )
                resp.raise_for_status()
                return resp.text.strip().strip('"')
            except httpx.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(1.0)
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(STARTERS) as pool:
        return list(pool.map(one, range(tasks)))


def workflow_of(conductor_url: str, workflow_id: str) -> dict[str, Any]:
    resp = HTTP.get(f"{conductor_url}/workflow/{workflow_id}", params={"includeTasks": "true"})
    resp.raise_for_status()
    return dict(resp.json())


def status_of(conductor_url: str, workflow_id: str) -> str:
    resp = HTTP.get(f"{conductor_url}/workflow/{workflow_id}", params={"includeTasks": "false"})
    resp.raise_for_status()
    return str(resp.json()["status"])


def wait_all(
    conductor_url: str, ids: Sequence[str], limit: float, window: int
) -> list[dict[str, Any]]:
    """Every workflow once all ended (or as they stand when `limit` seconds passed).

    The backlog drains about in start order with at most `window` tasks in flight, so each
    round (every 2 s) checks the pending workflows in start order and stops after `2 *
    window` still running: polling all of them would cost Conductor (and this process) more
    CPU than the workers it measures (seen: the bench at 89 % of a core)."""
    pending = list(ids)
    deadline = time.monotonic() + limit
    with ThreadPoolExecutor(4) as pool:
        while pending and time.monotonic() < deadline:
            still: list[str] = []
            running = 0
            for i in range(0, len(pending), 16):
                if running >= 2 * window:
                    still.extend(pending[i:])
                    break
                batch = pending[i : i + 16]
                for workflow_id, status in zip(
                    batch, pool.map(lambda w: status_of(conductor_url, w), batch), strict=True
                ):
                    if status == "RUNNING":
                        still.append(workflow_id)
                        running += 1
            pending = still
            if pending:
                time.sleep(2.0)
        return list(pool.map(lambda w: workflow_of(conductor_url, w), ids))


def scrape_retries(worker: WorkerProcess) -> int:
    """`perago_retries_total{server="lakefs"}` of a live worker."""
    status, body = worker.get("/metrics")
    if status != 200:
        return 0
    total = 0.0
    for line in body.splitlines():
        if line.startswith("perago_retries_total{") and 'server="lakefs"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def merge_tries(worker: WorkerProcess) -> list[int]:
    """The publish fence's merge tries of every merge the worker logged."""
    return [
        tries
        for e in worker.events()
        if isinstance(tries := e.get("tries"), int) and e.get("merged") is True
    ]


def verify(
    lakefs: LakeFS, repository: str, base: str, runs: list[dict[str, Any]]
) -> tuple[list[str], list[float]]:
    """Problems (empty when every promise held) and the merge commits' creation times.

    Every commit above the seed must be a perago merge whose root task is a task of one of
    the workflows, one per workflow; each workflow's output ref must be its own merge. With
    as many merges as workflows and distinct roots, that is exactly one merge each."""
    problems: list[str] = []
    owner: dict[str, str] = {}  # task id -> workflow id
    outputs: dict[str, str] = {}  # workflow id -> output ref
    for run in runs:
        tasks = run.get("tasks") or []
        for task in tasks:
            owner[task["taskId"]] = run["workflowId"]
        if run["status"] != "COMPLETED" or not tasks:
            problems.append(f"workflow {run['workflowId']} ended {run['status']}")
            continue
        outputs[run["workflowId"]] = (
            (tasks[-1].get("outputData") or {}).get("workspace", {}).get("ref", "")
        )
    merged_by: dict[str, str] = {}  # commit id -> workflow id
    times: list[float] = []
    for commit in lakefs.walk_log(repository, BRANCH):
        if commit.id == base:
            break
        record = fences.PublishRecord.parse(commit.id, commit.metadata)
        if record is None:
            problems.append(f"commit {commit.id} on {BRANCH} is not a perago merge")
            continue
        workflow_id = owner.get(record.root_task_id)
        if workflow_id is None:
            problems.append(f"merge {commit.id}: root task {record.root_task_id} is unknown")
            continue
        if workflow_id in merged_by.values():
            problems.append(f"workflow {workflow_id} merged twice (again in {commit.id})")
        merged_by[commit.id] = workflow_id
        times.append(float(commit.creation_date))
    else:
        problems.append(f"the seed commit {base} is not in {BRANCH}'s history")
    if len(merged_by) != len(runs):
        problems.append(f"{len(merged_by)} merges on {BRANCH} for {len(runs)} workflows")
    for workflow_id, ref in outputs.items():
        if merged_by.get(ref) != workflow_id:
            problems.append(f"workflow {workflow_id}'s output ref {ref!r} is not its merge")
    return problems, times


def worker_env(
    endpoints: Endpoints, index: int, repository: str, suffix: str, concurrency: int
) -> dict[str, str]:
    """Worker `index`'s settings: its Conductor and lakeFS round-robin over the instances."""
    return {
        "PYTHONPATH": str(HERE),
        "PERAGO_SCALE_SUFFIX": suffix,
        "PERAGO_ALLOWED_REPOSITORIES": json.dumps([repository]),
        "PERAGO_CONDUCTOR__URL": endpoints.conductor_urls[index % len(endpoints.conductor_urls)],
        "PERAGO_LAKEFS__ENDPOINT": endpoints.lakefs_urls[index % len(endpoints.lakefs_urls)],
        "PERAGO_CONCURRENCY": str(concurrency),
    }


def run_point(
    endpoints: Endpoints,
    workdir: Path,
    *,
    processes: int,
    tasks: int,
    concurrency: int,
    suffix: str,
    ceiling: float,
    repeat: int = 0,
    log: Callable[[str], None] = print,
) -> Point:
    point = Point(processes, concurrency, tasks, repeat=repeat)
    lakefs = LakeFS(
        endpoints.lakefs_url, endpoints.lakefs_access_key_id, endpoints.lakefs_secret_access_key
    )
    folder = workdir / f"p{processes}"
    folder.mkdir(parents=True, exist_ok=True)
    point.repository = f"scale-{suffix.replace('_', '-')}-r{repeat}p{processes}"
    base = seed(lakefs, point.repository, folder)
    ids = start_backlog(endpoints.conductor_urls, f"scale_{suffix}", point.repository, base, tasks)
    log(f"[scale] p{processes}: {len(ids)} workflows queued; starting {processes} workers")
    workers = [
        start_worker(
            "scale_app:app",
            endpoints,
            folder / f"w{i}",
            name=f"p{processes}w{i}",
            env=worker_env(endpoints, i, point.repository, suffix, concurrency),
            wait=False,
        )
        for i in range(processes)
    ]
    try:
        with CpuSampler() as sampler:
            for worker in workers:
                worker.wait_ready(600)
            runs = wait_all(
                endpoints.conductor_url, ids, POINT_LIMIT_SECONDS, processes * concurrency
            )
        point.lakefs_retries = sum(scrape_retries(w) for w in workers)
    finally:
        for worker in workers:
            worker.stop(60)
    point.merge_retries = sum(t - 1 for w in workers for t in merge_tries(w))
    point.problems, merge_times = verify(lakefs, point.repository, base, runs)
    tasks_done = [
        t for run in runs for t in run.get("tasks") or [] if t.get("status") == "COMPLETED"
    ]
    ends = [t["endTime"] / 1000 for t in tasks_done]
    if tasks_done:
        point.drain_seconds = round(max(ends) - min(t["startTime"] / 1000 for t in tasks_done), 1)
    point.tasks_per_second = round(middle_rate(ends), 2)
    point.merges_per_second = round(middle_rate(merge_times), 2)
    latencies = [t["endTime"] - t["startTime"] for t in tasks_done]
    point.p50_ms = round(quantile(latencies, 0.5))
    point.p95_ms = round(quantile(latencies, 0.95))
    start, end, _ = middle_window(ends)
    cpu, point.machine_busy, seconds = window_cpu(sampler.samples, start, end)
    done = sum(1 for t in ends if sampler_span(sampler.samples, start, end, t))
    if done and seconds > 0:
        point.cpu_ms_per_task = {k: round(v * 1000 / done, 1) for k, v in cpu.items()}
        per_task = sum(cpu.values()) / done
        point.cpu_bound_tasks_per_second = round((os.cpu_count() or 1) / per_task, 2)
    point.limit = limit_of(point.merges_per_second, ceiling, point.machine_busy)
    lakefs.close()
    log(f"[scale] {json.dumps(asdict(point))}")
    return point


# -- the branch's own ceiling -----------------------------------------------------------------


@dataclass
class Ceiling:
    threads: int
    merges: int
    merges_per_second: float
    retries: int  # transient answers (429 of a contended branch, timeouts) retried


def merge_ceiling(
    endpoints: Endpoints, workdir: Path, *, merges: int, threads: Sequence[int], suffix: str
) -> list[Ceiling]:
    """Merges/s into one branch from each thread count, nothing else running.

    `merges` branches off the seed, one one-file commit each, are prepared once (not timed);
    each thread count merges all of them into a branch of its own made from the seed, its
    threads split over the lakeFS servers. Transient answers are retried as the publish
    fence does (backoff with jitter) and counted."""
    clients = [
        LakeFS(url, endpoints.lakefs_access_key_id, endpoints.lakefs_secret_access_key)
        for url in endpoints.lakefs_urls
    ]
    repository = f"scale-{suffix.replace('_', '-')}-ceiling"
    folder = workdir / "ceiling"
    folder.mkdir(parents=True, exist_ok=True)
    base = seed(clients[0], repository, folder)
    payload = folder / "one.txt"
    payload.write_text("x" * 64)

    def prepare(i: int) -> str:
        lakefs = clients[i % len(clients)]
        name = f"src-{i:05d}"
        lakefs.create_branch(repository, name, base, hidden=False)
        lakefs.upload(repository, name, f"s/out/c{i:05d}.txt", payload)
        lakefs.commit(repository, name, f"one file {i}", {})
        return name

    with ThreadPoolExecutor(8) as pool:
        sources = list(pool.map(prepare, range(merges)))
    results = []
    for count in threads:
        target = f"into-{count}"
        clients[0].create_branch(repository, target, base, hidden=False)
        began = time.monotonic()
        retries = merge_all(clients, repository, sources, target, count)
        seconds = time.monotonic() - began
        results.append(Ceiling(count, merges, round(merges / seconds, 2), retries))
    for client in clients:
        client.close()
    return results


def merge_all(
    clients: Sequence[LakeFS], repository: str, sources: Sequence[str], target: str, threads: int
) -> int:
    """Merge every source into `target` from `threads` threads; the transient answers retried."""
    retries = 0
    lock = threading.Lock()

    def merge(i: int) -> None:
        nonlocal retries
        lakefs = clients[i % len(clients)]
        delay = 0.2
        while True:
            try:
                lakefs.merge(repository, sources[i], target, "m", {}, retry=False)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                with lock:
                    retries += 1
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(5.0, delay * 2)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(merge, range(len(sources))))
    return retries


# -- report -----------------------------------------------------------------------------------


@dataclass
class ScaleReport:
    command: str
    started_utc: str
    finished_utc: str = ""
    machine: str = ""
    stack: str = ""
    points: list[Point] = field(default_factory=list)
    ceiling: list[Ceiling] = field(default_factory=list)

    @property
    def best_ceiling(self) -> float:
        return max((c.merges_per_second for c in self.ceiling), default=0.0)

    @property
    def problems(self) -> list[str]:
        return [f"p{p.processes}r{p.repeat}: {x}" for p in self.points for x in p.problems]

    def medians(self) -> list[Point]:
        """One point per process count: the median of its repeats (retries summed)."""
        return [median_point(ps) for _, ps in sorted(by_processes(self.points).items())]

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def by_processes(points: Sequence[Point]) -> dict[int, list[Point]]:
    groups: dict[int, list[Point]] = {}
    for point in points:
        groups.setdefault(point.processes, []).append(point)
    return groups


def median_point(points: Sequence[Point]) -> Point:
    """The repeats of one process count as one point: medians of the figures, sums of the
    retries and problems, the limit of the median run (by tasks/s)."""
    mid = sorted(points, key=lambda p: p.tasks_per_second)[(len(points) - 1) // 2]

    def med(get: Callable[[Point], float]) -> float:
        return round(statistics.median(get(p) for p in points), 2)

    classes = sorted({k for p in points for k in p.cpu_ms_per_task})
    return dataclasses.replace(
        mid,
        drain_seconds=med(lambda p: p.drain_seconds),
        tasks_per_second=med(lambda p: p.tasks_per_second),
        merges_per_second=med(lambda p: p.merges_per_second),
        p50_ms=med(lambda p: p.p50_ms),
        p95_ms=med(lambda p: p.p95_ms),
        merge_retries=sum(p.merge_retries for p in points),
        lakefs_retries=sum(p.lakefs_retries for p in points),
        cpu_ms_per_task={
            k: round(statistics.median(p.cpu_ms_per_task.get(k, 0.0) for p in points), 1)
            for k in classes
        },
        machine_busy=med(lambda p: p.machine_busy),
        cpu_bound_tasks_per_second=med(lambda p: p.cpu_bound_tasks_per_second),
        problems=[x for p in points for x in p.problems],
    )


def report_from_json(text: str) -> ScaleReport:
    """A report `as_json` wrote, back as objects (to redraw its table and chart)."""
    data = json.loads(text)
    points = [Point(**p) for p in data.pop("points")]
    ceiling = [Ceiling(**c) for c in data.pop("ceiling")]
    return ScaleReport(**data, points=points, ceiling=ceiling)


def markdown(report: ScaleReport) -> str:
    """The tables docs/benchmarks.md shows: the medians per process count (every repeat's
    tasks/s beside them), then the branch's ceiling."""
    groups = by_processes(report.points)
    medians = report.medians()
    classes = sorted({k for p in medians for k in p.cpu_ms_per_task})
    lines = [
        "| processes x slots | tasks/s (each repeat) | merges/s | p50 ms | p95 ms "
        "| merge retries | lakeFS retries | machine busy | CPU ms per task ("
        + ", ".join(classes)
        + ") | CPU bound, tasks/s | limit |",
        "|" + "---|" * 11,
    ]
    for p in medians:
        runs = ", ".join(f"{r.tasks_per_second}" for r in groups[p.processes])
        per_task = " / ".join(f"{p.cpu_ms_per_task.get(k, 0.0):.1f}" for k in classes)
        lines.append(
            f"| {p.processes} x {p.concurrency} | {p.tasks_per_second} ({runs}) "
            f"| {p.merges_per_second} | {p.p50_ms:.0f} | {p.p95_ms:.0f} | {p.merge_retries} "
            f"| {p.lakefs_retries} | {p.machine_busy:.0%} | {per_task} "
            f"| {p.cpu_bound_tasks_per_second} | {p.limit} |"
        )
    lines += ["", "| merge ceiling: threads | merges | merges/s | retried 429/timeouts |"]
    lines.append("|---|---|---|---|")
    for c in report.ceiling:
        lines.append(f"| {c.threads} | {c.merges} | {c.merges_per_second} | {c.retries} |")
    return "\n".join(lines) + "\n"


def chart(report: ScaleReport, path: Path) -> None:
    """Throughput and latency against processes, the branch's ceiling as a line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report.medians()
    xs = [p.processes for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    panels = (
        (left, "Throughput into one branch (median)", "per second",
         (("tasks/s", "o-", [p.tasks_per_second for p in points]),
          ("merges/s", "s--", [p.merges_per_second for p in points]),
          ("CPU bound: cores / CPU per task", "^:", [p.cpu_bound_tasks_per_second for p in points]))),
        (right, "Task latency (median)", "ms in the worker (poll to completion)",
         (("p50", "o-", [p.p50_ms for p in points]),
          ("p95", "s--", [p.p95_ms for p in points]))),
    )  # fmt: skip
    for c, style in zip(report.ceiling, ("-", "--", "-.", ":"), strict=False):
        left.axhline(
            c.merges_per_second,
            color="grey",
            linestyle=style,
            linewidth=0.8,
            label=f"branch merge ceiling, {c.threads} thread{'s' if c.threads > 1 else ''}",
        )
    for axes, title, ylabel, series in panels:
        for label, style, ys in series:
            axes.plot(xs, ys, style, label=label)
        axes.set_title(title)
        axes.set_xlabel("worker processes")
        axes.set_ylabel(ylabel)
        axes.set_xscale("log", base=2)
        axes.set_xticks(xs, [str(x) for x in xs])
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=7, loc="center right")
    fig.suptitle(report.stack, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return f"{cpu}, {os.cpu_count()} cores; load average at start {load[0]:.2f}"


# -- entry ------------------------------------------------------------------------------------


def run_scale(
    endpoints: Endpoints,
    workdir: Path,
    *,
    processes: Sequence[int],
    tasks: int,
    concurrency: int,
    ceiling_merges: int,
    repeats: int = 1,
    command: str = "",
    log: Callable[[str], None] = print,
) -> ScaleReport:
    report = ScaleReport(command=command, started_utc=now_utc(), machine=machine())
    report.stack = (
        f"{len(endpoints.conductor_urls)} Conductor ({endpoints.conductor_persistence}), "
        f"{len(endpoints.lakefs_urls)} lakeFS, "
        f"{'S3 store' if endpoints.store else 'local blockstore'}"
    )
    suffix = uuid.uuid4().hex[:6]
    os.environ["PERAGO_SCALE_SUFFIX"] = suffix
    import importlib

    app_module = importlib.reload(scale_app)
    conductor = Conductor(endpoints.conductor_url)
    register_app(conductor, app_module.app, retries=app_module.RETRIES)
    conductor.register_workflow(app_module.workflow(suffix))
    if ceiling_merges > 0:
        report.ceiling = merge_ceiling(
            endpoints, workdir, merges=ceiling_merges, threads=CEILING_THREADS, suffix=suffix
        )
        log(f"[scale] ceiling {[asdict(c) for c in report.ceiling]}")
    for repeat in range(repeats):
        # Rotated each repeat, so no process count always runs first (on the coldest caches).
        shift = repeat % len(processes)
        for count in [*processes[shift:], *processes[:shift]]:
            point = run_point(
                endpoints,
                workdir / f"r{repeat}",
                processes=count,
                tasks=tasks,
                concurrency=concurrency,
                suffix=suffix,
                ceiling=report.best_ceiling,
                repeat=repeat,
                log=log,
            )
            report.points.append(point)
    report.finished_utc = now_utc()
    return report


@contextlib.contextmanager
def stack_for(args: argparse.Namespace) -> Iterator[Endpoints]:
    if args.stack_from_env:
        endpoints = endpoints_from_env(os.environ)
        if endpoints is None:
            raise SystemExit("--stack-from-env: PERAGO_TEST_LAKEFS_URL / _CONDUCTOR_URL unset")
        yield endpoints
        return
    stack = start_stack(Path(args.start_stack) / "stack", blockstore="s3", conductor="postgres")
    try:
        yield stack.endpoints
    finally:
        stack.stop()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stack-from-env", action="store_true", help="a running stack")
    where.add_argument("--start-stack", metavar="DIR", help="start the Postgres stack in DIR")
    where.add_argument(
        "--from-report", metavar="FILE", help="no run: the table and chart of a JSON report"
    )
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated points")
    parser.add_argument("--tasks", type=int, default=400, help="one-file tasks per point")
    parser.add_argument("--concurrency", type=int, default=4, help="slots per worker process")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every point (median)")
    parser.add_argument("--ceiling-merges", type=int, default=200, help="0 skips the ceiling")
    parser.add_argument("--workdir", default=None, help="worker folders (default: DIR or /tmp)")
    parser.add_argument("--report", default=None, help="write the JSON report here")
    parser.add_argument("--markdown", default=None, help="write the Markdown table here")
    parser.add_argument("--chart", default=None, help="write the PNG chart here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the `finally` blocks stop the workers and the stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = shlex.join([".venv/bin/python", "bench/scale.py", *(argv or sys.argv[1:])])
    if args.from_report:
        report = report_from_json(Path(args.from_report).read_text())
    else:
        report = measure(args, command)
    if args.report and not args.from_report:
        Path(args.report).write_text(report.as_json() + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    if args.chart:
        chart(report, Path(args.chart))
    print(markdown(report))
    for problem in report.problems[:60]:
        print(f"  problem: {problem}")
    return 0 if not report.problems else 1


def measure(args: argparse.Namespace, command: str) -> ScaleReport:
    base = Path(args.workdir or args.start_stack or "/tmp")
    workdir = base / f"scale-{uuid.uuid4().hex[:6]}"
    with stack_for(args) as endpoints:
        return run_scale(
            endpoints,
            workdir,
            processes=[int(x) for x in args.processes.split(",")],
            tasks=args.tasks,
            concurrency=args.concurrency,
            ceiling_merges=args.ceiling_merges,
            repeats=args.repeat,
            command=command,
        )


if __name__ == "__main__":
    raise SystemExit(main())
