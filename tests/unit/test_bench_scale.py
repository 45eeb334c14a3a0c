"""The scale curve's pure figures (bench/scale.py): what its table and chart are made of."""

from __future__ import annotations

import dataclasses
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


def test_the_limit_is_the_branch_near_its_ceiling_else_the_cpu_when_busy() -> None:
    assert scale.limit_of(9.0, 10.0, busy=0.99) == "branch merge rate"
    assert scale.limit_of(5.0, 10.0, busy=0.97) == "CPU (97% busy)"
    assert scale.limit_of(5.0, 0.0, busy=0.97) == "CPU (97% busy)"  # no ceiling measured
    assert scale.limit_of(5.0, 10.0, busy=0.5).startswith("neither (50% busy)")


def test_the_middle_window_spans_the_middle_eighty_percent() -> None:
    start, end, events = scale.middle_window([float(i) for i in range(11)])
    assert (start, end, events) == (1.0, 9.0, 8)


def sample(at: float, worker: float, busy: int, total: int) -> scale.Sample:
    return scale.Sample(at, {"worker": worker, "lakeFS": worker / 2}, busy, total)


def test_window_cpu_reads_only_the_samples_inside_the_window() -> None:
    samples = [
        sample(0.0, 0.0, 0, 0),  # before the window: start-up CPU, left out
        sample(10.0, 5.0, 100, 200),
        sample(20.0, 9.0, 280, 400),
        sample(30.0, 50.0, 900, 1000),  # after the window: the drain's tail, left out
    ]
    cpu, busy, seconds = scale.window_cpu(samples, 5.0, 25.0)
    assert cpu == {"lakeFS": 2.0, "worker": 4.0}
    assert busy == 0.9  # 180 busy of 200 jiffies
    assert seconds == 10.0
    assert scale.sampler_span(samples, 5.0, 25.0, 15.0)
    assert not scale.sampler_span(samples, 5.0, 25.0, 10.0)  # at the first sample: before it
    assert scale.window_cpu(samples[:2], 5.0, 25.0) == ({}, 0.0, 0.0)  # one sample: no span


def point(n: int, rate: float, repeat: int = 0) -> scale.Point:
    return scale.Point(
        n, 4, 400, tasks_per_second=rate, merges_per_second=rate, p50_ms=300 + n,
        p95_ms=600 + n, cpu_ms_per_task={"lakeFS": 30.0, "worker": 40.0 + n},
        machine_busy=0.95, cpu_bound_tasks_per_second=20.0, limit="CPU (95% busy)",
        merge_retries=1, repeat=repeat,
    )  # fmt: skip


def report() -> scale.ScaleReport:
    points = [point(n, 2.0 * n, r) for r in range(3) for n in (1, 2, 4, 8)]
    points[0] = dataclasses.replace(points[0], tasks_per_second=9.0, problems=["lost one"])
    return scale.ScaleReport(
        command="bench/scale.py", started_utc="now", stack="test", points=points,
        ceiling=[scale.Ceiling(1, 200, 12.0, 0), scale.Ceiling(32, 200, 20.0, 7)],
    )  # fmt: skip


def test_medians_give_one_point_per_process_count_with_summed_retries() -> None:
    medians = report().medians()
    assert [p.processes for p in medians] == [1, 2, 4, 8]
    assert medians[0].tasks_per_second == 2.0  # median of 9.0, 2.0, 2.0
    assert medians[0].merge_retries == 3
    assert medians[0].problems == ["lost one"]  # a repeat's problem is never hidden
    assert report().problems == ["p1r0: lost one"]


def test_markdown_has_a_row_per_process_count_and_per_ceiling_thread_count() -> None:
    text = scale.markdown(report())
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 + 4 + 2  # two headers, four process counts, two ceilings
    assert "| 8 x 4 | 16.0 (16.0, 16.0, 16.0) |" in text
    assert "| 1 x 4 | 2.0 (9.0, 2.0, 2.0) |" in text
    assert "| 30.0 / 48.0 |" in text  # CPU ms per task, lakeFS then worker
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


def test_the_defaults_are_the_documented_ones() -> None:
    args = scale.make_parser().parse_args(["--stack-from-env"])
    assert (args.processes, args.tasks, args.concurrency) == ("1,2,4,8", 400, 4)
    assert (args.ceiling_merges, args.repeat) == (200, 1)
    assert scale.CEILING_THREADS == (1, 8, 32)
