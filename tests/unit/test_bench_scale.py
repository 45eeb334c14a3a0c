"""The scale curve's pure figures (bench/scale.py): what its table and chart are made of."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import scale  # noqa: E402


def test_middle_rate_of_evenly_spaced_events_is_their_frequency() -> None:
    assert scale.middle_rate([i * 0.25 for i in range(101)]) == pytest.approx(4.0)


def test_middle_rate_ignores_a_slow_ramp_and_a_slow_drain() -> None:
    steady = [10.0 + i * 0.5 for i in range(81)]
    ramp = [0.0] * 5 + [5.0] * 5  # workers starting one after the other
    drain = [60.0] * 5 + [90.0] * 5  # the last slots emptying
    assert scale.middle_rate(ramp + steady + drain) == pytest.approx(2.0, rel=0.15)


def test_middle_rate_without_a_span_is_zero_not_a_division_error() -> None:
    assert scale.middle_rate([]) == 0.0
    assert scale.middle_rate([1.0, 2.0]) == 0.0
    assert scale.middle_rate([5.0] * 50) == 0.0


def test_quantile_interpolates_and_handles_tiny_samples() -> None:
    values = [float(v) for v in range(1, 101)]
    assert scale.quantile(values, 0.5) == pytest.approx(50.5, abs=0.6)
    assert scale.quantile(values, 0.95) == pytest.approx(95.0, abs=1.0)
    assert scale.quantile([7.0], 0.95) == 7.0
    assert scale.quantile([], 0.5) != scale.quantile([], 0.5)  # NaN: no sample, no figure


def test_the_branch_is_the_limit_only_near_its_ceiling() -> None:
    assert scale.limit_of(9.0, 10.0) == "branch merge rate"
    assert scale.limit_of(5.0, 10.0) == "CPU (shared)"
    assert scale.limit_of(5.0, 0.0) == "CPU (shared)"  # no ceiling measured


def report() -> scale.ScaleReport:
    points = [
        scale.Point(n, 4, 400, tasks_per_second=2.0 * n, merges_per_second=2.0 * n,
                    p50_ms=300 + n, p95_ms=600 + n, cpu_seconds={"lakeFS": 40.0, "worker": 80.0},
                    limit="CPU (shared)")
        for n in (1, 2, 4, 8)
    ]  # fmt: skip
    return scale.ScaleReport(
        command="bench/scale.py", started_utc="now", stack="test", points=points,
        ceiling=[scale.Ceiling(1, 200, 12.0, 0), scale.Ceiling(32, 200, 20.0, 7)],
    )  # fmt: skip


def test_markdown_has_a_row_per_point_and_per_ceiling_thread_count() -> None:
    text = scale.markdown(report())
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 + 4 + 2  # two headers, four points, two ceilings
    assert "| 8 x 4 | 400 |" in text
    assert "0.100 / 0.200" in text  # CPU s per task, lakeFS then worker
    assert "| 32 | 200 | 20.0 | 7 |" in text


def test_best_ceiling_is_the_fastest_thread_count() -> None:
    assert report().best_ceiling == 20.0
    assert scale.ScaleReport(command="", started_utc="").best_ceiling == 0.0


def test_chart_is_written_as_a_png(tmp_path: Path) -> None:
    path = tmp_path / "scale.png"
    scale.chart(report(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_a_written_report_reads_back_to_the_same_table() -> None:
    original = report()
    assert scale.markdown(scale.report_from_json(original.as_json())) == scale.markdown(original)
