"""`async def` handlers: on the worker's one event loop, or in a child process of their own.

The same outcomes as sync handlers (a result, a raised error, `Cancelled`, the deadline),
with asyncio's own cancellation: the handler's task is cancelled and it sees
`asyncio.CancelledError` at its next `await`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from perago_worker import invocation
from perago_worker.app import Worker, load_app
from perago_worker.context import Cancelled, TaskContext
from perago_worker.contract import TerminalError
from perago_worker.invocation import loop as loop_module
from perago_worker.settings import Settings

app = Worker()


class Plan(BaseModel):
    do: str = "return"
    seconds: float = 0.0


class Outcome(BaseModel):
    pid: int
    thread: str
    value: str = ""


# Where each async handler left a trace, by task id: a thread-safe record for the tests.
SEEN: dict[str, list[str]] = {}
_SEEN_LOCK = threading.Lock()
WAITING: list[str] = []  # appended on the loop thread only


def note(ctx: TaskContext, what: str) -> None:
    with _SEEN_LOCK:
        SEEN.setdefault(ctx.task_id, []).append(what)


@app.task("planned", isolation="process")
async def planned(ctx: TaskContext, params: Plan) -> Outcome:
    """Does what its plan says, asynchronously; records how it ended in SEEN."""
    try:
        if params.do == "sleep":
            await asyncio.sleep(params.seconds)
        elif params.do == "meet":  # waits until `seconds` handlers are waiting together
            WAITING.append(ctx.task_id)
            while len(WAITING) < params.seconds:
                await asyncio.sleep(0.01)
        elif params.do == "swallow":  # ignores the first cancellation, then sleeps on
            try:
                await asyncio.sleep(params.seconds)
            except asyncio.CancelledError:
                note(ctx, "swallowed")
                await asyncio.sleep(params.seconds)
        elif params.do == "raise":
            raise ValueError("bad value 42")
        elif params.do == "terminal":
            raise TerminalError("bad data, do not retry")
    except asyncio.CancelledError:
        note(ctx, "cancelled")
        raise
    return Outcome(pid=os.getpid(), thread=threading.current_thread().name, value=params.do)


SPEC = load_app(f"{__name__}:app").tasks["planned"]
ON_LOOP = dataclasses.replace(SPEC, isolation="thread")
SETTINGS = Settings()


@pytest.fixture(autouse=True)
def _loop() -> Iterator[None]:
    """Each test holds the loop like a runner does, and gives it back."""

    def stamp(_period: float) -> None:
        return None

    loop_module.LOOP.acquire(stamp)
    yield
    loop_module.LOOP.release(stamp)


def ctx_for(task_id: str, deadline_in: float | None = None) -> TaskContext:
    return TaskContext(
        task_id=task_id,
        workflow_id="wf-1",
        task_type="planned",
        reference_name="only",
        retry_count=0,
        poll_count=1,
        worker_id="w-1",
        environment="dev",
        deadline=None if deadline_in is None else time.monotonic() + deadline_in,
    )


def run(ctx: TaskContext, spec: Any = ON_LOOP, **plan: Any) -> Any:
    return invocation.run_handler(spec, ctx, Plan(**plan), SETTINGS)


def test_an_async_handler_returns_its_result_from_the_workers_loop_thread() -> None:
    outcome = run(ctx_for("t-return"))
    assert outcome == Outcome(pid=os.getpid(), thread="async-handlers", value="return")


def test_many_async_handlers_wait_at_once_on_the_one_loop() -> None:
    # Each handler waits until all 50 are waiting: only handlers that run at once can end.
    count = 50
    results: list[Any] = []

    def attempt(i: int) -> None:
        results.append(run(ctx_for(f"t-many-{i}", deadline_in=30), do="meet", seconds=count))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert len(results) == count
    assert {r.thread for r in results} == {"async-handlers"}


def test_an_exception_from_an_async_handler_reaches_the_attempt_as_raised() -> None:
    with pytest.raises(ValueError, match="bad value 42"):
        run(ctx_for("t-raise"), do="raise")
    with pytest.raises(TerminalError, match="do not retry"):
        run(ctx_for("t-terminal"), do="terminal")


def test_a_cancellation_cancels_the_handlers_task_with_cancelled_error() -> None:
    ctx = ctx_for("t-cancel")
    threading.Timer(0.3, ctx.cancel, args=("lease lost",)).start()
    with pytest.raises(Cancelled, match="lease lost"):
        run(ctx, do="sleep", seconds=30)
    assert SEEN["t-cancel"] == ["cancelled"]


def test_a_cancellation_before_the_handler_starts_never_runs_it() -> None:
    ctx = ctx_for("t-early")
    ctx.cancel("draining")
    with pytest.raises(Cancelled, match="draining"):
        run(ctx, do="sleep", seconds=30)
    assert "t-early" not in SEEN


def test_the_deadline_cancels_an_async_handler_and_reports_timed_out() -> None:
    ctx = ctx_for("t-deadline", deadline_in=0.3)
    with pytest.raises(invocation.DeadlineExceeded) as caught:
        run(ctx, do="sleep", seconds=30)
    assert ctx.timed_out and not caught.value.abandoned
    assert SEEN["t-deadline"] == ["cancelled"]


def test_a_handler_that_swallows_the_cancellation_is_abandoned_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop_module, "CANCEL_GRACE_SECONDS", 0.3)
    before = invocation.abandoned_threads()
    ctx = ctx_for("t-swallow", deadline_in=0.2)
    with pytest.raises(invocation.DeadlineExceeded) as caught:
        run(ctx, do="swallow", seconds=1.0)
    assert caught.value.abandoned
    assert invocation.abandoned_threads() == before + 1
    deadline = time.monotonic() + 10
    while invocation.abandoned_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert invocation.abandoned_threads() == before  # counted until it really returned


def test_a_blocked_loop_stops_stamping_its_heartbeat() -> None:
    stamps: list[float] = []

    def stamp(_period: float) -> None:
        stamps.append(time.monotonic())

    loop_module.LOOP.acquire(stamp)
    try:
        time.sleep(loop_module.BEAT_SECONDS * 1.5)
        assert stamps, "a turning loop stamps its heartbeat"
        loop = loop_module.LOOP.start()
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            time.sleep(loop_module.BEAT_SECONDS * 2.5)  # what a sync call in async def does

        loop.call_soon_threadsafe(block)
        blocked.wait(5)
        count = len(stamps)
        time.sleep(loop_module.BEAT_SECONDS * 2)
        assert len(stamps) == count
    finally:
        loop_module.LOOP.release(stamp)


def test_an_async_handler_in_a_child_process_runs_on_the_childs_own_loop() -> None:
    outcome = run(ctx_for("t-child"), spec=SPEC)
    assert outcome["pid"] != os.getpid() and outcome["thread"] == "MainThread"


def test_a_cancellation_reaches_an_async_handler_in_a_child_process() -> None:
    ctx = ctx_for("t-child-cancel")
    threading.Timer(0.5, ctx.cancel, args=("lease lost",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="lease lost"):
        run(ctx, spec=SPEC, do="sleep", seconds=30)
    assert time.monotonic() - started < invocation.CANCEL_GRACE_SECONDS  # it stopped itself


def test_the_handlers_guide_quotes_the_grace_and_the_loops_heartbeat() -> None:
    from pathlib import Path

    guide = (Path(__file__).parents[2] / "docs" / "handlers.md").read_text()
    section = guide[guide.index("## Async handlers") :]
    assert f"is given {loop_module.CANCEL_GRACE_SECONDS:.0f} s, then abandoned" in section
    assert loop_module.BEAT_SECONDS == 1.0 and "stamps a heartbeat every\n  second" in section


def test_a_lost_lease_starts_the_grace_at_once_not_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop_module, "CANCEL_GRACE_SECONDS", 0.3)
    ctx = ctx_for("t-swallow-lease")  # no deadline at all
    threading.Timer(0.3, ctx.cancel, args=("lease lost",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="lease lost"):
        run(ctx, do="swallow", seconds=4.0)
    assert time.monotonic() - started < 3.0  # not the handler's 8 s of sleeping
    assert SEEN["t-swallow-lease"] == ["swallowed"]
