"""The examples' handlers, tested as their README section suggests: no servers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))

from quickstart import app

from perago_worker.testing import HandlerEnvironment

ENV = HandlerEnvironment(app)


def test_clean_keeps_the_rows_with_an_amount_of_at_least_the_minimum() -> None:
    raw = "id,amount\n0,10\n1,\n2,30\n"
    run = ENV.run("qs_clean", {"min_amount": 20}, files={"raw/sales.csv": raw}, keep=True)
    assert run.ok, run.reason
    assert run.result == {"kept": 1, "total": 30}
    assert run.added == ["clean/sales.csv"]
    assert run.read("clean/sales.csv").decode().splitlines() == ["id,amount", "2,30"]


def test_clean_refuses_a_file_without_an_amount_column() -> None:
    run = ENV.run("qs_clean", {}, files={"raw/sales.csv": "id\n1\n"})
    assert (run.status, run.kind) == ("FAILED_WITH_TERMINAL_ERROR", "handler_terminal")


def test_ingest_writes_the_rows_and_total_averages() -> None:
    assert ENV.run("qs_ingest", {"rows": 3}).added == ["raw/sales.csv"]
    assert ENV.run("qs_total", {"kept": 4, "total": 60}).result == {"average": 15.0}
