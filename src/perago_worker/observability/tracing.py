"""OpenTelemetry traces: one span per attempt, a child span per phase; a no-op unless set up.

Off (the default: `tracing.otlp_endpoint` unset) this module imports nothing of OpenTelemetry
and every call below returns at once: `phase` and `attempt` hand back one shared object whose
methods do nothing, so a worker without the `tracing` extra installed runs the same code.
On (`setup`, from `perago-worker run`), spans go to an OTLP/HTTP collector through a
`BatchSpanProcessor`: they are exported on its own thread, never on an attempt's.

One attempt is one trace:

    attempt                      root: from its poll to its report; the outcome's status
      poll                       the (batch) poll that delivered the task
      validate, fence, materialize, pre_check, handler, post_check, stage, fence, claim, merge
      report                     the update sent to Conductor

Every span carries the task's identity (`perago.task_id`, `perago.workflow_id`,
`perago.task_type`, `perago.retry_count`, `perago.attempt`); a phase's span also carries the
figures its `<phase>.done` log event has (as `perago.<figure>`) when they are numbers, booleans
or short strings. A failed attempt or phase has status ERROR with the failure kind as its
description and in `perago.failure_kind`. No span carries a secret, an exception's text (a
server's message can hold a presigned URL) or a handler's params: the attempt's failure reason
is masked like the logs before it becomes `perago.reason`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from perago_worker._version import __version__
from perago_worker.contract import TaskFailure

if TYPE_CHECKING:
    from perago_worker.context import TaskContext
    from perago_worker.settings import Settings

TRACES_PATH = "/v1/traces"
MAX_TEXT = 256  # longer strings are not span attributes
IDENTITY = "perago.identity"  # the context key under which an attempt's identity travels
EXTRA_INSTALL = "pip install 'perago-worker[tracing]'"


class TracingUnavailable(RuntimeError):
    """Tracing is configured but the OpenTelemetry SDK and exporter are not installed."""


class _Off:
    """The span of a worker that traces nothing: every method does nothing."""

    __slots__ = ()

    def set(self, figures: Mapping[str, Any]) -> None:
        pass

    def fail(self, error: BaseException | str) -> None:
        pass

    def outcome(self, outcome: Any) -> None:
        pass

    def end(
        self, figures: Mapping[str, Any] | None = None, error: BaseException | None = None
    ) -> None:
        pass


OFF = _Off()


@dataclass(frozen=True)
class PollWindow:
    """When the poll that delivered a task ran (wall clock, ns) and how many tasks it took."""

    start_ns: int
    end_ns: int
    tasks: int


class _On:
    """A tracer and the few OpenTelemetry functions the spans use (imported once)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Status, StatusCode

        self.provider = provider
        self.tracer = provider.get_tracer("perago_worker", __version__)
        self.context = context
        self.trace = trace
        self.error = StatusCode.ERROR
        self.status = Status


_on: _On | None = None
_local = threading.local()  # per poll thread: the window of its latest poll


def enabled() -> bool:
    return _on is not None


def _kind(error: BaseException | str) -> str:
    """The failure kind an exception leaving a phase stands for (`contract.FailureKind`)."""
    if isinstance(error, str):
        return error
    if isinstance(error, TaskFailure):
        return error.kind.value
    return {"Cancelled": "aborted", "_Stale": "zombie"}.get(type(error).__name__, "infrastructure")


def _attributes(figures: Mapping[str, Any], prefix: str = "perago.") -> dict[str, Any]:
    """Figures that make span attributes: numbers, booleans, short strings."""
    out: dict[str, Any] = {}
    for key, value in figures.items():
        if isinstance(value, bool | int | float) or (
            isinstance(value, str) and len(value) <= MAX_TEXT
        ):
            out[prefix + key] = value
    return out


