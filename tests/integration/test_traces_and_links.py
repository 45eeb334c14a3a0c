"""Traces and links on the real servers.

Tracing: one attempt is one trace, its root `attempt` span and a child span per phase in the
pipeline's order, each with the task's identity and the phase's figures; a failing task has
ERROR spans naming its failure kind; a real worker process exports them over OTLP/HTTP.

Links: with `lakefs.ui_url` and `conductor.ui_url` set, the merge's log event carries the
commit's lakeFS page and every published commit carries the workflow's Conductor page; with
neither set, neither appears; the task output is the contract's either way.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tracing_app
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from structlog.testing import capture_logs

from perago_testing import InProcessWorker, one_task_workflow, seed, suffix, task_of, wait_until
from perago_worker import fences
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app, wait_for_workflow
from perago_worker.devstack.servers import Endpoints
from perago_worker.devstack.worker_process import start_worker as start_process
from perago_worker.lakefs import LakeFS
from perago_worker.observability import tracing
from perago_worker.settings import ConductorSettings, LakeFSSettings

S = suffix()
HERE = Path(__file__).parent
LINKED = f"linked_write_{S}"  # served with both UI addresses set
PLAIN = f"plain_write_{S}"  # served with neither
PROCESS = f"traced_write_{S}"  # served by a real worker process (tracing_app:app)
LAKEFS_UI = "https://lakefs.example.test/ui"
CONDUCTOR_UI = "https://conductor.example.test"
PHASES = [
    "poll",
    "validate",
    "fence",
    "materialize",
    "pre_check",
    "handler",
    "post_check",
    "stage",
    "fence",
    "claim",
    "merge",
    "report",
]
IDENTITY = ("perago.task_id", "perago.workflow_id", "perago.task_type", "perago.retry_count")


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)
    provider.shutdown()


@pytest.fixture(scope="module")
def linked(
    start_worker: Callable[..., InProcessWorker],
    endpoints: Endpoints,
    spans: InMemorySpanExporter,
) -> InProcessWorker:
    return start_worker(
        tracing_app.build_app(LINKED),
        lakefs=LakeFSSettings(
            endpoint=endpoints.lakefs_url,
            access_key_id=endpoints.lakefs_access_key_id,
            secret_access_key=endpoints.lakefs_secret_access_key,
            ui_url=LAKEFS_UI + "/",  # a trailing slash is dropped
        ),
        conductor=ConductorSettings(url=endpoints.conductor_url, ui_url=CONDUCTOR_UI),
    )


@pytest.fixture(scope="module")
def plain(start_worker: Callable[..., InProcessWorker]) -> InProcessWorker:
    return start_worker(tracing_app.build_app(PLAIN))


@pytest.fixture(scope="module")
def base(lakefs: LakeFS, repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return seed(lakefs, repo, {"traced/in/source.txt": b"payload"}, tmp_path_factory.mktemp("s"))


def task_input(repo: str, ref: str, **params: Any) -> dict[str, Any]:
    ws = {"repository": repo, "branch": "main", "ref_type": "commit", "ref": ref}
    return {"workspace": ws, "params": params}


def trace_of(spans: InMemorySpanExporter, task_id: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The attempt span of `task_id` and the other spans of its trace, in start order."""

    def root() -> ReadableSpan | None:
        for span in spans.get_finished_spans():
            attrs = span.attributes or {}
            if span.name == "attempt" and attrs.get("perago.task_id") == task_id:
                return span
        return None

    assert wait_until(lambda: root() is not None, timeout=10), f"no attempt span for {task_id}"
    attempt = root()
    assert attempt is not None and attempt.context is not None
    trace_id = attempt.context.trace_id
    children = [
        s
        for s in spans.get_finished_spans()
        if s.context is not None and s.context.trace_id == trace_id and s is not attempt
    ]
    return attempt, sorted(children, key=lambda s: s.start_time or 0)


# -- tracing ----------------------------------------------------------------------------------


