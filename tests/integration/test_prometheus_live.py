"""What a platform engineer sees: a real Prometheus scraping a real worker.

Prometheus (the `prometheus` binary; Debian's package, which `scripts/test` installs for
promtool) runs on loopback with second-long scrape and evaluation intervals and the alert
rules of deploy/prometheus/alerts.yaml. It scrapes a `perago-worker run` process: the target
is up, every rule loads and evaluates without error, a healthy worker trips none, every query
of the Grafana dashboard and the autoscaling query run on what it scraped, the queue depth
counts the tasks waiting in Conductor, and a worker stopped on purpose (SIGSTOP: a hung
process) makes PeragoWorkerDown go pending. Skipped when no prometheus binary is installed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import health_app
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict

from metric_names import ROOT, exposed_series, queries, referenced_metrics, runnable
from perago_testing import one_task_workflow, suffix, wait_until
from perago_worker.app import Worker
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app, wait_for_workflow
from perago_worker.devstack.servers import Endpoints, free_port
from perago_worker.devstack.worker_process import WorkerProcess, start_worker

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no prometheus binary on PATH (Debian: apt-get install prometheus; "
        "scripts/test installs it best effort)",
    ),
]

S = suffix()
HERE = Path(__file__).parent
APP = "health_app:app"
TASK = f"healthnap_{S}"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
HPA = ROOT / "deploy" / "kubernetes" / "hpa.yaml"
JOB = "perago-worker"
# The lease of a running task is extended every max(1 s, factor x response timeout): 3 s of
# the default 300 s, so the queue depth test sees extensions while tasks wait.
LEASE_FACTOR = "0.01"


class Prometheus:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return found

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def worker_env(**extra: str) -> dict[str, str]:
    return {
        "PYTHONPATH": str(HERE),
        "PERAGO_TEST_SUFFIX": S,
        "PERAGO_CONCURRENCY": "1",  # one slot: a second task waits in Conductor's queue
        "PERAGO_QUEUE_DEPTH_EVERY_SECONDS": "0.5",
        "PERAGO_LEASE_FACTOR": LEASE_FACTOR,
        **extra,
    }


@pytest.fixture(scope="module")
def registered(conductor: Conductor) -> None:
    app = Worker()
    app.task(TASK)(health_app.nap)
    register_app(conductor, app, retries=0)


@pytest.fixture(scope="module")
def worker(
    endpoints: Endpoints, registered: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    proc = start_worker(APP, endpoints, tmp_path_factory.mktemp("prom-worker"), env=worker_env())
    yield proc
    proc.signal(signal.SIGCONT)
    proc.stop()


@pytest.fixture(scope="module")
def prometheus(
    worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "500ms", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{worker.port}"]}]}
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Prometheus(proc, port, log)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return proc.poll() is not None  # died: stop waiting, the assert says why

    try:
        assert wait_until(ready, timeout=60), server.tail()
        assert proc.poll() is None, f"prometheus exited:\n{server.tail()}"
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def alert_names() -> set[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_prometheus_scrapes_the_worker_and_evaluates_every_alert_rule(
    prometheus: Prometheus, worker: WorkerProcess
) -> None:
    assert wait_until(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1.0, timeout=30), (
        prometheus.api("targets")
    )
    [target] = prometheus.api("targets")["activeTargets"]
    assert target["health"] == "up" and target["scrapeUrl"].endswith("/metrics")
    assert prometheus.value(f'perago_worker_state{{job="{JOB}", state="running"}}') == 1.0

    def rules() -> list[dict[str, Any]]:
        return [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]

    # Every rule of the file is loaded, and each has been evaluated without an error.
    assert wait_until(lambda: all(r["health"] == "ok" for r in rules()), timeout=30), rules()
    assert {r["name"] for r in rules() if r["type"] == "alerting"} == alert_names()
    assert all(not r.get("lastError") for r in rules())
    # A healthy worker trips none of them.
    time.sleep(3)
    assert prometheus.alerts() == []


def test_every_dashboard_query_runs_on_what_prometheus_scraped(
    prometheus: Prometheus, worker: WorkerProcess, conductor: Conductor
) -> None:
    # One task end to end, so the outcome, phase and poll series hold samples.
    name = one_task_workflow(conductor, TASK, ["params"])
    run = wait_for_workflow(conductor, conductor.start_workflow(name, {"params": {"seconds": 0}}))
    assert run.status == "COMPLETED", worker.tail()
    done = f'sum(perago_tasks_total{{job="{JOB}", task_type="{TASK}", status="COMPLETED"}})'
    assert wait_until(lambda: (prometheus.value(done) or 0) >= 1, timeout=30)

    # What the live worker declares on /metrics: every metric a query names is there.
    status, text = worker.get("/metrics")
    assert status == 200
    exposed = exposed_series(text)
    for where, expr in queries():
        missing = referenced_metrics(expr) - exposed
        assert missing == set(), f"{where}: the worker does not export {missing}"

    for where, expr in queries():
        if expr.startswith("label_values("):  # a Grafana function: ask Prometheus's label API
            metric, label = (s.strip() for s in expr.removeprefix("label_values(")[:-1].split(","))
            values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
            assert TASK in values, where
            continue
        prometheus.query(runnable(expr))  # a query Prometheus refuses fails here, naming it

    # Panels that must show this worker's data do.
    outcome = next(e for w, e in queries() if w == "panel 'Tasks by outcome'")
    mine = runnable(outcome).replace(".*", TASK)

    def outcomes() -> set[tuple[str, str]]:  # a rate needs two scrapes of the counter
        return {(r["metric"]["status"], r["metric"]["kind"]) for r in prometheus.query(mine)}

    assert wait_until(lambda: ("COMPLETED", "ok") in outcomes(), timeout=30), outcomes()
    age = prometheus.value(f'time() - perago_last_poll_timestamp_seconds{{job="{JOB}"}}')
    assert age is not None and age < 60


def test_the_queue_depth_counts_the_tasks_waiting_in_conductor(
    prometheus: Prometheus, worker: WorkerProcess, conductor: Conductor
) -> None:
    depth = f'max by (task_type) (perago_queue_depth{{job="{JOB}", task_type="{TASK}"}})'
    assert wait_until(lambda: prometheus.value(depth) == 0.0, timeout=30)
    name = one_task_workflow(conductor, TASK, ["params"])
    busy = conductor.start_workflow(name, {"params": {"seconds": 15}})  # takes the one slot
    in_flight = f'sum(perago_attempts_in_flight{{job="{JOB}", task_type="{TASK}"}})'
    assert wait_until(lambda: prometheus.value(in_flight) == 1.0, timeout=30)
    waiting = [conductor.start_workflow(name, {"params": {"seconds": 0}}) for _ in range(3)]
    assert wait_until(lambda: prometheus.value(depth) == 3.0, timeout=12), prometheus.query(depth)
    # A lease extension (IN_PROGRESS with extendLease) does not put the running task back
    # in Conductor's queue: the gauge still counts only the three waiting (an IN_PROGRESS
    # update without extendLease would re-queue it, and the depth would read 4).
    extended = f'sum(perago_lease_extensions_total{{job="{JOB}", task_type="{TASK}", result="ok"}})'
    assert wait_until(lambda: (prometheus.value(extended) or 0.0) >= 1.0, timeout=12)
    time.sleep(1.5)  # a gauge read (0.5 s) and a scrape (1 s) after the extension
    assert prometheus.value(depth) == 3.0, prometheus.query(depth)
    assert conductor.queue_sizes([TASK], None) == {TASK: 3}

    # The autoscaling query, on this Prometheus's labels: the demand is 1 in flight + 3 queued.
    scaler = yaml.safe_load(HPA.read_text())
    query = scaler["spec"]["triggers"][0]["metadata"]["query"]
    local = query.replace('namespace="perago", pod=~"perago-worker-.*"', f'job="{JOB}"')
    assert local != query
    assert prometheus.value(local) == 4.0

    for workflow_id in [busy, *waiting]:
        assert wait_for_workflow(conductor, workflow_id).status == "COMPLETED"
    assert wait_until(lambda: prometheus.value(depth) == 0.0, timeout=30)


def test_a_stopped_worker_makes_its_alert_go_pending(
    prometheus: Prometheus, worker: WorkerProcess
) -> None:
    instance = f"127.0.0.1:{worker.port}"
    worker.signal(signal.SIGSTOP)  # hung: the process is there, its port answers nothing
    try:
        assert wait_until(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 0.0, timeout=30)

        def pending() -> list[dict[str, Any]]:
            return [
                a
                for a in prometheus.alerts()
                if a["labels"]["alertname"] == "PeragoWorkerDown" and a["state"] == "pending"
            ]

        assert wait_until(lambda: bool(pending()), timeout=30), prometheus.alerts()
        [alert] = pending()
        assert alert["labels"]["instance"] == instance
        assert alert["labels"]["job"] == JOB and alert["labels"]["severity"] == "critical"
    finally:
        worker.signal(signal.SIGCONT)
    # Answering again, it clears.
    assert wait_until(lambda: prometheus.value(f'up{{job="{JOB}"}}') == 1.0, timeout=30)
    assert wait_until(lambda: prometheus.alerts() == [], timeout=30), prometheus.alerts()


def test_with_processes_one_child_alone_reads_the_queue_depth(
    endpoints: Endpoints, registered: None, tmp_path: Path
) -> None:
    folder = tmp_path / "metrics"
    env = worker_env(PROMETHEUS_MULTIPROC_DIR=str(folder))
    multi = start_worker(APP, endpoints, tmp_path / "multi", env=env, args=("--processes", "3"))
    try:
        assert wait_until(
            lambda: f'perago_queue_depth{{task_type="{TASK}"}}' in multi.get("/metrics")[1],
            timeout=30,
        ), multi.tail()
        time.sleep(2)  # several reads later: a second reader would have written by now

        def readers() -> set[str]:
            found = set()
            for path in folder.glob("gauge_livemax_*.db"):
                values = MmapedDict(str(path), read_mode=True)
                try:
                    keys = [key for key, _, _ in values.read_all_values()]
                finally:
                    values.close()
                if any(json.loads(key)[0] == "perago_queue_depth" for key in keys):
                    found.add(path.stem.rsplit("_", 1)[1])
            return found

        pids = readers()
        assert len(pids) == 1, pids
        assert int(next(iter(pids))) != multi.proc.pid, "a child reads it, not the supervisor"
    finally:
        multi.stop()
