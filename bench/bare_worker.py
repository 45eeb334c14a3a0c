"""The reference worker for the task benchmarks: poll, complete at once with empty output.

No workspace, no lakeFS, no fences, no lease keeping: the floor any Conductor worker pays
(a long poll and an update per task). It uses the same Conductor adapter, poll batch (1)
and poll timeout as the perago worker, so the difference between the two is perago's own
work per task. Runs until SIGTERM/SIGINT; writes `--ready-file` once every thread polled.

    python bench/bare_worker.py --url http://127.0.0.1:PORT/api --task bench_bare --threads 4
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from conductor.client.http.models.task_result import TaskResult

from perago_worker.conductor import Conductor


def serve(
    url: str,
    task: str,
    worker_id: str,
    poll_timeout_ms: int,
    stop: threading.Event,
    polled: threading.Barrier,
) -> None:
    conductor = Conductor(url)
    first = True
    while not stop.is_set():
        try:
            tasks = conductor.batch_poll(task, worker_id, None, 1, poll_timeout_ms)
        except Exception as exc:  # an outage: wait it out like a real worker
            print(f"bare_worker: poll failed: {exc}", file=sys.stderr, flush=True)
            stop.wait(0.5)
            continue
        if first:
            first = False
            polled.wait()
        for t in tasks:
            conductor.update(
                TaskResult(
                    workflow_instance_id=t.workflow_instance_id,
                    task_id=t.task_id,
                    status="COMPLETED",
                    output_data={},
                    worker_id=worker_id,
                )
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="Conductor API root, ending in /api")
    parser.add_argument("--task", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--poll-timeout-ms", type=int, default=500)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker_id = f"bare-{os.getpid()}"
    polled = threading.Barrier(args.threads + 1)
    threads = [
        threading.Thread(
            target=serve,
            args=(args.url, args.task, f"{worker_id}-{i}", args.poll_timeout_ms, stop, polled),
            daemon=True,
        )
        for i in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    try:
        polled.wait(timeout=60)
    except threading.BrokenBarrierError:
        print("bare_worker: threads did not poll within 60 s", file=sys.stderr)
        return 1
    if args.ready_file is not None:
        args.ready_file.write_text(str(os.getpid()))
    while not stop.wait(0.2):
        pass
    deadline = time.monotonic() + args.poll_timeout_ms / 1000 + 10
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