def test_an_attempt_is_one_trace_with_a_child_span_per_phase_in_order(
    linked: InProcessWorker, spans: InMemorySpanExporter, lakefs: LakeFS, repo: str, base: str
) -> None:
    run = linked.run(LINKED, task_input(repo, base, name="tree.txt"))
    task = task_of(run)
    assert task.status == "COMPLETED", task.reason_for_incompletion
    ref = task.output_data["workspace"]["ref"]
    attempt, children = trace_of(spans, task.task_id)

    assert attempt.parent is None  # the root
    assert [s.name for s in children] == PHASES
    assert all(
        s.parent is not None and s.parent.span_id == attempt.context.span_id for s in children
    )
    assert attempt.start_time is not None and attempt.end_time is not None
    assert attempt.start_time <= children[0].start_time  # it covers its poll ...
    assert all(s.end_time <= attempt.end_time for s in children)  # ... and its report
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(children))

    attrs = dict(attempt.attributes or {})
    assert attrs["perago.task_id"] == task.task_id
    assert attrs["perago.workflow_id"] == run.workflow_id
    assert attrs["perago.task_type"] == LINKED
    assert attrs["perago.retry_count"] == 0 and attrs["perago.attempt"] == 1
    assert attrs["perago.reference_name"] == "only"
    assert attrs["perago.status"] == "COMPLETED" and attrs["perago.kind"] == "ok"
    assert attrs["perago.output_ref"] == ref
    assert attrs["perago.workflow_url"] == f"{CONDUCTOR_UI}/execution/{run.workflow_id}"
    for span in children:
        span_attrs = span.attributes or {}
        assert {k: span_attrs[k] for k in IDENTITY} == {k: attrs[k] for k in IDENTITY}, span.name
        assert span.status.status_code != StatusCode.ERROR, span.name
    assert attempt.status.status_code != StatusCode.ERROR

    by_name = {s.name: dict(s.attributes or {}) for s in children}
    assert by_name["poll"]["perago.tasks"] == 1
    assert by_name["materialize"]["perago.files"] == 1
    assert by_name["materialize"]["perago.bytes"] == len(b"payload")
    assert by_name["pre_check"]["perago.failed"] == 0
    assert by_name["stage"]["perago.changes"] == "+1 ~0 -0"
    assert by_name["stage"]["perago.files"] == 1
    assert by_name["merge"]["perago.ref"] == ref
    assert by_name["merge"]["perago.merged"] is True
    assert by_name["merge"]["perago.tries"] == 1
    assert by_name["merge"]["perago.commit_url"] == f"{LAKEFS_UI}/repositories/{repo}/commits/{ref}"
    assert by_name["report"]["perago.status"] == "COMPLETED"

    # No secret and no other address: the only URLs are the two UI pages.
    secret = linked.settings.lakefs.secret_access_key.get_secret_value()
    for span in [attempt, *children]:
        for key, value in (span.attributes or {}).items():
            text = str(value)
            assert secret not in text, key
            assert "://" not in text or text.startswith((LAKEFS_UI, CONDUCTOR_UI)), (key, text)
            assert "X-Amz-" not in text and "Signature" not in text, key


@pytest.mark.parametrize(
    ("params", "status", "kind", "failing_phase"),
    [
        ({"name": "refused.txt", "fail": True}, "FAILED", "handler_error", "handler"),
        ({"name": 5}, "FAILED_WITH_TERMINAL_ERROR", "bad_params", "validate"),
    ],
    ids=["handler_error", "bad_params"],
)
def test_a_failing_task_has_error_spans_naming_its_failure_kind(
    linked: InProcessWorker,
    spans: InMemorySpanExporter,
    repo: str,
    base: str,
    params: dict[str, Any],
    status: str,
    kind: str,
    failing_phase: str,
) -> None:
    task = task_of(linked.run(LINKED, task_input(repo, base, **params)))
    assert task.status == status
    assert task.reason_for_incompletion.startswith(f"{kind}: ")
    attempt, children = trace_of(spans, task.task_id)

    assert attempt.status.status_code == StatusCode.ERROR
    assert attempt.status.description == kind
    attrs = attempt.attributes or {}
    assert attrs["perago.failure_kind"] == kind and attrs["perago.kind"] == kind
    assert attrs["perago.status"] == status
    assert str(attrs["perago.reason"]).startswith(f"{kind}: ")
    assert "perago.output_ref" not in attrs

    names = [s.name for s in children]
    assert names == [*PHASES[: PHASES.index(failing_phase) + 1], "report"]  # nothing staged
    failing = next(s for s in children if s.name == failing_phase)
    assert failing.status.status_code == StatusCode.ERROR
    assert failing.status.description == kind
    assert (failing.attributes or {})["perago.failure_kind"] == kind
    assert (failing.attributes or {})["exception.type"] == "TaskFailure"
    assert not failing.events  # no exception text (it could hold a secret or an address)
    others = [s for s in children if s is not failing]
    assert all(s.status.status_code != StatusCode.ERROR for s in others)
    report = children[-1]
    assert (report.attributes or {})["perago.status"] == status


# -- links both ways --------------------------------------------------------------------------


def _merge_events(logs: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "merge.done" and e.get("task_id") == task_id]


