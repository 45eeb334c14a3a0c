"""`perago-worker run APP --processes N`: N worker processes behind one health port.

CPU-bound handlers hold the GIL; separate processes give them separate cores. The
supervisor runs the preflight once, starts the children (each with its own worker id, no
HTTP server), serves /healthz, /readyz and /metrics for all of them (prometheus-client's
multiprocess mode aggregates the children's metric files), forwards SIGTERM so every child
drains, restarts a child that dies, and exits 0 once all have drained. With `--gc-every`
(or `gc_every_seconds`) the supervisor alone runs the gc schedule; the children never do.
Only the first child reads Conductor's queue sizes (`queue_depth_every_seconds`), so a pod
sends one such request per interval however many processes it runs.

After SIGTERM the supervisor waits up to `drain_grace_seconds + DRAIN_MARGIN_SECONDS` for
its children (their grace plus the last long poll), then kills the stragglers and exits 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from perago_worker.settings import Settings

# Beyond `drain_grace_seconds`, how long the supervisor waits for its children to drain
# before it kills them: with the default grace (60 s) it is done within the 90 s of
# deploy/kubernetes/deployment.yaml's terminationGracePeriodSeconds.
DRAIN_MARGIN_SECONDS = 15.0
# Set to 0 for every child but the first: one process per pod reads Conductor's queue sizes.
QUEUE_DEPTH_ENV = "PERAGO_QUEUE_DEPTH_EVERY_SECONDS"


def child_env(
    environ: Mapping[str, str], index: int, worker_id: str, multiproc: str
) -> dict[str, str]:
    """The environment of child `index`: its own worker id, the shared metrics folder, and
    for every child but the first the queue-depth reader turned off (one reader per pod)."""
    env = {
        **environ,
        "PERAGO_WORKER_ID": f"{worker_id}-p{index}",
        "PROMETHEUS_MULTIPROC_DIR": multiproc,
    }
    if index > 0:
        env[QUEUE_DEPTH_ENV] = "0"
    return env


def supervise(
    app: str,
    settings: Settings,
    *,
    processes: int,
    skip_preflight: bool,
    config: str | None,
    gc_every: float = 0.0,
) -> int:
    multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="perago-metrics-"
    )
    Path(multiproc).mkdir(parents=True, exist_ok=True)
    for stale in Path(multiproc).glob("*.db"):  # an earlier run's processes, not ours
        if not stale.stem.endswith(f"_{os.getpid()}"):
            stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc

    from prometheus_client import multiprocess

    from perago_worker.compose import CliError, clients, load_worker
    from perago_worker.gc import PeriodicGc, schedule
    from perago_worker.observability import logging as plog
    from perago_worker.observability.health import HealthServer
    from perago_worker.preflight import preflight_clients, run_preflight
    from perago_worker.runner import Lifecycle

    plog.configure(settings.log_level, settings.log_format, plog.secret_values(settings))
    log = plog.get_logger(supervisor=settings.worker_id)
    lifecycle = Lifecycle()
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = threading.Event()

    def child_alive() -> dict[str, object]:
        return {"processes": {i: p.poll() is None for i, p in children.items()}}

    health = HealthServer(settings.http_host, settings.http_port, lifecycle, child_alive)
    health.start()
    lifecycle.set("validating")
    worker = load_worker(app)
    if skip_preflight:
        lifecycle.preflight = "skipped"  # as `run` without --processes reports it
    else:
        results = run_preflight(settings, worker, *preflight_clients(settings))
        failed = [r for r in results if r.ok is False]
        if failed:
            cause = f"preflight failed: {failed[0].name}: {failed[0].detail}"
            lifecycle.preflight = "failed"
            lifecycle.fail(cause)
            raise CliError(cause)
        lifecycle.preflight = "passed"

    def spawn(index: int) -> subprocess.Popen[bytes]:
        env = child_env(os.environ, index, settings.worker_id, multiproc)
        cmd = [sys.executable, "-m", "perago_worker.cli"]
        if config:
            cmd += ["--config", config]
        cmd += ["run", app, "--skip-preflight", "--child"]
        return subprocess.Popen(cmd, env=env)

    for index in range(processes):
        children[index] = spawn(index)
    lifecycle.set("running")
    log.info("supervisor.running", processes=processes, http_port=health.port)
    periodic_gc: PeriodicGc | None = None
    if gc_every > 0:
        gc_lakefs, gc_conductor = clients(settings)
        periodic_gc = schedule(
            settings, gc_lakefs, gc_conductor, every=gc_every, log=log, stop_when=stopping.is_set
        )

    signals_seen = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if signals_seen > 1 else signal.SIGTERM)
        if signals_seen > 1:
            os._exit(130)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        for index, proc in list(children.items()):
            if proc.poll() is not None:  # died without being asked: restart it
                multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                log.warning("supervisor.child_died", index=index, code=proc.returncode)
                time.sleep(1)
                children[index] = spawn(index)
    lifecycle.set("draining")
    # Children drain within their grace plus one long poll.
    deadline = time.monotonic() + settings.drain_grace_seconds + DRAIN_MARGIN_SECONDS
    if periodic_gc is not None:
        periodic_gc.stop()  # the children drain meanwhile
    code = 0
    for proc in children.values():
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = 1
        multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
    lifecycle.set("stopped")
    health.stop()
    log.info("supervisor.stopped", code=code)
    return code
