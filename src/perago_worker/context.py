"""What a handler sees of its attempt: identity, workspace, configuration, cancellation.

Cancellation is cooperative inside a handler (`check_cancelled`) and final at the publish
section: `begin_publish` and the cancellations (`cancel_unless_publishing`, `expire`) take
one lock, so an attempt either publishes or is stopped, never both. A deadline (`expire`)
is a cancellation that remembers it was one, so the runner reports it as `timed_out`
instead of treating it as a lost lease.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NoWorkspaceError(AttributeError):
    """A workspace-free task asked for its workspace."""


class Cancelled(Exception):
    """Raised by `check_cancelled`: the attempt was stopped and will publish nothing.

    Its causes (the message is the cancellation's reason):

    * the attempt fence (the lease keeper's read-back, or the check before a merge) found it
      no longer the live delivery: Conductor no longer knows the task, the task is no longer
      IN_PROGRESS (timed out, cancelled, finished elsewhere), or it was delivered again
      (superseded by another worker's poll, or polled again);
    * the worker's drain grace ran out (`drain_grace_seconds` after SIGTERM) before the
      attempt began to publish;
    * the attempt passed its own deadline (the task's `timeout=`, else `task_timeout_seconds`,
      else its definition's timeout) before it began to publish (reported `timed_out`, see
      `expire`);
    * for a manual `perago-worker exec --publish` run, Ctrl-C before the publish began.

    With `isolation="process"` a lost lease or the drain's end reaches `check_cancelled` in
    the handler's child; at the deadline the child's process group is killed instead.
    """


class UnknownConfigKey(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class AttemptWorkspace:
    """The private local copy of the workspace prefix for this attempt."""

    root: Path
    repository: str
    branch: str
    input_ref: str
    prefix: str


@dataclass
class TaskContext:
    task_id: str
    workflow_id: str
    task_type: str
    reference_name: str
    retry_count: int
    poll_count: int
    worker_id: str
    environment: str
    delivery_token: str = ""  # the workerId this delivery was polled with (see fences)
    _workspace: AttemptWorkspace | None = None
    _config: Callable[[str], str] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    log: Any = None
    # time.monotonic() by which the attempt must have begun to publish (None: no deadline).
    deadline: float | None = None
    _publishing: bool = False
    _timed_out: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _on_cancel: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def workspace(self) -> AttemptWorkspace:
        if self._workspace is None:
            raise NoWorkspaceError(
                f"task {self.task_type!r} is workspace-free: it has no workspace "
                "(register it with workspace=WorkspaceSpec(...) to get one)"
            )
        return self._workspace

    @property
    def has_workspace(self) -> bool:
        return self._workspace is not None

    def bind_workspace(self, workspace: AttemptWorkspace | None) -> None:
        """The worker hands the attempt its materialized folder (None: takes it back)."""
        self._workspace = workspace

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Long handlers call this between steps to stop early when the attempt is dead."""
        if self.cancel_event.is_set():
            raise Cancelled(self.cancel_reason or "attempt cancelled")

    def cancel(self, reason: str) -> None:
        with self._lock:
            self._cancel(reason)

    def _cancel(self, reason: str) -> None:
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()
            for callback in self._on_cancel:
                callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the attempt is cancelled (at once if it already is).

        How a cancellation reaches a handler that is not polling `check_cancelled`: an async
        handler's asyncio task is cancelled through it. It runs on the thread that cancels,
        under the context's lock: it must not block or call back into the context.
        """
        with self._lock:
            if not self.cancel_event.is_set():
                self._on_cancel.append(callback)
                return
        callback()

    def expire(self, reason: str) -> bool:
        """The deadline passed: cancel the attempt unless it has begun to publish.

        True only when this call cancelled it; an attempt already cancelled (lost lease,
        drain) stays what it was, and one that is merging is never cut.
        """
        with self._lock:
            if self._publishing or self.cancel_event.is_set():
                return False
            self._cancel(reason)
            self._timed_out = True
            return True

    @property
    def timed_out(self) -> bool:
        """The attempt was cancelled by its deadline (see `expire`)."""
        return self._timed_out

    def seconds_left(self) -> float | None:
        """Seconds until the deadline (never negative), or None without one.

        A handler can pace itself with it: the deadline stops the attempt whatever it does.
        """
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def begin_publish(self) -> bool:
        """Enter the publish section (claim and merge), unless already cancelled.

        Mutually exclusive with `cancel_unless_publishing`: either the drain gives up on
        the attempt (which then never merges) or the attempt publishes and the drain waits.
        """
        with self._lock:
            if self.cancel_event.is_set():
                return False
            self._publishing = True
            return True

    def cancel_unless_publishing(self, reason: str) -> bool:
        """Cancel the attempt if it has not begun to publish; True when it was cancelled."""
        with self._lock:
            if self._publishing:
                return False
            self._cancel(reason)
            return True

    @property
    def publishing(self) -> bool:
        return self._publishing

    def config(self, key: str) -> str:
        """Static configuration or a secret of the current environment (`handler_config`)."""
        if self._config is None:
            raise UnknownConfigKey(f"no handler configuration is set; {key!r} is unknown")
        return self._config(key)