def _assert_contract_output(output: dict[str, Any], repo: str) -> str:
    assert set(output) == {"workspace", "result"}
    assert set(output["workspace"]) == {"repository", "branch", "ref_type", "ref"}
    assert output["workspace"]["repository"] == repo and output["workspace"]["branch"] == "main"
    assert output["result"] == {"bytes": len(b"payload")}
    ref: str = output["workspace"]["ref"]
    return ref


def test_with_both_ui_addresses_the_merge_event_and_every_commit_link_run_and_data(
    linked: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    with capture_logs() as logs:
        run = linked.run(LINKED, task_input(repo, base, name="linked.txt"))
    task = task_of(run)
    assert task.status == "COMPLETED", task.reason_for_incompletion
    ref = _assert_contract_output(task.output_data, repo)

    [merged] = _merge_events(logs, task.task_id)
    assert merged["commit_url"] == f"{LAKEFS_UI}/repositories/{repo}/commits/{ref}"
    assert merged["ref"] == ref

    workflow_url = f"{CONDUCTOR_UI}/execution/{run.workflow_id}"
    merge = lakefs.get_commit(repo, ref)
    assert merge.metadata["perago.workflow_url"] == workflow_url
    staged = lakefs.get_commit(repo, merge.metadata[fences.META_STAGED])
    assert staged.metadata["perago.workflow_url"] == workflow_url
    assert workflow_url not in json.dumps(task.output_data)


def test_with_neither_ui_address_no_link_appears(
    plain: InProcessWorker, lakefs: LakeFS, repo: str, base: str
) -> None:
    with capture_logs() as logs:
        run = plain.run(PLAIN, task_input(repo, base, name="plain.txt"))
    task = task_of(run)
    assert task.status == "COMPLETED", task.reason_for_incompletion
    ref = _assert_contract_output(task.output_data, repo)

    [merged] = _merge_events(logs, task.task_id)
    assert "commit_url" not in merged and merged["ref"] == ref
    assert not any(
        "://" in json.dumps(e, default=str) for e in logs if e.get("task_id") == task.task_id
    )
    merge = lakefs.get_commit(repo, ref)
    staged = lakefs.get_commit(repo, merge.metadata[fences.META_STAGED])
    assert "perago.workflow_url" not in merge.metadata
    assert "perago.workflow_url" not in staged.metadata
    assert merge.metadata["perago.workflow_id"] == run.workflow_id  # the provenance is still there


# -- a real OTLP/HTTP endpoint ----------------------------------------------------------------


class _Collector(ThreadingHTTPServer):
    """Accepts OTLP/HTTP exports: keeps each request's path, headers and body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _CollectorHandler)


class _CollectorHandler(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.requests.append(
                (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_worker_process_exports_its_spans_to_an_otlp_http_endpoint(
    endpoints: Endpoints,
    conductor: Conductor,
    repo: str,
    base: str,
    collector: _Collector,
    tmp_path: Path,
) -> None:
    register_app(conductor, tracing_app.build_app(PROCESS), retries=0)
    key = "collector-k3y-v4lue"
    worker = start_process(
        "tracing_app:app",
        endpoints,
        tmp_path / "w",
        env={
            "PYTHONPATH": str(HERE),
            "PERAGO_TEST_SUFFIX": S,
            "PERAGO_TRACING__OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
            "PERAGO_TRACING__HEADERS": json.dumps({"x-collector-key": key}),
            "PERAGO_TRACING__SERVICE_NAME": f"perago-test-{S}",
        },
    )
    try:
        name = one_task_workflow(conductor, PROCESS, ["params", "workspace"])
        workflow_id = conductor.start_workflow(name, task_input(repo, base, name="exported.txt"))
        run = wait_for_workflow(conductor, workflow_id, 120)
        task = task_of(run)
        assert task.status == "COMPLETED", task.reason_for_incompletion
    finally:
        code = worker.stop()  # the drain ends with the exporter's flush
    assert code == 0, worker.tail()

    assert collector.requests, worker.tail()
    names: set[str] = set()
    attempts = []
    for path, headers, body in collector.requests:
        assert path == "/v1/traces"
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-collector-key"] == key
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == f"perago-test-{S}"
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    names.add(span.name)
                    attrs = {a.key: a.value for a in span.attributes}
                    if span.name == "attempt":
                        attempts.append(attrs["perago.task_id"].string_value)
    assert set(PHASES) <= names | {"attempt"}, names
    assert attempts == [task.task_id]
    log = worker.log_path.read_text()
    assert "tracing.enabled" in log
    assert key not in log  # a header value is a secret: masked like the others
