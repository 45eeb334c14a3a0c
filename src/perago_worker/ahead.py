"""A read started now and answered later: independent round trips of one attempt overlap.

A small task's time is mostly round trips in series (docs/performance.md): the input
commit, the target branch and the prefix's listing do not depend on each other nor on the
execution ledger, so an attempt asks for them at once and waits for each where its answer
is first needed. Only reads go ahead (nothing a fence orders: no write, no Conductor call),
so the order the fences rely on is the one `attempt.py` reads top to bottom.

Each read runs on a daemon thread of its own rather than a shared pool: a pool's threads
would be joined at interpreter exit (a read hung on a dead server would hold a drain), and
a thread start costs about 50 µs beside a round trip of milliseconds. The thread runs in a
copy of the caller's context, so the attempt's log fields and trace span stay on it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Ahead(Generic[T]):
    """`fn()` running on its own thread from construction; `result()` waits for it.

    The call's own timeouts and retry budget bound the wait (every server call has them);
    an exception it raised is raised again by `result()`, in the caller's thread. A result
    never read is simply dropped with the thread (an attempt that ends early)."""

    def __init__(self, fn: Callable[[], T], *, name: str) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._call, fn), name=name, daemon=True
        )
        self._thread.start()

    def _call(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # re-raised by result(), in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> T:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
