"""When the lease keeper renews an in-flight attempt's lease (`runner.renews_lease`)."""

from __future__ import annotations

from typing import Any

from perago_worker.context import TaskContext
from perago_worker.runner import InFlight, renews_lease

NOW = 1_000.0
BOUND = 180.0  # merge_retry_seconds + 2 lakeFS request timeouts, by default


def _entry(*, deadline: float | None = None, next_lease: float = NOW - 1) -> InFlight:
    ctx = TaskContext("t", "w", "x", "x", 0, 1, "me", "dev", delivery_token="me#0123456789ab")
    ctx.deadline = deadline
    task: Any = object()
    return InFlight(task=task, spec=None, ctx=ctx, interval=5, next_lease=next_lease)  # type: ignore[arg-type]


def test_a_due_live_attempt_within_its_deadline_is_renewed() -> None:
    assert renews_lease(_entry(deadline=NOW + 10), NOW, BOUND)
    assert renews_lease(_entry(deadline=None), NOW, BOUND)


def test_an_attempt_not_yet_due_is_not_renewed() -> None:
    assert not renews_lease(_entry(next_lease=NOW + 1), NOW, BOUND)


def test_a_reported_attempt_is_never_renewed() -> None:
    entry = _entry()
    entry.reported = True
    assert not renews_lease(entry, NOW, BOUND)


def test_a_cancelled_attempt_is_never_renewed() -> None:
    entry = _entry()
    entry.ctx.cancel("superseded")
    assert not renews_lease(entry, NOW, BOUND)


def test_an_attempt_past_its_deadline_that_has_not_begun_to_publish_is_never_renewed() -> None:
    entry = _entry(deadline=NOW - 0.001)
    assert not renews_lease(entry, NOW, BOUND)


def test_a_publish_begun_before_the_deadline_keeps_its_lease_up_to_the_publish_bound() -> None:
    entry = _entry(deadline=NOW - 1)
    assert entry.ctx.begin_publish()  # publishing: the deadline does not cancel it ...
    assert not entry.ctx.expire("the attempt passed its deadline")
    assert renews_lease(entry, NOW, BOUND)  # ... and its merge is not left without a lease
    assert renews_lease(entry, NOW - 1 + BOUND - 0.001, BOUND)
    assert not renews_lease(entry, NOW - 1 + BOUND, BOUND)  # but never past the bound
