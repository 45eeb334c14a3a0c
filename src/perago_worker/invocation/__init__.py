"""How a handler runs: on a thread, on the worker's event loop, or in a child process.

Three rooms, one per module, chosen per task: `threads` (a plain `def`), `loop` (an
`async def`, on the one event loop the worker owns) and `process` (either kind, in a child
process that is killed at the deadline).

`run_handler` is the one entry point (`Attempt._handle` calls it); each task chooses with
`@app.task(isolation=..., timeout=...)`, or takes the settings defaults (`task_isolation`,
`task_timeout_seconds`). The deadline is `ctx.deadline`, set by the runner when the task was
polled; it bounds the whole attempt up to the start of its publish (`ctx.begin_publish`), so
here it bounds the handler.

* **thread** (the default): the handler runs on a thread of the worker process. Without a
  deadline it runs on the attempt's own thread. With one, on a thread of its own that the
  attempt waits for until the deadline; past it the attempt is cancelled (`ctx.expire`) and
  the thread is *abandoned*: Python cannot stop a thread, so a handler that never calls
  `ctx.check_cancelled()` runs on, keeping its CPU, memory and open files, while the attempt
  reports `timed_out` and frees its slot. Abandoned threads still running are counted
  (`perago_abandoned_handler_threads`, `/status`).
* **process**: the handler runs in a child process started by multiprocessing's
  `forkserver` (`spawn` where there is none; a plain fork of this threaded process could
  inherit a lock held by another thread). The child leads a process group of its own,
  resolves the handler by import path (the app path `load_app` was given, else the
  function's module and qualified name), and gets the params as JSON, the workspace root,
  the context's ids and configuration values, and cancellation over a pipe. It sends back
  the result, or the exception's type, message and traceback (`TerminalError` and
  `Cancelled` keep their meaning). At the deadline the whole group is killed with SIGKILL,
  so the slot is freed whatever the handler does; a crash, an `os._exit` or an out-of-memory
  kill of the child fails the attempt (`handler_error`, retryable) and leaves the worker
  alone. When the handler has answered, its group is killed too: no thread or process it
  started can touch the workspace after the result. A cancellation that is not the deadline
  (lost lease, drain) is passed to the child, which gets `CANCEL_GRACE_SECONDS` to stop on
  its own before it is killed. The cost is a process start per attempt (measured in
  docs/performance.md, "Process isolation"). An `async def` handler runs there on an event
  loop of the child's own.
* **async** (an `async def` handler, thread isolation): the coroutine runs on the worker's
  one event loop (`loop.HandlerLoop`, a thread of its own started with the first async
  task), so many I/O-bound handlers share one thread instead of taking one each. A
  cancellation (lost lease, drain, the deadline) cancels its asyncio task: the handler gets
  `asyncio.CancelledError` at its next `await`. One that does not stop within
  `CANCEL_GRACE_SECONDS` is abandoned and counted like a thread. A handler that blocks the
  loop (a synchronous sleep or read inside `async def`) holds up every other async handler:
  the loop's heartbeat then goes stale and `/healthz` fails, as for a stuck poll loop.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from perago_worker.app import TaskSpec
from perago_worker.context import TaskContext
from perago_worker.invocation import loop
from perago_worker.invocation.errors import DeadlineExceeded, HandlerDied, HandlerRaised
from perago_worker.invocation.policy import isolation_for, timeout_for
from perago_worker.invocation.process import (
    CANCEL_GRACE_SECONDS,
    EXIT_GRACE_SECONDS,
    ConfigLookup,
    HandlerRef,
    check_isolable,
    prepare,
    resolve,
    run_in_process,
    stop_children,
)
from perago_worker.invocation.threads import ABANDONED, abandoned_threads, run_in_thread

if TYPE_CHECKING:
    from perago_worker.settings import Settings

__all__ = [
    "ABANDONED",
    "CANCEL_GRACE_SECONDS",
    "EXIT_GRACE_SECONDS",
    "ConfigLookup",
    "DeadlineExceeded",
    "HandlerDied",
    "HandlerRaised",
    "HandlerRef",
    "abandoned_threads",
    "check_isolable",
    "describe",
    "isolation_for",
    "loop",
    "prepare",
    "resolve",
    "run_handler",
    "runs_on_loop",
    "serving_loop",
    "stop_children",
    "timeout_for",
    "trace_of",
]


def describe(exc: BaseException) -> str:
    """`Type: message` of what the handler raised, wherever it ran."""
    if isinstance(exc, HandlerRaised):
        return f"{exc.type_name}: {exc.message}"
    if isinstance(exc, HandlerDied):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def trace_of(exc: BaseException) -> str:
    """The traceback to log: the child's own for a handler that raised in a child."""
    if isinstance(exc, HandlerRaised):
        return exc.trace
    return "".join(traceback.format_exception(exc, limit=8))


def run_handler(spec: TaskSpec, ctx: TaskContext, params: BaseModel, settings: Settings) -> Any:
    """Run the handler the way its task asks; return what it returned, or raise what it
    raised (`DeadlineExceeded` at the deadline, `HandlerRaised`/`HandlerDied` from a child)."""
    if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
        ctx.expire("the attempt passed its deadline")  # then it is not started at all
    ctx.check_cancelled()
    if isolation_for(spec, settings) == "process":
        return run_in_process(spec, ctx, params, settings)
    if spec.is_async:
        return loop.run_on_loop(spec, ctx, params)
    return run_in_thread(spec, ctx, params)


def runs_on_loop(spec: TaskSpec, settings: Settings) -> bool:
    """An async handler that runs in the worker itself, on its event loop."""
    return spec.is_async and isolation_for(spec, settings) == "thread"


@contextlib.contextmanager
def serving_loop(spec: TaskSpec, settings: Settings) -> Iterator[None]:
    """Keep the worker's event loop running while one attempt of `spec` runs outside the
    runner (`perago_worker.testing`, `perago-worker exec`): the runner holds it for its
    whole life, a one-off run only for the attempt. A no-op for tasks not on the loop."""
    if not runs_on_loop(spec, settings):
        yield
        return

    def stamp(_period: float) -> None:
        return None  # no health endpoint watches a one-off run's loop

    loop.LOOP.acquire(stamp)
    try:
        yield
    finally:
        loop.LOOP.release(stamp)
