"""Prometheus metrics, one definition each; documented in docs/operations.md.

Every metric works when the worker runs several processes: with `PROMETHEUS_MULTIPROC_DIR`
set, prometheus-client writes per-process files and the gauges below declare how values of
live processes combine (summed in-flight attempts, the newest heartbeat, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

# Multiprocess mode writes one file per process into this folder; it must exist before the
# first metric is created (at import), so create it rather than fail on a fresh emptyDir.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)

from prometheus_client import Counter, Gauge, Histogram

PHASES = (
    "poll",
    "validate",
    "materialize",
    "pre_check",
    "handler",
    "post_check",
    "stage",
    "fence",
    "merge",
    "report",
)
STATES = ("starting", "validating", "running", "draining", "stopped", "failed")

TASKS = Counter("perago_tasks_total", "Attempts by final outcome.", ["task_type", "status", "kind"])
PHASE_SECONDS = Histogram(
    "perago_phase_seconds",
    "Duration of each pipeline phase.",
    ["task_type", "phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
FILES = Counter(
    "perago_files_total", "Files moved between lakeFS and local disk.", ["task_type", "direction"]
)
BYTES = Counter(
    "perago_bytes_total", "Bytes moved between lakeFS and local disk.", ["task_type", "direction"]
)
CACHE_HITS = Counter(
    "perago_cache_hits_total", "Objects materialized from the local object cache.", ["task_type"]
)
FENCE_REJECTIONS = Counter(
    "perago_fence_rejections_total",
    "Publishes stopped or redirected by a fence.",
    ["task_type", "fence", "kind"],
)
FENCE_WINDOW = Histogram(
    "perago_fence_window_seconds",
    "From the attempt fence's answer to the merge's answer: the window a fence cannot close.",
    ["task_type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
RETRIES = Counter("perago_retries_total", "Transient-fault retries of server calls.", ["server"])
IN_FLIGHT = Gauge(
    "perago_attempts_in_flight",
    "Attempts being processed.",
    ["task_type"],
    multiprocess_mode="livesum",
)
LEASE_EXTENSIONS = Counter(
    "perago_lease_extensions_total", "Lease extensions sent to Conductor.", ["task_type", "result"]
)
POLLS = Counter("perago_polls_total", "Batch polls by result.", ["task_type", "result"])
STATE = Gauge(
    "perago_worker_state",
    "1 for the lifecycle state the worker is in.",
    ["state"],
    multiprocess_mode="livemax",
)
LAST_POLL = Gauge(
    "perago_last_poll_timestamp_seconds",
    "Unix time of the last successful poll or lease extension (the heartbeat).",
    multiprocess_mode="max",
)
QUEUE_DEPTH = Gauge(
    "perago_queue_depth",
    "Tasks waiting in Conductor's queue to be polled, per task type (the worker's task domain).",
    ["task_type"],
    # One process reads it (with --processes N the first child); gone with that process.
    multiprocess_mode="livemax",
)
ABANDONED_THREADS = Gauge(
    "perago_abandoned_handler_threads",
    "Handler threads abandoned at their deadline that are still running (a thread cannot be "
    "killed).",
    multiprocess_mode="livesum",
)


def set_state(state: str) -> None:
    for name in STATES:
        STATE.labels(state=name).set(1 if name == state else 0)
