"""The async room: `async def` handlers on the one event loop the worker owns.

One loop per process, on a thread of its own, started with the first async task and
stopped by the runner's drain (the same design as conductor-python 2.0's background loop):
a thousand I/O-bound handlers waiting on the network cost a thousand coroutines, not a
thousand threads. The attempt's thread submits the coroutine and waits for it (up to the
deadline), so everything around the handler (checks, the change set, the publish, metrics)
is the same as for a sync handler.

Cancellation is asyncio's own: a lost lease, a drain or the deadline cancels the handler's
task (through `TaskContext.on_cancel`), which raises `asyncio.CancelledError` at its next
`await`. A handler that swallows it and does not end within `CANCEL_GRACE_SECONDS` is left
running and counted as abandoned, like a thread past its deadline.

The loop stamps a heartbeat every `BEAT_SECONDS`; a handler that blocks it (synchronous I/O
or `time.sleep` inside `async def`) stops the stamps, and the runner's liveness check then
reports the loop as stalled, so `/healthz` fails instead of a worker that looks healthy
while no async handler can make progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import BaseModel

from perago_worker.app import TaskSpec
from perago_worker.context import Cancelled, TaskContext
from perago_worker.invocation.errors import DeadlineExceeded
from perago_worker.invocation.process import CANCEL_GRACE_SECONDS
from perago_worker.invocation.threads import ABANDONED

# How often the loop shows it is alive (its heartbeat's period).
BEAT_SECONDS = 1.0


class HandlerLoop:
    """The worker's event loop for async handlers, on a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._beats: list[Callable[[float], None]] = []

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def acquire(self, stamp: Callable[[float], None]) -> None:
        """A runner starts using the loop; `stamp(period)` is called from the loop every
        BEAT_SECONDS while it turns (the runner's heartbeat for it)."""
        with self._lock:
            self._beats.append(stamp)
        self.start()

    def release(self, stamp: Callable[[float], None]) -> None:
        """A runner is done (its drain ended): the last one out stops the loop."""
        with self._lock:
            if stamp in self._beats:
                self._beats.remove(stamp)
            if self._beats:
                return
            # The last one out: taken under the lock, so a runner acquiring meanwhile starts
            # a new loop instead of getting this one as it stops.
            loop, thread = self._loop, self._thread
            self._loop = None
            self._thread = None
        _stop(loop, thread)

    def start(self) -> asyncio.AbstractEventLoop:
        """The running loop, started on first use."""
        with self._lock:
            if self._loop is not None and self._thread is not None and self._thread.is_alive():
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.call_soon(self._beat, loop)
                loop.run_forever()
                loop.close()

            self._thread = threading.Thread(target=run, name="async-handlers", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
            return loop

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            beats = list(self._beats)
        for stamp in beats:
            stamp(BEAT_SECONDS)
        loop.call_later(BEAT_SECONDS, self._beat, loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (handlers still on it are left to the process's exit)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = None
            self._thread = None
        _stop(loop, thread, timeout)

    def submit(
        self, coro: Coroutine[Any, Any, Any], ctx: TaskContext
    ) -> concurrent.futures.Future[Any]:
        """Run `coro` on the loop as a task that `ctx`'s cancellation cancels."""
        loop = self.start()
        # Both sides run on the loop's thread, so a cancellation can never fall between the
        # task's start and its registration: either the task exists and is cancelled, or it
        # finds the flag when it starts.
        task_box: list[asyncio.Task[Any]] = []
        early: list[bool] = []

        def cancel_on_loop() -> None:
            if task_box:
                task_box[0].cancel()
            else:
                early.append(True)

        def cancel() -> None:  # any thread; under the context's lock: only schedules
            loop.call_soon_threadsafe(cancel_on_loop)

        async def main() -> Any:
            task = asyncio.current_task()
            assert task is not None
            task_box.append(task)
            if early:
                coro.close()
                raise asyncio.CancelledError
            return await coro

        future = asyncio.run_coroutine_threadsafe(main(), loop)
        ctx.on_cancel(cancel)
        return future


def _stop(
    loop: asyncio.AbstractEventLoop | None, thread: threading.Thread | None, timeout: float = 5.0
) -> None:
    if loop is not None:
        loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(timeout)


LOOP = HandlerLoop()


def run_on_loop(spec: TaskSpec, ctx: TaskContext, params: BaseModel) -> Any:
    """Run an async handler on the worker's loop; return or raise what it did.

    Raises `Cancelled` when a lost lease or the drain cancelled it, `DeadlineExceeded` at
    the deadline (`abandoned` when the coroutine did not end within the grace).
    """
    coro = spec.fn(ctx, params)
    assert asyncio.iscoroutine(coro), f"{spec.qualname} is not a coroutine function"
    future = LOOP.submit(coro, ctx)
    # Until the handler ends, the deadline passes, or the attempt is cancelled (a lost lease,
    # the drain): a cancellation starts the grace at once, not at the deadline.
    finished = threading.Event()
    ctx.on_cancel(finished.set)
    future.add_done_callback(lambda _: finished.set())
    timeout = None if ctx.deadline is None else max(0.0, ctx.deadline - time.monotonic())
    finished.wait(timeout)
    if future.done() and not ctx.cancelled:
        return _outcome(future, ctx, 0)
    if not ctx.cancelled:
        ctx.expire("the attempt passed its deadline")
    # Cancelled now (by the deadline, or for another reason): give the coroutine the grace
    # to unwind its `finally` blocks and end.
    try:
        _outcome(future, ctx, CANCEL_GRACE_SECONDS)
        ended = True
    except concurrent.futures.TimeoutError:
        ended = False
    except BaseException:
        ended = True
    if not ended:
        _abandon(future, ctx)
    if not ctx.timed_out:
        raise Cancelled(ctx.cancel_reason or "attempt cancelled")
    raise DeadlineExceeded(
        "its coroutine was cancelled"
        if ended
        else f"its coroutine ignored the cancellation for {CANCEL_GRACE_SECONDS:.0f} s and "
        "was abandoned (it may still be running on the loop)",
        abandoned=not ended,
    )


def _outcome(
    future: concurrent.futures.Future[Any], ctx: TaskContext, timeout: float | None
) -> Any:
    try:
        return future.result(timeout)
    except concurrent.futures.CancelledError:
        raise Cancelled(ctx.cancel_reason or "attempt cancelled") from None


def _abandon(future: concurrent.futures.Future[Any], ctx: TaskContext) -> None:
    ABANDONED.adopt()
    if ctx.log is not None:
        ctx.log.warning("handler.abandoned", loop=True)

    def returned(_: concurrent.futures.Future[Any]) -> None:
        ABANDONED.release()
        if ctx.log is not None:
            ctx.log.warning("handler.abandoned_returned")

    future.add_done_callback(returned)
