"""The queue-depth gauge: one request for every task type, domain-aware, on a watched loop
that outlives Conductor's failures, read by one process per pod.

The real server's answers are covered by tests/integration/test_prometheus_live.py (tasks
waiting in Conductor counted through Prometheus, one reader among `--processes 3`).
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from pydantic import BaseModel

from perago_testing import wait_until
from perago_worker import supervisor
from perago_worker.app import Worker
from perago_worker.attempt import Deps
from perago_worker.conductor import Conductor
from perago_worker.context import TaskContext
from perago_worker.observability import metrics
from perago_worker.runner import Lifecycle, Runner
from perago_worker.settings import Settings


class FakeSizes:
    """conductor-python's TaskResourceApi.size: the queue names asked for, each answer."""

    def __init__(self, answers: list[Any]) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers

    def size(self, **kwargs: Any) -> Any:
        self.calls.append(list(kwargs["task_type"]))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def conductor_with(sizes: FakeSizes) -> Conductor:
    conductor = Conductor("http://conductor.invalid/api", retry_seconds=0)
    conductor.tasks = sizes  # type: ignore[assignment]
    return conductor


def test_one_request_asks_for_every_task_type_in_the_domain() -> None:
    sizes = FakeSizes([{"dom:a": 3, "dom:b": 0, "dom:other": 9}])
    got = conductor_with(sizes).queue_sizes(["a", "b"], "dom")
    assert sizes.calls == [["dom:a", "dom:b"]]
    assert got == {"a": 3, "b": 0}, "answers are mapped back to task types; strangers dropped"


def test_without_a_domain_the_queue_is_the_task_type() -> None:
    sizes = FakeSizes([{"a": 1}])
    assert conductor_with(sizes).queue_sizes(["a", "b"], None) == {"a": 1}
    assert sizes.calls == [["a", "b"]]
    assert conductor_with(sizes).queue_sizes([], None) == {}
    assert len(sizes.calls) == 1, "nothing to ask, no request"


class Empty(BaseModel):
    pass


class FakeConductor:
    request_timeout = 1.0

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.reads = 0

    def queue_sizes(self, names: list[str], domain: str | None, **_: Any) -> dict[str, int]:
        self.reads += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    def batch_poll(self, *args: Any) -> list[Any]:
        time.sleep(0.05)
        return []


def make_runner(tmp_path: Path, conductor: FakeConductor, every: float) -> Runner:
    app = Worker()

    @app.task(f"qd_{id(conductor)}")
    def noop(ctx: TaskContext, params: Empty) -> Empty:
        return params

    settings = Settings(
        scratch_root=tmp_path, queue_depth_every_seconds=every, poll_timeout_ms=0, http_port=0
    )
    return Runner(app, Deps(settings, None, conductor), Lifecycle())  # type: ignore[arg-type]


def gauge(task_type: str) -> float | None:
    assert metrics.QUEUE_DEPTH is not None
    return REGISTRY.get_sample_value("perago_queue_depth", {"task_type": task_type})


def test_the_reader_sets_the_gauge_survives_failures_and_is_watched(tmp_path: Path) -> None:
    fake = FakeConductor([{}])
    runner = make_runner(tmp_path, fake, every=0.05)
    [name] = runner.app.tasks
    fake.answers = [RuntimeError("Conductor 503: down"), {name: 7}, {name: 2}]
    runner.lifecycle.preflight_ok = True
    runner.start()
    try:
        assert "queue depth reader" in runner.lifecycle.loops
        assert wait_until(lambda: gauge(name) == 2.0, timeout=10), gauge(name)
        assert fake.reads >= 3, "the failed read did not end the loop"
        assert runner.lifecycle.problems() == []
        assert runner.health()["loops"]["queue depth reader"]["alive"] is True
    finally:
        runner.drain()
    reads = fake.reads
    time.sleep(0.3)
    assert fake.reads <= reads + 1, "the drain ends the reader"


def test_zero_turns_the_reader_off(tmp_path: Path) -> None:
    fake = FakeConductor([{}])
    runner = make_runner(tmp_path, fake, every=0)
    runner.lifecycle.preflight_ok = True
    runner.start()
    try:
        time.sleep(0.2)
        assert "queue depth reader" not in runner.lifecycle.loops
        assert fake.reads == 0
    finally:
        runner.drain()


def test_the_default_interval() -> None:
    assert Settings.model_fields["queue_depth_every_seconds"].default == 15.0


def test_only_the_first_supervised_child_reads_the_queue_depth() -> None:
    environ = {"PATH": "/bin", supervisor.QUEUE_DEPTH_ENV: "5"}
    envs = [supervisor.child_env(environ, i, "w", "/tmp/m") for i in range(3)]
    assert [e[supervisor.QUEUE_DEPTH_ENV] for e in envs] == ["5", "0", "0"]
    assert [e["PERAGO_WORKER_ID"] for e in envs] == ["w-p0", "w-p1", "w-p2"]
    assert all(e["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/m" and e["PATH"] == "/bin" for e in envs)
    assert "PERAGO_" + "queue_depth_every_seconds".upper() == supervisor.QUEUE_DEPTH_ENV
    first = supervisor.child_env({"PATH": "/bin"}, 0, "w", "/tmp/m")
    assert supervisor.QUEUE_DEPTH_ENV not in first, "the first child keeps the setting"


def test_a_stalled_reader_fails_liveness() -> None:
    from perago_worker.runner import STALL_FLOOR_SECONDS, Heartbeat

    now = [0.0]
    beat = Heartbeat("queue depth reader", 15.0, clock=lambda: now[0])
    beat.thread = threading.current_thread()
    now[0] = max(3 * 15.0, STALL_FLOOR_SECONDS) + 1
    assert beat.problem() is not None and "queue depth reader stalled" in str(beat.problem())


def test_the_health_table_quotes_the_readers_period_and_bound() -> None:
    from perago_worker import runner
    from perago_worker.runner import Heartbeat

    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    assert "| queue depth reader (when `queue_depth_every_seconds` > 0) |" in text
    assert "its 5 s of retries" in text and runner.QUEUE_DEPTH_RETRY_SECONDS == 5
    read = runner.call_bound(10.0, runner.QUEUE_DEPTH_RETRY_SECONDS)
    assert f"| {math.ceil(Heartbeat('q', read).bound)} s (45 s between reads) |" in text
    assert Heartbeat("q", 15.0).bound == 45.0
