"""Many concurrent I/O-bound tasks on one worker process: `async def` vs `def` handlers.

    source /tmp/stack.env   # a running stack (python -m perago_worker.devstack up ...)
    .venv/bin/python bench/async_io.py [--tasks 400] [--concurrency 400] [--seconds 2] [--out FILE]

One in-process worker serves both task types with `concurrency` slots each. For each kind,
`tasks` workspace-free workflows are started at once; every handler waits `seconds` in four
sequential steps (`asyncio.sleep` or `time.sleep`: what a handler waiting on a network call
does). Reported per kind: wall time from the first start to the last completion, tasks/s,
the p50/p95 of each task's own time as Conductor recorded it (`endTime - startTime`), the
most threads the worker process had at once, and its resident memory growth (VmRSS). The
kinds alternate for `rounds` rounds, so neither pays the worker's warm-up alone.
An async handler waits on the worker's one event loop; a sync one on a handler thread of
its own (every attempt has a deadline, so the handler runs beside the attempt's thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per kind")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from perago_worker.devstack.servers import endpoints_from_env

    endpoints = endpoints_from_env(os.environ)
    if endpoints is None:
        print("needs a running stack: source the env file `devstack up` printed", file=sys.stderr)
        return 2

    from async_app import build
    from perago_testing import make_settings, one_task_workflow
    from perago_worker.attempt import Deps
    from perago_worker.conductor import Conductor
    from perago_worker.devstack.demo import register_app, wait_for_workflow
    from perago_worker.lakefs import LakeFS
    from perago_worker.observability import logging as plog
    from perago_worker.runner import Lifecycle, Runner

    plog.configure("WARNING")
    suffix = uuid.uuid4().hex[:6]
    app = build(suffix)
    conductor = Conductor(endpoints.conductor_url)
    lakefs = LakeFS(
        endpoints.lakefs_url, endpoints.lakefs_access_key_id, endpoints.lakefs_secret_access_key
    )
    register_app(conductor, app, retries=0)
    settings = make_settings(
        endpoints,
        Path(os.environ.get("TMPDIR", "/tmp")) / f"async-bench-{suffix}",
        concurrency=args.concurrency,
        poll_batch=100,
        poll_timeout_ms=100,
        log_level="WARNING",
    )
    runner = Runner(app, Deps(settings, lakefs, conductor), Lifecycle())
    runner.lifecycle.preflight_ok = True
    runner.start()
    rows = []
    try:
        for kind in ("async", "sync") * args.rounds:
            task_type = f"io_{kind}_{suffix}"
            name = one_task_workflow(conductor, task_type, ["params"])
            peak = {"threads": threading.active_count()}
            stop = threading.Event()

            def sample(peak: dict[str, int] = peak, stop: threading.Event = stop) -> None:
                while not stop.wait(0.05):
                    peak["threads"] = max(peak["threads"], threading.active_count())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            rss_before = rss_mib()
            threads_before = threading.active_count()
            params = {"seconds": args.seconds}
            started = time.monotonic()
            ids = [conductor.start_workflow(name, {"params": params}) for _ in range(args.tasks)]
            runs = [wait_for_workflow(conductor, wid, 600) for wid in ids]
            wall = time.monotonic() - started
            stop.set()
            sampler.join()
            done = [r for r in runs if r.status == "COMPLETED"]
            own = [float(r.tasks[0].end_time - r.tasks[0].start_time) / 1000 for r in done]
            rows.append(
                (
                    kind,
                    len(done),
                    wall,
                    len(done) / wall,
                    statistics.median(own),
                    percentile(own, 0.95),
                    peak["threads"] - threads_before,
                    rss_mib() - rss_before,
                )
            )
    finally:
        runner.drain()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Command: `{' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, load average {load}, Python {sys.version.split()[0]}); "
        f"{args.tasks} tasks of {args.seconds:g} s of waiting each, {args.concurrency} slots",
        "",
        "| handler | completed | wall | tasks/s | task p50 | task p95 | extra threads (peak) | RSS growth |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, n, wall, rate, p50, p95, threads, rss in rows:
        lines.append(
            f"| `{'async def' if kind == 'async' else 'def'}` | {n} | {wall:.1f} s | {rate:.1f} | "
            f"{p50:.2f} s | {p95:.2f} s | {threads} | {rss:+.0f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
