"""The daemon's loop: poll, run attempts in a bounded pool, keep leases, report, drain.

One poller thread per task type long-polls Conductor for as many tasks as it has free
slots (batch poll, timeout <= 5 s). Each attempt runs on its own daemon thread, so a handler
stuck in C code can never keep the process from exiting after a drain. A single lease
keeper thread extends the leases of all in-flight attempts and reads each task back: a task
that timed out, was cancelled or re-delivered cancels its attempt cooperatively.

Reports use `POST /api/tasks` with retries, never `update-v2` (which hands out a next
task that a draining worker would strand).

Every attempt has a deadline (`invocation.timeout_for`, counted from its poll): the lease
keeper expires attempts past it (`ctx.expire`: cancelled unless they began to publish) and
renews no lease for them; `invocation` stops a handler still running at it. Such an attempt
is reported FAILED `timed_out`.

Health: each poll loop and the lease keeper stamp a `Heartbeat` before every step, with the
longest that step may take. The main thread (`run_forever`) looks at them every
`WATCH_SECONDS`: a loop that died or stalled puts the worker into state `failed` (`/healthz`
503 with the cause), it drains and exits with `EXIT_FAILED`, so the orchestrator restarts it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from conductor.client.http.models.task import Task
from conductor.client.http.models.task_result import TaskResult

from perago_worker import faultpoints, invocation
from perago_worker.app import TaskSpec, Worker
from perago_worker.attempt import Attempt, Deps, Outcome
from perago_worker.context import TaskContext
from perago_worker.contract import FailureKind, Status, TaskFailure, bound_reason
from perago_worker.fences import Incarnation, attempt_verdict, delivery_token
from perago_worker.observability import logging as plog
from perago_worker.observability import metrics, tracing

# A loop is stalled when it stamped no heartbeat for max(STALL_FACTOR x its period,
# STALL_FLOOR_SECONDS); the main thread looks every WATCH_SECONDS. A worker that failed at run
# time exits with EXIT_FAILED (2 is a failed start, 130 a second signal).
STALL_FACTOR = 3
STALL_FLOOR_SECONDS = 30.0
WATCH_SECONDS = 0.5
EXIT_FAILED = 3
SLOT_WAIT_SECONDS = 0.5  # a poll loop waits this long for a free slot before looking again
MAX_POLL_BACKOFF_SECONDS = 30.0  # the longest wait between failed polls
LEASE_TICK_SECONDS = 0.25  # the lease keeper's round
# The Conductor client (httpx) tries a connection up to 4 times, 1.5 s apart in all, each
# bounded by the request timeout; tenacity sleeps at most 5 s between retries.
CONNECT_TRIES = 4
CONNECT_BACKOFF_SECONDS = 1.5
MAX_RETRY_SLEEP_SECONDS = 5.0
LEASE_RETRY_SECONDS = 5.0  # conductor.extend_lease's retry budget
LEASE_FENCE_RETRY_SECONDS = 2.0  # the fence read after each extension
QUEUE_DEPTH_RETRY_SECONDS = 5.0  # one queue-size read's retry budget


def request_bound(request_timeout: float, wait: float = 0.0) -> float:
    """The longest one Conductor request takes: every connection try, each up to the
    request's wait (a long poll's) plus the request timeout."""
    return CONNECT_TRIES * (wait + request_timeout) + CONNECT_BACKOFF_SECONDS


def call_bound(request_timeout: float, retry_seconds: float) -> float:
    """The longest one retried Conductor call takes: the last try starts at most
    `retry_seconds` plus one retry sleep after the first, and takes one request bound."""
    return retry_seconds + MAX_RETRY_SLEEP_SECONDS + request_bound(request_timeout)


class Heartbeat:
    """One loop's sign of life, for the liveness check.

    Before each step the loop stamps it with the longest that step may take (its period):
    the loop is stalled once no stamp came for max(STALL_FACTOR x period, STALL_FLOOR_SECONDS),
    and dead once its thread ended or raised. The bound follows the client's own timeouts on
    purpose: a loop waiting on a Conductor that does not answer is waiting, not stuck (a
    restart would not make Conductor answer); one stuck anywhere else is.
    """

    def __init__(
        self, name: str, period: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self._clock = clock
        self.period = period
        self.last = clock()
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def stamp(self, period: float) -> None:
        self.period = period
        self.last = self._clock()

    def died(self, error: str) -> None:
        self.error = error

    @property
    def bound(self) -> float:
        return max(STALL_FACTOR * self.period, STALL_FLOOR_SECONDS)

    def age(self) -> float:
        return max(0.0, self._clock() - self.last)

    def problem(self) -> str | None:
        """Why this loop is not alive and well, or None."""
        if self.error is not None:
            return f"{self.name} died: {self.error}"
        if self.thread is not None and not self.thread.is_alive():
            return f"{self.name} died: its thread ended"
        age = self.age()
        if age > self.bound:
            return f"{self.name} stalled: no heartbeat for {age:.0f} s (bound {self.bound:.0f} s)"
        return None

    def view(self) -> dict[str, Any]:
        return {
            "alive": self.problem() is None,
            "heartbeat_age_seconds": round(self.age(), 3),
            "stall_bound_seconds": round(self.bound, 3),
            "error": self.error,
        }


PREFLIGHT_STATES = ("pending", "passed", "failed", "skipped")


class Lifecycle:
    """starting -> validating -> running -> draining -> stopped (or failed).

    `failed` is reached when the preflight fails and, at run time, when a watched loop died
    or stalled (`fail`); `problems` is what the liveness check answers from.
    """

    def __init__(self) -> None:
        self.state = "starting"
        self.preflight = "pending"  # one of PREFLIGHT_STATES
        self.failure: str | None = None
        self.last_poll: float | None = None
        self.loops: dict[str, Heartbeat] = {}
        metrics.set_state(self.state)

    def set(self, state: str) -> None:
        self.state = state
        metrics.set_state(state)

    def fail(self, cause: str) -> None:
        self.failure = cause
        self.set("failed")

    @property
    def preflight_ok(self) -> bool:
        """True only when the preflight ran and passed (skipped is not ok)."""
        return self.preflight == "passed"

    @preflight_ok.setter
    def preflight_ok(self, value: bool) -> None:
        self.preflight = "passed" if value else "pending"

    @property
    def ready(self) -> bool:
        """Running after a preflight that passed, or that the operator skipped."""
        return self.preflight in ("passed", "skipped") and self.state == "running"

    def heartbeat(self) -> None:
        self.last_poll = time.time()
        metrics.LAST_POLL.set(self.last_poll)

    def watch(self, beat: Heartbeat) -> Heartbeat:
        self.loops[beat.name] = beat
        return beat

    def problems(self) -> list[str]:
        """Why the process is not alive and well: empty when it is.

        Loops are judged only while running: a drain ends the poll loops on purpose.
        """
        causes = []
        if self.state == "failed":
            causes.append(self.failure or "failed")
        if self.state == "running":
            causes += [p for beat in list(self.loops.values()) if (p := beat.problem())]
        return causes


class _SlotHold:
    """An attempt's hold on its task type's slot, released exactly once (early, when the
    attempt's work is done, or at the very end if it never got that far)."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


@dataclass
class InFlight:
    task: Task
    spec: TaskSpec
    ctx: TaskContext
    interval: float
    next_lease: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    reported: bool = False
    polled: tracing.PollWindow | None = None  # the poll that delivered it, when tracing

    @property
    def key(self) -> str:
        """One per delivery: its token is never reused, whatever Conductor resets."""
        return f"{self.task.task_id}@{self.ctx.delivery_token}"


def renews_lease(entry: InFlight, now: float, publish_bound: float) -> bool:
    """Is `entry`'s lease extension due at `now` (monotonic)?

    Not once it is reported (an extension after the report could reopen the task), and not
    when cancelled (superseded, past its deadline, given up by the drain: its task id may
    already belong to a newer delivery, whose lease is not ours). Past its deadline only
    while it publishes, and never more than `publish_bound` (`Runner.publish_wait_seconds`)
    past it: the deadline covers everything up to the publish, which it does not cut, and
    a publish that began in time ends within that bound. Letting its lease lapse mid-merge
    would time the task out after its merge landed, and fail the workflow if no retry is
    left.
    """
    if entry.reported or entry.ctx.cancelled or entry.next_lease > now:
        return False
    deadline = entry.ctx.deadline
    if deadline is None or now < deadline:
        return True
    return entry.ctx.publishing and now < deadline + publish_bound


class Runner:
    def __init__(self, app: Worker, deps: Deps, lifecycle: Lifecycle | None = None) -> None:
        self.app = app
        self.deps = deps
        self.settings = deps.settings
        self.lifecycle = lifecycle or Lifecycle()
        self.log = plog.get_logger(worker_id=self.settings.worker_id)
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._inflight: dict[str, InFlight] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._loop_beat: Heartbeat | None = None
        self._slots = {
            name: threading.BoundedSemaphore(
                self.settings.concurrency_for(name, spec.options.concurrency)
            )
            for name, spec in app.tasks.items()
        }
        # Process-isolated handlers must be importable by a child: refused here, not per task.
        invocation.prepare(app.tasks.values(), self.settings)

    @property
    def poll_period(self) -> float:
        """The longest one healthy poll step takes: a slot wait plus one long poll."""
        wait = self.settings.poll_timeout_ms / 1000
        return SLOT_WAIT_SECONDS + request_bound(self._request_timeout, wait)

    @property
    def lease_period(self) -> float:
        """The longest the lease keeper spends on one attempt: an extension and a fence read."""
        timeout = self._request_timeout
        return call_bound(timeout, LEASE_RETRY_SECONDS) + call_bound(
            timeout, LEASE_FENCE_RETRY_SECONDS
        )

    @property
    def _request_timeout(self) -> float:
        return float(getattr(self.deps.conductor, "request_timeout", 10.0))

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.lifecycle.set("running")
        for spec in self.app.tasks.values():
            beat = self.lifecycle.watch(Heartbeat(f"poll loop {spec.name}", self.poll_period))
            thread = threading.Thread(
                target=self._guarded,
                args=(beat, self._poll_loop, spec),
                name=f"poll-{spec.name}",
                daemon=True,
            )
            beat.thread = thread
            thread.start()
            self._threads.append(thread)
        if any(invocation.runs_on_loop(spec, self.settings) for spec in self.app.tasks.values()):
            # The async handlers' loop, stamped from the loop itself: one blocked by a
            # handler (synchronous I/O in `async def`) stops stamping and fails liveness.
            loop_beat = self.lifecycle.watch(
                Heartbeat("async handler loop", invocation.loop.BEAT_SECONDS)
            )
            invocation.loop.LOOP.acquire(loop_beat.stamp)
            loop_beat.thread = invocation.loop.LOOP.thread
            self._loop_beat = loop_beat
        beat = self.lifecycle.watch(Heartbeat("lease keeper", LEASE_TICK_SECONDS))
        keeper = threading.Thread(
            target=self._guarded, args=(beat, self._lease_loop), name="lease-keeper", daemon=True
        )
        beat.thread = keeper
        keeper.start()
        if self.settings.queue_depth_every_seconds > 0:
            # Not joined by the drain: it only reads, and ends at the drain's next look.
            beat = self.lifecycle.watch(
                Heartbeat("queue depth reader", self.settings.queue_depth_every_seconds)
            )
            reader = threading.Thread(
                target=self._guarded,
                args=(beat, self._queue_depth_loop),
                name="queue-depth",
                daemon=True,
            )
            beat.thread = reader
            reader.start()
        self.log.info(
            "worker.running",
            task_types=sorted(self.app.tasks),
            domain=self.settings.task_domain,
            environment=self.settings.environment,
        )

    def _guarded(self, beat: Heartbeat, loop: Callable[..., None], *args: Any) -> None:
        """Run a loop; if it raises, record why it died (the watchdog fails the worker)."""
        try:
            loop(beat, *args)
        except BaseException as exc:
            beat.died(f"{type(exc).__name__}: {exc}"[:300])
            self.log.error(
                "loop.died",
                loop=beat.name,
                error=repr(exc)[:300],
                traceback=traceback.format_exc(limit=8),
            )

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def health(self) -> dict[str, Any]:
        """For `/status`: each loop's heartbeat and the handler threads left behind."""
        return {
            "loops": {name: beat.view() for name, beat in self.lifecycle.loops.items()},
            "abandoned_handler_threads": invocation.abandoned_threads(),
        }

    def check_health(self) -> list[str]:
        """The watchdog's look: a dead or stalled loop fails the worker (state `failed`)."""
        causes = self.lifecycle.problems()
        if causes and self.lifecycle.state == "running":
            cause = "; ".join(causes)
            self.log.error("worker.failed", cause=cause)
            self.lifecycle.fail(cause)
        return causes

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain. A second signal exits at once."""
        stop = threading.Event()
        signals_seen = 0

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                self.log.warning("worker.exit_now", signal=signal.Signals(signum).name)
                os._exit(130)
            self.log.info("worker.signal", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not stop.wait(WATCH_SECONDS):
            if self.check_health():
                break  # failed: drain what is in flight, then exit for a restart
        self.drain()
        return EXIT_FAILED if self.lifecycle.state == "failed" else 0

    def drain(self) -> None:
        """Stop polling, let in-flight attempts finish within the grace, abort the rest.

        A worker that failed stays `failed` throughout (liveness keeps answering 503).
        """
        failed = self.lifecycle.state == "failed"
        if not failed:
            self.lifecycle.set("draining")
        self._draining.set()
        grace = self.settings.drain_grace_seconds
        self.log.info("worker.draining", in_flight=self.in_flight(), grace_seconds=grace)
        for thread in self._threads:
            thread.join(timeout=self.settings.poll_timeout_ms / 1000 + 35)
        deadline = time.monotonic() + grace
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.1)
        aborted = self._abort_leftovers()
        self._stopped.set()
        killed = invocation.stop_children()  # handler processes of aborted attempts
        if self._loop_beat is not None:  # async handlers of aborted attempts end with it
            invocation.loop.LOOP.release(self._loop_beat.stamp)
            self._loop_beat = None
        if not failed:
            self.lifecycle.set("stopped")
        self.log.info("worker.stopped", aborted=aborted, handler_processes_killed=killed)

    def _abort_leftovers(self) -> int:
        """Past the grace: abort what has not begun to publish, let publishing ones finish.

        An attempt that has begun to claim and merge is never reported FAILED under it (its
        merge may land); it gets a bounded wait for its own, fenced report. The others are
        cancelled first (so they can no longer begin to publish), then reported FAILED only
        if the attempt fence still shows them live: a superseded delivery reports nothing.
        """
        with self._lock:
            leftover = list(self._inflight.values())
        aborted = 0
        publishing: list[InFlight] = []
        for entry in leftover:
            if not entry.ctx.cancel_unless_publishing(
                "worker shut down before the attempt finished (drain grace over)"
            ):
                publishing.append(entry)
                continue
            aborted += 1
            if self.is_live(entry, retry_seconds=5):
                self._report(
                    entry,
                    Outcome(
                        Status.FAILED,
                        reason="aborted: worker shut down before the attempt finished; retry it",
                        kind="aborted",
                    ),
                )
            else:
                with entry.lock:
                    entry.reported = True  # superseded: nobody reports for this delivery
        deadline = time.monotonic() + self.publish_wait_seconds
        while publishing and time.monotonic() < deadline:
            with self._lock:
                publishing = [e for e in publishing if e.key in self._inflight]
            time.sleep(0.1)
        return aborted

    @property
    def publish_wait_seconds(self) -> float:
        """How long a drain waits for an attempt caught claiming or merging."""
        lakefs_timeout = getattr(self.deps.lakefs, "request_timeout", 60.0)
        return float(self.settings.merge_retry_seconds + 2 * lakefs_timeout)

    # -- polling --------------------------------------------------------------------------

    def _poll_loop(self, beat: Heartbeat, spec: TaskSpec) -> None:
        """Long-poll for one task, then sweep up a backlog without waiting.

        Conductor's batch poll waits out its whole timeout trying to fill the batch, so
        asking for N tasks with a 2 s timeout delays a lone task by 2 s. One task is asked
        for with the long timeout (answered as soon as it arrives); only when one came and
        more slots are free is a batch asked for with no wait at all.
        """
        slots = self._slots[spec.name]
        backoff = 0.0
        while not self._draining.is_set():
            beat.stamp(self.poll_period)
            if not slots.acquire(timeout=SLOT_WAIT_SECONDS):
                continue
            token = delivery_token(self.settings.worker_id)
            tasks = self._poll(spec, token, 1, self.settings.poll_timeout_ms)
            if tasks is None:
                slots.release()
                backoff = min(MAX_POLL_BACKOFF_SECONDS, max(0.5, backoff * 2))
                wait = backoff * random.uniform(0.5, 1.0)
                beat.stamp(wait)
                self._draining.wait(wait)
                continue
            backoff = 0.0
            if not tasks:
                slots.release()
                continue
            for task in tasks:
                faultpoints.hit("poll.received")
                self._launch(spec, task, token)
            faultpoints.fail("poll.die")
            extra = 0
            while extra < self.settings.poll_batch - 1 and slots.acquire(blocking=False):
                extra += 1
            beat.stamp(self.poll_period)
            token = delivery_token(self.settings.worker_id)
            more = (self._poll(spec, token, extra, 0) or []) if extra else []
            for _ in range(extra - len(more)):
                slots.release()
            for task in more:
                faultpoints.hit("poll.received")
                self._launch(spec, task, token)

    def _poll(self, spec: TaskSpec, token: str, count: int, timeout_ms: int) -> list[Task] | None:
        """One batch poll with a fresh delivery token as the `workerId` Conductor stores.

        None when it failed (the loop never dies: outages are waited out).
        """
        started = time.monotonic()
        traced = tracing.poll_started()
        try:
            tasks = self.deps.conductor.batch_poll(
                spec.name, token, self.settings.task_domain, count, timeout_ms
            )
        except Exception as exc:
            tracing.poll_ended(traced, spec.name, 0, exc)
            metrics.POLLS.labels(task_type=spec.name, result="error").inc()
            self.log.warning("poll.failed", task_type=spec.name, error=str(exc)[:300])
            return None
        finally:
            metrics.PHASE_SECONDS.labels(task_type=spec.name, phase="poll").observe(
                time.monotonic() - started
            )
        tracing.poll_ended(traced, spec.name, len(tasks))
        self.lifecycle.heartbeat()
        metrics.POLLS.labels(task_type=spec.name, result="tasks" if tasks else "empty").inc()
        return tasks

    def _launch(self, spec: TaskSpec, task: Task, token: str) -> None:
        settings = self.settings
        log = plog.get_logger(
            workflow_id=task.workflow_instance_id,
            task_id=task.task_id,
            task_type=spec.name,
            attempt=int(task.poll_count or 0),
            retry_count=int(task.retry_count or 0),
            worker_id=settings.worker_id,
            token=token,
        )
        ctx = TaskContext(
            task_id=task.task_id,
            workflow_id=task.workflow_instance_id,
            task_type=spec.name,
            reference_name=task.reference_task_name or spec.name,
            retry_count=int(task.retry_count or 0),
            poll_count=int(task.poll_count or 0),
            worker_id=settings.worker_id,
            environment=settings.environment,
            delivery_token=token,
            _config=settings.handler_value,
            log=log,
            deadline=time.monotonic() + invocation.timeout_for(spec, settings),
        )
        timeout = int(task.response_timeout_seconds or spec.response_timeout_seconds)
        interval = max(1.0, settings.lease_factor * timeout)
        entry = InFlight(
            task, spec, ctx, interval, time.monotonic() + interval, polled=tracing.last_poll()
        )
        with self._lock:
            self._inflight[entry.key] = entry
        metrics.IN_FLIGHT.labels(task_type=spec.name).inc()
        thread = threading.Thread(
            target=self._run_attempt, args=(entry,), name=f"attempt-{task.task_id[:8]}", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            # No thread (the process is out of them): undo, and let the poll loop die of it.
            with self._lock:
                self._inflight.pop(entry.key, None)
            metrics.IN_FLIGHT.labels(task_type=spec.name).dec()
            self._slots[spec.name].release()
            raise

    # -- one attempt ----------------------------------------------------------------------

    def is_live(self, entry: InFlight, *, retry_seconds: float = 60) -> bool:
        """The attempt fence: Conductor still shows this task in progress for this poll.

        Unverifiable (Conductor unreachable for `retry_seconds`) counts as not live: a
        publish that cannot prove its attempt is current does not happen.
        """
        try:
            state = self.deps.conductor.task_state(entry.task.task_id, retry_seconds=retry_seconds)
        except Exception as exc:
            entry.ctx.log.warning("fence.unverifiable", error=str(exc)[:300])
            return False
        verdict = attempt_verdict(state, entry.ctx.delivery_token, entry.ctx.poll_count)
        if not verdict.live:
            metrics.FENCE_REJECTIONS.labels(
                task_type=entry.spec.name, fence="attempt", kind=verdict.kind
            ).inc()
            entry.ctx.log.warning("fence.rejected", kind=verdict.kind, reason=verdict.reason)
            entry.ctx.cancel(verdict.reason)
        return verdict.live

    def _run_attempt(self, entry: InFlight) -> None:
        """One attempt, then its tail: the fenced report, outside the attempt's slot.

        The slot bounds attempts doing work (a workspace, a handler, a publish). Once
        `Attempt.run` returns, all that is left is tidying and waiting on servers: a
        publish's folder fed to the cache and removed, the staging branch's deletion
        (started once the claim held the commit), the attempt fence's read and the report.
        So the slot goes back to the poll loop at once, and the next task's poll and start
        overlap this tail. The tail stays in flight (the drain waits for it) and keeps its
        order: the fence read, then the report, on this thread; the tidying runs beside the
        fence read and is done before the report.
        """
        spec, ctx = entry.spec, entry.ctx
        ctx.log.info("attempt.start", reference_name=ctx.reference_name)
        started = time.monotonic()
        slot = _SlotHold(self._slots[spec.name])
        try:
            span = tracing.attempt(ctx, entry.polled, self.settings)  # the root; or a no-op
        except Exception as exc:  # tracing must never hold a task: it runs untraced
            ctx.log.warning("tracing.failed", error=type(exc).__name__)
            span = tracing.OFF
        try:
            attempt = Attempt(
                spec,
                dict(entry.task.input_data or {}),
                ctx,
                self.deps,
                still_live=lambda: self.is_live(entry),
                incarnation=Incarnation.of(entry.task),
                defer_cleanup=True,
            )
            outcome = attempt.run()
            slot.release()
            cleanup = self._start_cleanup(attempt.cleanups)
            if ctx.timed_out and outcome.kind != FailureKind.TIMED_OUT.value:
                # Past its deadline before it began to publish, whatever phase it was in
                # (downloads, checks, staging) and whatever that phase made of it.
                outcome = self._timed_out(entry)
            if ctx.cancelled and not ctx.timed_out:
                # Cancelled means the lease was lost (a zombie must not report: its update
                # could overwrite the live attempt's) or the drain already reported it.
                outcome.report = False
            elif outcome.report and not outcome.verified_live and not self.is_live(entry):
                outcome.report = False
            if cleanup is not None:  # done before the report: a COMPLETED task left no
                # staging branch and no attempt folder
                cleanup.join(self.publish_wait_seconds)
            if outcome.report:
                self._report(entry, outcome)
            elif not entry.reported:
                ctx.log.warning("attempt.zombie", reason=ctx.cancel_reason or outcome.reason)
            metrics.TASKS.labels(
                task_type=spec.name, status=outcome.status.value, kind=outcome.kind
            ).inc()
            span.outcome(outcome)
            ctx.log.info(
                "attempt.done",
                status=outcome.status.value,
                kind=outcome.kind,
                seconds=round(time.monotonic() - started, 3),
                reason=outcome.reason or None,
            )
        finally:
            span.end(error=sys.exc_info()[1])
            with self._lock:
                self._inflight.pop(entry.key, None)
            metrics.IN_FLIGHT.labels(task_type=spec.name).dec()
            slot.release()

    @staticmethod
    def _start_cleanup(steps: list[Callable[[], object]]) -> threading.Thread | None:
        """Run an attempt's deferred tidying (`Attempt.cleanups`) on a thread of its own,
        so it overlaps the fence read; a failure is left to gc, as it always was."""
        if not steps:
            return None

        def run() -> None:
            for step in steps:
                with contextlib.suppress(Exception):
                    step()

        thread = threading.Thread(target=run, name="attempt-cleanup", daemon=True)
        thread.start()
        return thread

    def _timed_out(self, entry: InFlight) -> Outcome:
        timeout = invocation.timeout_for(entry.spec, self.settings)
        failure = TaskFailure(
            FailureKind.TIMED_OUT,
            f"the attempt passed its deadline of {timeout:g} s before it began to publish; "
            "nothing was published",
        )
        return Outcome(failure.status, reason=failure.reason, kind=failure.kind.value)

    def _report(self, entry: InFlight, outcome: Outcome) -> None:
        with entry.lock:
            if entry.reported:
                return
            entry.reported = True
        result = TaskResult(
            workflow_instance_id=entry.task.workflow_instance_id,
            task_id=entry.task.task_id,
            status=outcome.status.value,
            output_data=outcome.output,
            # Masked like the logs (a handler's exception text can carry a secret), then
            # bounded again: a mask is longer than a short secret.
            reason_for_incompletion=(
                bound_reason(plog.mask_text(outcome.reason, plog.secret_values(self.settings)))
                if outcome.reason
                else None
            ),
            worker_id=self.settings.worker_id,
        )
        started = time.monotonic()
        span = tracing.phase("report", {"perago.status": outcome.status.value})
        try:
            self.deps.conductor.update(result, retry_seconds=self.settings.report_retry_seconds)
        except Exception as exc:
            # Nothing is lost: the task times out and its retry adopts the publish.
            span.fail(exc)
            entry.ctx.log.error("report.failed", error=str(exc)[:300])
        finally:
            span.end()
            metrics.PHASE_SECONDS.labels(task_type=entry.spec.name, phase="report").observe(
                time.monotonic() - started
            )

    # -- queue depth ----------------------------------------------------------------------

    def _queue_depth_loop(self, beat: Heartbeat) -> None:
        """`perago_queue_depth`: Conductor's queue size of every task type this worker
        serves, one request every `queue_depth_every_seconds` (the autoscaling signal).

        A failed read keeps the last values, logs `queue_depth.failed` and tries again on
        time: the loop never dies of Conductor. It ends when the drain begins.
        """
        every = self.settings.queue_depth_every_seconds
        names = sorted(self.app.tasks)
        warned: dict[str, int] = {}  # task type -> the undomained count last warned about
        while not self._draining.is_set():
            beat.stamp(call_bound(self._request_timeout, QUEUE_DEPTH_RETRY_SECONDS))
            try:
                sizes = self.deps.conductor.queue_sizes(
                    names, self.settings.task_domain, retry_seconds=QUEUE_DEPTH_RETRY_SECONDS
                )
            except Exception as exc:
                self.log.warning("queue_depth.failed", error=str(exc)[:300])
            else:
                for name, size in sizes.items():
                    metrics.QUEUE_DEPTH.labels(task_type=name).set(size)
            if self.settings.task_domain:
                self._warn_undomained(names, warned)
            beat.stamp(every)
            self._draining.wait(every)

    def _warn_undomained(self, names: list[str], warned: dict[str, int]) -> None:
        """Tasks waiting in the queue *without* a domain while this worker polls one: the
        workflow was started without `taskToDomain`, and no worker of this domain will ever
        see them. Said once per task type and count, so a stuck newcomer reads why."""
        domain = self.settings.task_domain
        try:
            waiting = self.deps.conductor.queue_sizes(
                names, None, retry_seconds=QUEUE_DEPTH_RETRY_SECONDS
            )
        except Exception:
            return  # the domained read above already says whether Conductor answers
        for name, count in waiting.items():
            if count > 0 and warned.get(name) != count:
                self.log.warning(
                    "queue.undomained",
                    task_type=name,
                    waiting=count,
                    domain=domain,
                    hint=f"{count} task(s) of type {name} wait without a domain, but this "
                    f"worker polls domain {domain!r}: start the workflow with taskToDomain "
                    f'{{"{name}": "{domain}"}} (or run a worker without task_domain)',
                )
            warned[name] = count

    # -- leases ---------------------------------------------------------------------------

    def _lease_loop(self, beat: Heartbeat) -> None:
        while not self._stopped.is_set():
            beat.stamp(LEASE_TICK_SECONDS)
            faultpoints.fail("lease.die")
            now = time.monotonic()
            with self._lock:
                entries = list(self._inflight.values())
            for e in entries:
                # The deadline: cancelled unless already publishing (a merge is never cut).
                deadline = e.ctx.deadline
                if deadline is None or now < deadline:
                    continue
                if e.ctx.expire("the attempt passed its deadline"):
                    e.ctx.log.warning("attempt.deadline", seconds_over=round(now - deadline, 3))
            bound = self.publish_wait_seconds
            due = [e for e in entries if renews_lease(e, now, bound)]
            if faultpoints.armed("lease.disabled"):
                due = []
            for entry in due:
                beat.stamp(self.lease_period)
                entry.next_lease = time.monotonic() + entry.interval
                try:
                    # Under the entry's lock, so that the report (which marks the entry under
                    # it) waits for an extension in flight: an IN_PROGRESS update that reached
                    # Conductor after the final report could reopen a finished task. Only one
                    # of the two is sent at a time, and no extension after the report.
                    with entry.lock:
                        if entry.reported:
                            continue
                        self.deps.conductor.extend_lease(entry.task)
                    metrics.LEASE_EXTENSIONS.labels(task_type=entry.spec.name, result="ok").inc()
                    # A worker whose every slot is busy does not poll; a lease that reaches
                    # Conductor is as good a sign of life.
                    self.lifecycle.heartbeat()
                except Exception as exc:
                    metrics.LEASE_EXTENSIONS.labels(task_type=entry.spec.name, result="error").inc()
                    entry.ctx.log.warning("lease.failed", error=str(exc)[:200])
                    continue
                self.is_live(entry, retry_seconds=LEASE_FENCE_RETRY_SECONDS)
            self._stopped.wait(LEASE_TICK_SECONDS)