class _Span:
    """A recording span, current in the thread's context until it ends."""

    __slots__ = ("_ended", "_on", "_secrets", "_span", "_token")

    def __init__(
        self,
        on: _On,
        name: str,
        attributes: dict[str, Any],
        *,
        root: bool = False,
        start_ns: int | None = None,
        identity: dict[str, Any] | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        ctx = on.context.Context() if root else None
        self._on = on
        self._secrets = secrets
        self._span = on.tracer.start_span(
            name, context=ctx, attributes=attributes, start_time=start_ns
        )
        current = on.trace.set_span_in_context(self._span)
        if identity is not None:
            current = on.context.set_value(IDENTITY, identity, current)
        self._token = on.context.attach(current)
        self._ended = False

    @property
    def span(self) -> Any:
        return self._span

    def set(self, figures: Mapping[str, Any]) -> None:
        self._span.set_attributes(_attributes(figures))

    def fail(self, error: BaseException | str) -> None:
        kind = _kind(error)
        self._span.set_attribute("perago.failure_kind", kind)
        if not isinstance(error, str):
            self._span.set_attribute("exception.type", type(error).__name__)
        self._span.set_status(self._on.status(self._on.error, kind))

    def outcome(self, outcome: Any) -> None:
        """An attempt's end: its status and kind, and its masked reason when it failed."""
        from perago_worker.observability import logging as plog

        status = outcome.status.value
        self._span.set_attribute("perago.status", status)
        self._span.set_attribute("perago.kind", outcome.kind)
        self._span.set_attribute("perago.reported", bool(outcome.report))
        ref = (outcome.output.get("workspace") or {}).get("ref")
        if isinstance(ref, str):
            self._span.set_attribute("perago.output_ref", ref)
        if status != "COMPLETED":
            if outcome.reason:
                reason = plog.mask_text(outcome.reason, self._secrets)
                self._span.set_attribute("perago.reason", reason[:1000])
            self.fail(outcome.kind)

    def end(
        self, figures: Mapping[str, Any] | None = None, error: BaseException | None = None
    ) -> None:
        if self._ended:
            return
        self._ended = True
        if figures:
            self.set(figures)
        if error is not None:
            self.fail(error)
        try:
            self._on.context.detach(self._token)
        finally:
            self._span.end()


def phase(name: str, attributes: Mapping[str, Any] | None = None) -> _Span | _Off:
    """A phase's span, child of the span current in this thread (the attempt's)."""
    on = _on
    if on is None:
        return OFF
    identity = on.context.get_value(IDENTITY)
    attrs: dict[str, Any] = dict(identity) if isinstance(identity, dict) else {}
    if attributes:
        attrs.update(attributes)
    return _Span(on, name, attrs)


def attempt(
    ctx: TaskContext, polled: PollWindow | None = None, settings: Settings | None = None
) -> _Span | _Off:
    """The root span of one attempt (current in this thread until `end`), with its poll."""
    on = _on
    if on is None:
        return OFF
    identity = {
        "perago.task_id": ctx.task_id,
        "perago.workflow_id": ctx.workflow_id,
        "perago.task_type": ctx.task_type,
        "perago.retry_count": ctx.retry_count,
        "perago.attempt": ctx.poll_count,
    }
    attrs = {
        **identity,
        "perago.reference_name": ctx.reference_name,
        "perago.worker_id": ctx.worker_id,
        "perago.environment": ctx.environment,
    }
    if settings is not None:
        from perago_worker.links import workflow_url

        url = workflow_url(settings, ctx.workflow_id)
        if url:
            attrs["perago.workflow_url"] = url
    secrets: list[str] = []
    if settings is not None:
        from perago_worker.observability import logging as plog

        secrets = plog.secret_values(settings)
    span = _Span(
        on,
        "attempt",
        attrs,
        root=True,
        start_ns=polled.start_ns if polled else None,
        identity=identity,
        secrets=secrets,
    )
    if polled is not None:
        poll = on.tracer.start_span(
            "poll",
            context=on.trace.set_span_in_context(span.span),
            attributes={**identity, "perago.tasks": polled.tasks},
            start_time=polled.start_ns,
        )
        poll.end(end_time=polled.end_ns)
    return span


# -- polls: the window is noted by the poll thread and taken by its launches ------------------


def poll_started() -> int | None:
    """The poll's start (wall clock, ns), or None when tracing is off."""
    return time.time_ns() if _on is not None else None


def poll_ended(
    started: int | None, task_type: str, tasks: int, error: BaseException | None = None
) -> None:
    """Note the poll's window for the attempts it delivers; a failed poll is a span of its
    own (status ERROR). An empty poll leaves no span: `perago_polls_total` counts those."""
    on = _on
    if on is None or started is None:
        return
    ended = time.time_ns()
    _local.window = PollWindow(started, ended, tasks) if tasks else None
    if error is not None:
        span = on.tracer.start_span(
            "poll",
            context=on.context.Context(),
            attributes={
                "perago.task_type": task_type,
                "perago.failure_kind": "infrastructure",
                "exception.type": type(error).__name__,
            },
            start_time=started,
        )
        span.set_status(on.status(on.error, "poll_failed"))
        span.end(end_time=ended)


def last_poll() -> PollWindow | None:
    """The window of this thread's latest poll (None when off or it took nothing)."""
    if _on is None:
        return None
    window: PollWindow | None = getattr(_local, "window", None)
    return window


# -- set-up -----------------------------------------------------------------------------------


def traces_endpoint(url: str) -> str:
    """The OTLP/HTTP traces address: `/v1/traces` appended unless the path ends with it."""
    url = url.rstrip("/")
    return url if url.endswith(TRACES_PATH) else url + TRACES_PATH


def safe_endpoint(url: str) -> str:
    """The address without user information or query (for a log line)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def install(provider: Any | None) -> None:
    """Trace into `provider` (an SDK `TracerProvider`); None turns tracing off again."""
    global _on
    _on = None if provider is None else _On(provider)


def setup(settings: Settings, *, global_provider: bool = True) -> bool:
    """Trace to the configured OTLP/HTTP endpoint; False (and nothing imported) when unset.

    The provider becomes OpenTelemetry's global one too (`global_provider`), so spans a
    handler starts with `opentelemetry.trace.get_tracer(...)` land in the same place.
    """
    cfg = settings.tracing
    if not cfg.otlp_endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing.otlp_endpoint is set but OpenTelemetry is not installed ({exc}); "
            f"install the tracing extra: {EXTRA_INSTALL}"
        ) from None
    resource = Resource.create(
        {
            "service.name": cfg.service_name,
            "service.version": __version__,
            "service.instance.id": settings.worker_id,
            "deployment.environment": settings.environment,
        }
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio))
    )
    exporter = OTLPSpanExporter(
        endpoint=traces_endpoint(cfg.otlp_endpoint),
        headers={k: v.get_secret_value() for k, v in cfg.headers.items()},
        timeout=cfg.timeout_seconds,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if global_provider:
        trace.set_tracer_provider(provider)
    install(provider)
    return True


def shutdown() -> None:
    """Export what is buffered, then stop tracing (the daemon's end)."""
    on = _on
    install(None)
    if on is not None:
        on.provider.shutdown()
