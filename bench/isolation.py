"""What process isolation costs per task: a no-op handler in thread vs process mode.

    .venv/bin/python bench/isolation.py [--samples N] [--tasks N] [--out FILE]

Part 1 (no servers) times `invocation.run_handler`, the one step the two modes differ in,
with a deadline as every attempt has one: thread mode starts a handler thread and waits for
it; process mode forks a child from the fork server, sends it the call, gets the answer and
reaps it. Part 2 (only when `PERAGO_TEST_LAKEFS_URL` / `PERAGO_TEST_CONDUCTOR_URL` name a
running stack, e.g. `source /tmp/stack.env`) runs whole workspace-free tasks through an
in-process worker on the real servers, one at a time, and takes each task's time as
Conductor recorded it, from the poll that handed it out to the report (`endTime -
startTime`, in ms). Medians are reported with p90; ratio = process / thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The handler module must be importable by the fork server (which sees PYTHONPATH, not this
# process's sys.path), exactly as an installed handler package is.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p
)
sys.path.insert(0, str(HERE))


def summary(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return statistics.median(ordered), p90, statistics.fmean(ordered)


def part1(samples: int) -> dict[str, list[float]]:
    from isolation_app import Empty, build
    from perago_worker import invocation
    from perago_worker.app import load_app
    from perago_worker.context import TaskContext
    from perago_worker.settings import Settings

    settings = Settings(log_level="WARNING")
    build("bench")
    app = load_app("isolation_app:app")
    invocation.prepare(app.tasks.values(), settings)
    times: dict[str, list[float]] = {}
    for mode in ("thread", "process"):
        spec = app.tasks[f"iso_{mode}_bench"]
        runs: list[float] = []
        for i in range(samples + 5):
            ctx = TaskContext("t", "w", spec.name, "only", 0, 1, "bench", "dev")
            ctx.deadline = time.monotonic() + 60
            started = time.perf_counter()
            invocation.run_handler(spec, ctx, Empty(), settings)
            if i >= 5:  # warm-up (the fork server's first fork, caches) not counted
                runs.append((time.perf_counter() - started) * 1000)
        times[mode] = runs
    return times


def part2(tasks: int) -> dict[str, list[float]] | None:
    from perago_worker.devstack.servers import endpoints_from_env

    endpoints = endpoints_from_env(os.environ)
    if endpoints is None:
        return None
    sys.path.insert(0, str(HERE.parent / "tests"))
    from isolation_app import build
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
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"iso-bench-{suffix}"
    settings = make_settings(endpoints, scratch, poll_timeout_ms=100, log_level="WARNING")
    runner = Runner(app, Deps(settings, lakefs, conductor), Lifecycle())
    runner.lifecycle.preflight_ok = True
    runner.start()
    times: dict[str, list[float]] = {"thread": [], "process": []}
    try:
        for i in range(tasks + 3):
            for mode in ("thread", "process"):
                name = one_task_workflow(conductor, f"iso_{mode}_{suffix}", ["params"])
                run = wait_for_workflow(
                    conductor, conductor.start_workflow(name, {"params": {}}), 60
                )
                assert run.status == "COMPLETED", run.status
                [task] = run.tasks
                if i >= 3:
                    times[mode].append(float(task.end_time - task.start_time))
    finally:
        runner.drain()
    return times


def render(one: dict[str, list[float]], two: dict[str, list[float]] | None, argv: str) -> str:
    lines = [
        "| measured | thread p50 | process p50 | process - thread | ratio | thread p90 | process p90 | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, data in (("`run_handler`, no-op handler", one), ("whole workspace-free task", two)):
        if data is None:
            continue
        t50, t90, _ = summary(data["thread"])
        p50, p90, _ = summary(data["process"])
        lines.append(
            f"| {label} | {t50:.2f} ms | {p50:.2f} ms | +{p50 - t50:.2f} ms | "
            f"{p50 / t50:.1f}x | {t90:.2f} ms | {p90:.2f} ms | {len(data['thread'])} |"
        )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"Command: `{argv}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, load average {load}, Python {sys.version.split()[0]})\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="handler calls per mode")
    parser.add_argument("--tasks", type=int, default=30, help="whole tasks per mode (part 2)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    argv = " ".join([".venv/bin/python bench/isolation.py", *sys.argv[1:]])
    one = part1(args.samples)
    two = part2(args.tasks)
    text = render(one, two, argv)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
