"""The chaos soak at CI size: about 200 tasks through 4 workers killed every few seconds,
with one restart each of Conductor, lakeFS and the object store (bench/chaos.py).

It starts a stack of its own (S3-backed, Conductor with its workflow execution lock, as
`bench/chaos.py --start-stack` does): it restarts the servers, and the session's stack may be
external or on the local blockstore. Skipped when the servers are external
(`PERAGO_TEST_*_URL`), as the session's `stack` fixture is. The full size (>= 1,000 tasks)
is a documented command whose last result is in docs/operations.md ("Chaos soak").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from perago_worker.devstack.servers import Stack, endpoints_from_env

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chaos import run_soak, start_soak_stack

pytestmark = [pytest.mark.faults, pytest.mark.slow]

TASKS = int(os.environ.get("PERAGO_CHAOS_TASKS", "200"))
SEED = int(os.environ.get("PERAGO_CHAOS_SEED", "7"))


@pytest.fixture(scope="module")
def soak_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if endpoints_from_env(os.environ) is not None:
        pytest.skip("servers are external (PERAGO_TEST_*_URL); cannot restart them")
    stack = start_soak_stack(tmp_path_factory.mktemp("chaos-stack"))
    try:
        yield stack
    finally:
        stack.stop()


def test_chaos_soak_keeps_every_guarantee(soak_stack: Stack, tmp_path: Path) -> None:
    report = run_soak(
        soak_stack.endpoints,
        tmp_path / "workers",
        stack=soak_stack,
        tasks=TASKS,
        workers=4,
        duration_limit=120,
        settle_limit=240,
        kill_every=4.0,
        seed=SEED,
        command=f"pytest tests/chaos (tasks={TASKS}, seed={SEED})",
    )
    (tmp_path / "chaos-report.json").write_text(report.as_json())
    print(report.summary())
    report.raise_for_problems()
    assert report.kills >= 5, report.summary()
    restarted = sorted(r["detail"].split()[0] for r in report.restarts)
    assert restarted == ["conductor", "lakefs", "objectstore"], report.restarts
    # The Conductor restart falls in the 120 s start phase and no workflow starts while it
    # lasts (102 s measured here), so fewer than the planned tasks may start.
    assert report.tasks >= 50, report.summary()
    assert report.conflicts >= 1, report.summary()
