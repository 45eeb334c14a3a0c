"""kill -9 at every phase boundary: the retry finishes the task and exactly one merge lands."""

from __future__ import annotations

import pytest

from conftest import Harness

pytestmark = pytest.mark.faults


@pytest.mark.parametrize(
    "point",
    ["poll.received", "materialize.object", "handler.start", "stage.committed", "merge.done"],
)
def test_worker_killed_at_a_phase_boundary_leaves_exactly_one_merge(
    harness: Harness, point: str
) -> None:
    doomed = harness.worker("doomed", faults=point)
    case = harness.start("ws", files=3)
    assert doomed.proc.wait(60) == -9, doomed.tail()
    harness.worker("survivor")
    run = harness.verify(case)
    if point == "merge.done":
        # The merge landed before the crash: the retry adopted it instead of merging again.
        assert len(run.tasks) >= 2
