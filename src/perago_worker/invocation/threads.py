"""The thread room: a handler on a thread of the worker, abandoned at its deadline."""

from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel

from perago_worker.app import TaskSpec
from perago_worker.context import Cancelled, TaskContext
from perago_worker.invocation.errors import DeadlineExceeded


class _Abandoned:
    """Handler threads left running past their deadline: a thread cannot be killed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    def count(self) -> int:
        with self._lock:
            return self._running

    def adopt(self) -> None:
        from perago_worker.observability import metrics

        with self._lock:
            self._running += 1
        metrics.ABANDONED_THREADS.inc()

    def release(self) -> None:
        from perago_worker.observability import metrics

        with self._lock:
            self._running -= 1
        metrics.ABANDONED_THREADS.dec()


ABANDONED = _Abandoned()


def abandoned_threads() -> int:
    """Handler threads abandoned at a deadline that have not returned yet (this process)."""
    return ABANDONED.count()


def run_in_thread(spec: TaskSpec, ctx: TaskContext, params: BaseModel) -> Any:
    if ctx.deadline is None:
        return spec.fn(ctx, params)  # no deadline: nothing to wait for but the handler
    lock = threading.Lock()
    box: dict[str, Any] = {}
    done = threading.Event()
    state = {"abandoned": False}

    def target() -> None:
        try:
            box["value"] = spec.fn(ctx, params)
        except BaseException as exc:  # handed to the attempt thread, which maps it
            box["error"] = exc
        finally:
            with lock:
                done.set()
                abandoned = state["abandoned"]
            if abandoned:
                ABANDONED.release()
                if ctx.log is not None:
                    ctx.log.warning("handler.abandoned_returned")

    thread = threading.Thread(target=target, name=f"handler-{ctx.task_id[:8]}", daemon=True)
    thread.start()
    done.wait(max(0.0, ctx.deadline - time.monotonic()))
    with lock:
        finished = done.is_set()
        if not finished:
            state["abandoned"] = True
    if not finished:
        ctx.expire("the attempt passed its deadline")
        ABANDONED.adopt()
        if ctx.log is not None:
            ctx.log.warning("handler.abandoned", thread=thread.name)
        if not ctx.timed_out:  # cancelled before, for another reason (lost lease, drain)
            raise Cancelled(ctx.cancel_reason or "attempt cancelled")
        raise DeadlineExceeded(
            "its thread was abandoned and may still be running (a thread cannot be killed; "
            "isolation='process' kills the handler instead)",
            abandoned=True,
        )
    if "error" in box:
        raise box["error"]
    return box["value"]
