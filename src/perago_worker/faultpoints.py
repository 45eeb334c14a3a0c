"""Named crash points for the fault-injection suite (`PERAGO_FAULT_POINTS`).

`PERAGO_FAULT_POINTS="stage.committed"` makes the process kill itself with SIGKILL the
first time it reaches that point, exactly as a crash or an OOM kill would, so tests can
prove what survives a death at every phase boundary. Unset (always, in production) a hit is
one set lookup. Points: poll.received, materialize.object, handler.start,
stage.committed, fence.passed (attempt fence passed, nothing claimed), claim.done (intent
created, no merge sent), adopt.merging (an adopting attempt about to merge a claimed
commit), merge.done; `lease.disabled` stops lease extensions (to make a zombie).

Points that kill one thread instead of the process (`fail`: raise `FaultInjected` there, so
the thread dies as it would on a bug): `poll.die` makes a poll loop raise right after it
handed its first polled task to an attempt (so the worker was ready and has an attempt in
flight); `lease.die` makes the lease keeper raise on its first round. The health checks
must then see the dead loop (`/healthz` 503) and the worker must exit for a restart.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(
    p.strip() for p in os.environ.get("PERAGO_FAULT_POINTS", "").split(",") if p.strip()
)


def armed(point: str) -> bool:
    """For behaviours a test switches off rather than crashes (`lease.disabled`)."""
    return point in _ARMED


def hit(point: str) -> None:
    if point in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)


class FaultInjected(RuntimeError):
    """Raised by `fail` at an armed point: a thread dying of an unexpected error."""


def fail(point: str) -> None:
    """Raise `FaultInjected` at an armed point (kills the calling thread, not the process)."""
    if point in _ARMED:
        raise FaultInjected(f"fault point {point} armed (PERAGO_FAULT_POINTS)")
