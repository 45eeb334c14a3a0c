"""The fence an attempt asks before every merge request: cancellation on both sides of the
attempt fence's read-back, so a cancellation that lands during the read stops the merge."""

from __future__ import annotations

from typing import Any

from perago_worker.attempt import Attempt
from perago_worker.context import TaskContext


def _attempt(still_live: Any) -> tuple[Attempt, TaskContext]:
    ctx = TaskContext("t", "w", "x", "x", 0, 1, "me", "dev")
    attempt = Attempt(None, {}, ctx, None, still_live=still_live)  # type: ignore[arg-type]
    return attempt, ctx


def test_a_live_uncancelled_attempt_passes() -> None:
    attempt, _ = _attempt(lambda: True)
    assert attempt._fence() is True


def test_a_cancelled_attempt_fails_without_asking_conductor() -> None:
    asked: list[bool] = []
    attempt, ctx = _attempt(lambda: asked.append(True) or True)
    ctx.cancel("lease lost")
    assert attempt._fence() is False
    assert asked == []


def test_a_cancellation_during_the_fence_read_fails_the_fence() -> None:
    def read_back() -> bool:
        ctx.cancel("lease lost while the fence was read")
        return True  # Conductor still said live when it answered

    attempt, ctx = _attempt(read_back)
    assert attempt._fence() is False


def test_a_superseded_attempt_fails() -> None:
    attempt, _ = _attempt(lambda: False)
    assert attempt._fence() is False
