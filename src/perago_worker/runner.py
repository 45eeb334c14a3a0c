"""The daemon's loop: poll, run attempts in a bounded pool, keep leases, report, drain.

One poller thread per task type long-polls Conductor for as many tasks as it has free
slots (batch poll, timeout <= 5 s). Each attempt runs on its own daemon thread, so a handler
stuck in C code can never keep the process from exiting after a drain. A single lease
keeper thread extends the leases of all in-flight attempts and reads each task back: a task
that timed out, was cancelled or re-delivered cancels its attempt cooperatively.

Reports use `POST /api/tasks` with retries, never `update-v2` (which hands out a next
task that a draining worker would strand).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from conductor.client.http.models.task import Task
from conductor.client.http.models.task_result import TaskResult

from perago_worker import faultpoints
from perago_worker.app import TaskSpec, Worker
from perago_worker.attempt import Attempt, Deps, Outcome
from perago_worker.context import TaskContext
from perago_worker.contract import Status, bound_reason
from perago_worker.fences import Incarnation, attempt_verdict, delivery_token
from perago_worker.observability import logging as plog
from perago_worker.observability import metrics


class Lifecycle:
    """starting -> validating -> running -> draining -> stopped (or failed)."""

    def __init__(self) -> None:
        self.state = "starting"
        self.preflight_ok = False
        self.last_poll: float | None = None
        metrics.set_state(self.state)

    def set(self, state: str) -> None:
        self.state = state
        metrics.set_state(state)

    @property
    def ready(self) -> bool:
        return self.preflight_ok and self.state == "running"

    def heartbeat(self) -> None:
        self.last_poll = time.time()
        metrics.LAST_POLL.set(self.last_poll)


@dataclass
class InFlight:
    task: Task
    spec: TaskSpec
    ctx: TaskContext
    interval: float
    next_lease: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    reported: bool = False

    @property
    def key(self) -> str:
        """One per delivery: its token is never reused, whatever Conductor resets."""
        return f"{self.task.task_id}@{self.ctx.delivery_token}"


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
        self._slots = {
            name: threading.BoundedSemaphore(self.settings.concurrency_for(name))
            for name in app.tasks
        }

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.lifecycle.set("running")
        for spec in self.app.tasks.values():
            thread = threading.Thread(
                target=self._poll_loop, args=(spec,), name=f"poll-{spec.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        keeper = threading.Thread(target=self._lease_loop, name="lease-keeper", daemon=True)
        keeper.start()
        self.log.info(
            "worker.running",
            task_types=sorted(self.app.tasks),
            domain=self.settings.task_domain,
            environment=self.settings.environment,
        )

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

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
        while not stop.wait(0.5):
            pass
        self.drain()
        return 0

    def drain(self) -> None:
        """Stop polling, let in-flight attempts finish within the grace, abort the rest."""
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
        self.lifecycle.set("stopped")
        self.log.info("worker.stopped", aborted=aborted)

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

    def _poll_loop(self, spec: TaskSpec) -> None:
        """Long-poll for one task, then sweep up a backlog without waiting.

        Conductor's batch poll waits out its whole timeout trying to fill the batch, so
        asking for N tasks with a 2 s timeout delays a lone task by 2 s. One task is asked
        for with the long timeout (answered as soon as it arrives); only when one came and
        more slots are free is a batch asked for with no wait at all.
        """
        slots = self._slots[spec.name]
        backoff = 0.0
        while not self._draining.is_set():
            if not slots.acquire(timeout=0.5):
                continue
            token = delivery_token(self.settings.worker_id)
            tasks = self._poll(spec, token, 1, self.settings.poll_timeout_ms)
            if tasks is None:
                slots.release()
                backoff = min(30.0, max(0.5, backoff * 2))
                self._draining.wait(backoff * random.uniform(0.5, 1.0))
                continue
            backoff = 0.0
            if not tasks:
                slots.release()
                continue
            for task in tasks:
                faultpoints.hit("poll.received")
                self._launch(spec, task, token)
            extra = 0
            while extra < self.settings.poll_batch - 1 and slots.acquire(blocking=False):
                extra += 1
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
        try:
            tasks = self.deps.conductor.batch_poll(
                spec.name, token, self.settings.task_domain, count, timeout_ms
            )
        except Exception as exc:
            metrics.POLLS.labels(task_type=spec.name, result="error").inc()
            self.log.warning("poll.failed", task_type=spec.name, error=str(exc)[:300])
            return None
        finally:
            metrics.PHASE_SECONDS.labels(task_type=spec.name, phase="poll").observe(
                time.monotonic() - started
            )
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
        )
        timeout = int(task.response_timeout_seconds or spec.response_timeout_seconds)
        interval = max(1.0, settings.lease_factor * timeout)
        entry = InFlight(task, spec, ctx, interval, time.monotonic() + interval)
        with self._lock:
            self._inflight[entry.key] = entry
        metrics.IN_FLIGHT.labels(task_type=spec.name).inc()
        thread = threading.Thread(
            target=self._run_attempt, args=(entry,), name=f"attempt-{task.task_id[:8]}", daemon=True
        )
        thread.start()

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
        spec, ctx = entry.spec, entry.ctx
        ctx.log.info("attempt.start", reference_name=ctx.reference_name)
        started = time.monotonic()
        try:
            attempt = Attempt(
                spec,
                dict(entry.task.input_data or {}),
                ctx,
                self.deps,
                still_live=lambda: self.is_live(entry),
                incarnation=Incarnation.of(entry.task),
            )
            outcome = attempt.run()
            if ctx.cancelled:
                # Cancelled means the lease was lost (a zombie must not report: its update
                # could overwrite the live attempt's) or the drain already reported it.
                outcome.report = False
            elif outcome.report and not outcome.verified_live and not self.is_live(entry):
                outcome.report = False
            if outcome.report:
                self._report(entry, outcome)
            elif not entry.reported:
                ctx.log.warning("attempt.zombie", reason=ctx.cancel_reason or outcome.reason)
            metrics.TASKS.labels(
                task_type=spec.name, status=outcome.status.value, kind=outcome.kind
            ).inc()
            ctx.log.info(
                "attempt.done",
                status=outcome.status.value,
                kind=outcome.kind,
                seconds=round(time.monotonic() - started, 3),
                reason=outcome.reason or None,
            )
        finally:
            with self._lock:
                self._inflight.pop(entry.key, None)
            metrics.IN_FLIGHT.labels(task_type=spec.name).dec()
            self._slots[spec.name].release()

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
            reason_for_incompletion=bound_reason(outcome.reason) if outcome.reason else None,
            worker_id=self.settings.worker_id,
        )
        started = time.monotonic()
        try:
            self.deps.conductor.update(result, retry_seconds=self.settings.report_retry_seconds)
        except Exception as exc:
            # Nothing is lost: the task times out and its retry adopts the publish.
            entry.ctx.log.error("report.failed", error=str(exc)[:300])
        finally:
            metrics.PHASE_SECONDS.labels(task_type=entry.spec.name, phase="report").observe(
                time.monotonic() - started
            )

    # -- leases ---------------------------------------------------------------------------

    def _lease_loop(self) -> None:
        while not self._stopped.is_set():
            now = time.monotonic()
            with self._lock:
                # A cancelled attempt (superseded, or given up by the drain) renews nothing:
                # its task id may already belong to a newer delivery, whose lease is not ours.
                due = [
                    e
                    for e in self._inflight.values()
                    if e.next_lease <= now and not e.reported and not e.ctx.cancelled
                ]
            if faultpoints.armed("lease.disabled"):
                due = []
            for entry in due:
                entry.next_lease = time.monotonic() + entry.interval
                try:
                    self.deps.conductor.extend_lease(entry.task)
                    metrics.LEASE_EXTENSIONS.labels(task_type=entry.spec.name, result="ok").inc()
                    # A worker whose every slot is busy does not poll; a lease that reaches
                    # Conductor is as good a sign of life.
                    self.lifecycle.heartbeat()
                except Exception as exc:
                    metrics.LEASE_EXTENSIONS.labels(task_type=entry.spec.name, result="error").inc()
                    entry.ctx.log.warning("lease.failed", error=str(exc)[:200])
                    continue
                self.is_live(entry, retry_seconds=2)
            self._stopped.wait(0.25)
