"""Integration fixtures: an in-process worker on the real servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from perago_testing import InProcessWorker, make_settings
from perago_worker.app import Worker
from perago_worker.attempt import Deps
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app
from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS
from perago_worker.runner import Lifecycle, Runner


@pytest.fixture(scope="module")
def start_worker(
    endpoints: Endpoints,
    lakefs: LakeFS,
    conductor: Conductor,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., InProcessWorker]]:
    """Start an in-process worker serving `app` (task definitions registered, retries 0)."""
    started: list[Runner] = []

    def start(app: Worker, retries: int = 0, **overrides: Any) -> InProcessWorker:
        settings = make_settings(endpoints, tmp_path_factory.mktemp("scratch"), **overrides)
        register_app(conductor, app, retries=retries)
        runner = Runner(app, Deps(settings, lakefs, conductor), Lifecycle())
        runner.lifecycle.preflight_ok = True
        runner.start()
        started.append(runner)
        return InProcessWorker(runner, settings, conductor, app)

    yield start
    for runner in started:
        runner.drain()
