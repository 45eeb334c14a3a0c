"""Specification of `perago_worker.observability.tracing` and `perago_worker.links` in isolation.

Off is the default and costs nothing measurable: no OpenTelemetry import, one shared no-op
object per phase. On, spans carry numbers and short strings only; a failed poll is an ERROR
span of its own; a configured endpoint without the extra installed is one clear error.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from perago_worker import links
from perago_worker.compose import CliError, setup_tracing
from perago_worker.context import TaskContext
from perago_worker.contract import FailureKind, TaskFailure
from perago_worker.observability import logging as plog
from perago_worker.observability import tracing
from perago_worker.settings import Settings

PHASES_PER_TASK = 12  # poll .. report, as the integration test pins


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


def _ctx() -> TaskContext:
    return TaskContext(
        task_id="t-1",
        workflow_id="wf-1",
        task_type="ingest",
        reference_name="ingest_ref",
        retry_count=2,
        poll_count=3,
        worker_id="w-1",
        environment="dev",
        delivery_token="w-1#abc",
    )


# -- off --------------------------------------------------------------------------------------


def test_off_every_call_is_the_shared_no_op() -> None:
    assert not tracing.enabled()
    assert tracing.phase("validate") is tracing.OFF
    assert tracing.attempt(_ctx()) is tracing.OFF
    assert tracing.poll_started() is None
    assert tracing.last_poll() is None
    tracing.poll_ended(None, "ingest", 3)
    tracing.OFF.end({"files": 1}, ValueError("x"))  # does nothing, raises nothing


def test_off_the_worker_never_imports_opentelemetry() -> None:
    code = (
        "import sys; import perago_worker.runner, perago_worker.attempt, perago_worker.cli; "
        "from perago_worker.observability import tracing; "
        "s = tracing.phase('x'); s.end({'a': 1}); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def _per_phase_seconds(calls: int = 50_000) -> float:
    figures = {"files": 3, "bytes": 1024, "changes": "+1 ~0 -0"}
    started = time.perf_counter()
    for _ in range(calls):
        span = tracing.phase("materialize")
        span.end(figures, None)
    return (time.perf_counter() - started) / calls


def test_off_a_phase_costs_well_under_a_microsecond_so_nothing_per_task() -> None:
    per_phase = min(_per_phase_seconds() for _ in range(3))
    print(
        f"tracing off: {per_phase * 1e9:.0f} ns per phase, {per_phase * PHASES_PER_TASK * 1e6:.2f} µs per task"
    )
    assert per_phase * PHASES_PER_TASK < 20e-6  # a task takes tens of milliseconds at least


def test_on_a_phase_costs_tens_of_microseconds(spans: InMemorySpanExporter) -> None:
    attempt = tracing.attempt(_ctx())
    per_phase = min(_per_phase_seconds(5_000) for _ in range(3))
    attempt.end()
    print(
        f"tracing on: {per_phase * 1e6:.1f} µs per phase, {per_phase * PHASES_PER_TASK * 1e6:.0f} µs per task"
    )
    assert per_phase * PHASES_PER_TASK < 5e-3


# -- on ---------------------------------------------------------------------------------------


def test_a_phase_span_is_a_child_of_the_attempt_and_carries_identity_and_figures(
    spans: InMemorySpanExporter,
) -> None:
    attempt = tracing.attempt(_ctx())
    phase = tracing.phase("stage")
    phase.end(
        {
            "files": 2,
            "merged": True,
            "ratio": 0.5,
            "changes": "+2 ~0 -0",
            "long": "x" * (tracing.MAX_TEXT + 1),
            "nested": {"a": 1},
            "missing": None,
        }
    )
    attempt.end()
    stage, root = spans.get_finished_spans()
    assert stage.parent is not None and stage.parent.span_id == root.context.span_id
    assert root.parent is None
    attrs = dict(stage.attributes or {})
    assert attrs == {
        "perago.task_id": "t-1",
        "perago.workflow_id": "wf-1",
        "perago.task_type": "ingest",
        "perago.retry_count": 2,
        "perago.attempt": 3,
        "perago.files": 2,
        "perago.merged": True,
        "perago.ratio": 0.5,
        "perago.changes": "+2 ~0 -0",
    }
    assert root.attributes["perago.reference_name"] == "ingest_ref"  # type: ignore[index]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (TaskFailure(FailureKind.POST_CHECK, "out/x missing"), "post_check"),
        (type("Cancelled", (Exception,), {})("lease lost"), "aborted"),
        (type("_Stale", (Exception,), {})("superseded"), "zombie"),
        (OSError("disk on fire https://bucket/key?X-Amz-Signature=abc"), "infrastructure"),
    ],
)
def test_a_phase_that_raises_is_an_error_span_with_its_kind_and_no_exception_text(
    spans: InMemorySpanExporter, error: BaseException, kind: str
) -> None:
    tracing.phase("materialize").end({}, error)
    [span] = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and span.status.description == kind
    assert span.attributes["perago.failure_kind"] == kind  # type: ignore[index]
    assert span.attributes["exception.type"] == type(error).__name__  # type: ignore[index]
    assert not span.events
    assert "Signature" not in repr(dict(span.attributes or {}))


def test_the_attempts_failure_reason_is_masked(spans: InMemorySpanExporter) -> None:
    from perago_worker.attempt import Outcome
    from perago_worker.contract import Status

    settings = Settings(handler_secrets={"TOKEN": "hunter2-s3cr3t"})
    attempt = tracing.attempt(_ctx(), settings=settings)
    attempt.outcome(
        Outcome(
            Status.FAILED, reason="handler_error: bad token hunter2-s3cr3t", kind="handler_error"
        )
    )
    attempt.end()
    [span] = spans.get_finished_spans()
    assert span.attributes["perago.reason"] == f"handler_error: bad token {plog.MASK}"  # type: ignore[index]
    assert span.status.description == "handler_error"


def test_a_failed_poll_is_an_error_span_and_an_empty_one_leaves_none(
    spans: InMemorySpanExporter,
) -> None:
    tracing.poll_ended(tracing.poll_started(), "ingest", 0)
    assert spans.get_finished_spans() == () and tracing.last_poll() is None
    started = tracing.poll_started()
    tracing.poll_ended(started, "ingest", 2)
    window = tracing.last_poll()
    assert window is not None and window.tasks == 2 and window.start_ns == started
    tracing.poll_ended(tracing.poll_started(), "ingest", 0, ConnectionError("refused"))
    [span] = spans.get_finished_spans()
    assert span.name == "poll" and span.parent is None
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["exception.type"] == "ConnectionError"  # type: ignore[index]


# -- set-up -----------------------------------------------------------------------------------


def test_without_an_endpoint_setup_does_nothing() -> None:
    assert tracing.setup(Settings()) is False
    assert setup_tracing(Settings()) is False
    assert not tracing.enabled()


def test_with_an_endpoint_but_no_extra_installed_run_stops_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    settings = Settings(tracing={"otlp_endpoint": "http://collector:4318"})
    with pytest.raises(CliError, match=r"pip install 'perago-worker\[tracing\]'"):
        setup_tracing(settings)
    assert not tracing.enabled()


def test_setup_exports_to_the_traces_path_and_shutdown_turns_it_off() -> None:
    settings = Settings(
        tracing={"otlp_endpoint": "http://127.0.0.1:9/", "headers": {"x-key": "abc-s3cr3t"}}
    )
    assert tracing.setup(settings, global_provider=False) is True
    try:
        assert tracing.enabled()
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


@pytest.mark.parametrize(
    ("given", "endpoint"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otel.example/v1/traces", "https://otel.example/v1/traces"),
        ("https://gw.example/otlp", "https://gw.example/otlp/v1/traces"),
    ],
)
def test_the_traces_path_is_appended_unless_given(given: str, endpoint: str) -> None:
    assert tracing.traces_endpoint(given) == endpoint


def test_the_logged_endpoint_drops_credentials_and_query() -> None:
    got = tracing.safe_endpoint("https://user:pw@otel.example:4318/v1/traces?key=k")
    assert got == "https://otel.example:4318/v1/traces"


def test_tracing_header_values_are_secrets() -> None:
    settings = Settings(tracing={"headers": {"x-honeycomb-team": "team-s3cr3t"}})
    assert "team-s3cr3t" in plog.secret_values(settings)
    assert "team-s3cr3t" not in repr(settings.masked())


# -- links ------------------------------------------------------------------------------------


def test_links_are_none_unless_their_ui_address_is_set() -> None:
    settings = Settings()
    assert links.commit_url(settings, "repo", "abc") is None
    assert links.workflow_url(settings, "wf") is None


def test_links_are_the_ui_pages_of_a_commit_and_a_workflow() -> None:
    settings = Settings(
        lakefs={"ui_url": "https://lakefs.example/"},
        conductor={"ui_url": "https://conductor.example/ui"},
    )
    assert (
        links.commit_url(settings, "sales", "0123abc")
        == "https://lakefs.example/repositories/sales/commits/0123abc"
    )
    assert links.workflow_url(settings, "a-b/c") == "https://conductor.example/ui/execution/a-b%2Fc"
