"""The Grafana dashboard (deploy/grafana/perago-worker.json) queries what the code exports.

Every metric a panel or variable names is one the metrics module registers (its exposition
declares it), histograms through `_bucket`, `_sum` or `_count`, counters through `_total`;
every label a `by (...)` groups on is one of the metric's; every panel reads the data source
variable. The same queries run against a real worker and Prometheus in
tests/integration/test_prometheus_live.py.
"""

from __future__ import annotations

import re

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from metric_names import (
    PROMETHEUS_SERIES,
    dashboard,
    exposed_series,
    panels,
    queries,
    referenced_metrics,
)
from perago_worker.observability import metrics

# What a platform engineer opens the dashboard for, by a metric each must show.
MUST_SHOW = {
    "tasks by outcome": "perago_tasks_total",
    "phase latencies": "perago_phase_seconds_bucket",
    "merges": "perago_phase_seconds_count",
    "leases": "perago_lease_extensions_total",
    "queue depth": "perago_queue_depth",
    "in flight": "perago_attempts_in_flight",
    "heartbeat": "perago_last_poll_timestamp_seconds",
    "state": "perago_worker_state",
    "fences": "perago_fence_rejections_total",
}


def code_series() -> set[str]:
    assert metrics.TASKS is not None  # the module is imported: its metrics are registered
    return {n for n in exposed_series(generate_latest(REGISTRY).decode()) if "perago_" in n}


def test_the_dashboard_is_importable_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] == "perago-worker" and board["title"]
    assert isinstance(board["schemaVersion"], int)
    names = [v["name"] for v in board["templating"]["list"]]
    assert "datasource" in names and "task_type" in names
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_shows_what_an_operator_looks_at() -> None:
    used = set().union(*(referenced_metrics(expr) for _, expr in queries()))
    missing = {what: name for what, name in MUST_SHOW.items() if name not in used}
    assert missing == {}
    merge = [e for _, e in queries() if 'phase="merge"' in e]
    assert merge, "merges are counted from the merge phase"


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[w for w, _ in queries()])
def test_every_metric_a_query_names_is_exported_by_the_code(where: str, expr: str) -> None:
    used = referenced_metrics(expr)
    assert used, f"{where} names no perago metric"
    unknown = used - code_series()
    assert unknown == set(), f"{where}: {unknown} are not exported"
    other = set(re.findall(r"\b([a-z_]+)\s*(?:\{|\[)", expr)) - used - PROMETHEUS_SERIES
    assert other <= {"by", "without", "on", "ignoring"}, f"{where} names {other}"


@pytest.mark.parametrize(("where", "expr"), queries(), ids=[w for w, _ in queries()])
def test_every_label_a_query_groups_on_is_the_metrics(where: str, expr: str) -> None:
    labels = {"le", "instance", "job"}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase) and any(
            m.startswith(obj._name) for m in referenced_metrics(expr)
        ):
            labels.update(obj._labelnames)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in filter(None, (s.strip() for s in grouping.split(","))):
            assert label in labels, f"{where}: no label {label!r}"
