"""The Grafana dashboard's queries and the metric names a worker exposes, for the tests that
hold one against the other (tests/deploy/test_dashboard.py on the code's registry,
tests/integration/test_prometheus_live.py on a real worker and a real Prometheus)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "perago-worker.json"
# Series names each metric type exposes beyond its family name (prometheus-client's text
# format: a counter `x` is `x_total`, a histogram `x_bucket`, `x_sum`, `x_count`).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}
# Prometheus's own series a query may name besides the worker's.
PROMETHEUS_SERIES = {"up"}
METRIC = re.compile(r"\b(perago_[a-z0-9_]+)\b")
# Grafana's variables, as a query for one run: every task type, a 1-minute rate window.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$task_type": ".*"}


def exposed_series(text: str) -> set[str]:
    """Every series name the Prometheus text `text` declares, whether or not it has samples
    yet (a labelled metric nobody used is only its `# TYPE` line)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included (rows themselves left out)."""
    found = []
    for panel in dashboard()["panels"]:
        found += panel.get("panels", [])
        if panel["type"] != "row":
            found.append(panel)
    return found


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every query: each panel target and each query variable."""
    found = [(f"panel {p['title']!r}", t["expr"]) for p in panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(
                (
                    f"variable {variable['name']}",
                    query["query"] if isinstance(query, dict) else query,
                )
            )
    return found


def referenced_metrics(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def runnable(expr: str) -> str:
    """A panel's PromQL with Grafana's variables filled in, as Prometheus can run it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr
