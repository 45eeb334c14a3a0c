"""The demo app's handlers, tested as a data engineer would test theirs: no servers."""

from __future__ import annotations

import json

from perago_worker.devstack.demo_app import app
from perago_worker.testing import HandlerEnvironment

ENV = HandlerEnvironment(app)


def test_ingest_writes_the_requested_rows_of_events() -> None:
    run = ENV.run("demo_ingest", {"rows": 25, "seed": 3}, keep=True)
    assert run.ok, run.reason
    assert run.result == {"rows": 25, "path": "data/raw/events.jsonl"}
    assert run.added == ["raw/events.jsonl"]
    assert len(run.read("raw/events.jsonl").splitlines()) == 25


def test_transform_counts_events_by_kind() -> None:
    events = "".join(json.dumps({"id": i, "kind": k}) + "\n" for i, k in enumerate("aab"))
    run = ENV.run("demo_transform", {}, files={"raw/events.jsonl": events}, keep=True)
    assert run.ok, run.reason
    assert run.result == {"counts": {"a": 2, "b": 1}}
    assert json.loads(run.read("curated/by_kind.json")) == {"a": 2, "b": 1}


def test_transform_refuses_a_workspace_without_events() -> None:
    run = ENV.run("demo_transform", {}, files={"other.txt": "x"})
    assert run.kind == "pre_check" and "raw" in run.reason


def test_summarize_names_the_top_kind() -> None:
    run = ENV.run("demo_summarize", {"counts": {"click": 3, "view": 5}})
    assert run.result == {"total": 8, "top_kind": "view"}
