"""Specification of the daemon's gc schedule (`perago_worker.gc.PeriodicGc`, `run --gc-every`).

One thread, rounds that never overlap, errors logged and never fatal, no round once the
worker shuts down, a bounded stop; the same thresholds as `perago-worker gc`; with
`--processes N` the children never collect. The real-process proof is in
tests/integration/test_gc_schedule.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from perago_worker import cli, gc
from perago_worker.gc import GcReport, PeriodicGc, collect_configured
from perago_worker.settings import Settings


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self._add("info", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._add("error", event, **fields)

    def events(self) -> list[str]:
        return [event for _, event, _ in self.lines]


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(scratch_root=tmp_path, **values)


# -- the schedule ------------------------------------------------------------------------------


def test_rounds_repeat_on_one_thread_and_never_overlap() -> None:
    spans: list[tuple[float, float]] = []
    threads: set[int] = set()

    def run_once() -> GcReport:
        started = time.monotonic()
        threads.add(threading.get_ident())
        time.sleep(0.03)
        spans.append((started, time.monotonic()))
        return GcReport()

    schedule = PeriodicGc(0.02, run_once, RecordingLog(), first_delay=0).start()
    try:
        assert wait_for(lambda: len(spans) >= 4)
    finally:
        schedule.stop()
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end + 0.02 - 0.005, "the next round waits a full interval after the last"


def test_a_failing_round_is_logged_and_the_schedule_goes_on() -> None:
    calls = 0

    def run_once() -> GcReport:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("lakeFS down")
        return GcReport(staging_branches=["repo:perago-stage-x"])

    log = RecordingLog()
    schedule = PeriodicGc(0.01, run_once, log, first_delay=0).start()
    try:
        assert wait_for(lambda: "gc.done" in log.events())
    finally:
        schedule.stop()
    level, event, fields = log.lines[0]
    assert (level, event) == ("error", "gc.failed")
    assert "ConnectionError: lakeFS down" in fields["error"]
    done = next(f for _, e, f in log.lines if e == "gc.done")
    assert done["staging_branches"] == 1 and done["removed"] == ["repo:perago-stage-x"]
    assert schedule.failures == 1 and schedule.rounds >= 2


def test_no_round_starts_once_the_worker_shuts_down() -> None:
    draining = threading.Event()
    rounds: list[float] = []

    def run_once() -> GcReport:
        rounds.append(time.monotonic())
        draining.set()  # the drain begins during the first round
        return GcReport()

    log = RecordingLog()
    schedule = PeriodicGc(0.01, run_once, log, stop_when=draining.is_set, first_delay=0).start()
    assert wait_for(lambda: not schedule.alive)
    assert len(rounds) == 1
    assert log.events()[-1] == "gc.stopped"


def test_stop_waits_a_bounded_time_for_a_round_under_way() -> None:
    release = threading.Event()
    entered = threading.Event()

    def run_once() -> GcReport:
        entered.set()
        release.wait(10)
        return GcReport()

    schedule = PeriodicGc(0.01, run_once, RecordingLog(), first_delay=0).start()
    assert entered.wait(5)
    started = time.monotonic()
    schedule.stop(timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert schedule.alive, "the round under way is left to finish (or to the process's exit)"
    release.set()
    assert wait_for(lambda: not schedule.alive)
    assert schedule.rounds == 1


def test_the_first_round_waits_a_random_half_to_whole_interval() -> None:
    delays = {PeriodicGc(10.0, GcReport, RecordingLog())._first_delay for _ in range(50)}
    assert all(5.0 <= d <= 10.0 for d in delays)
    assert len(delays) > 1


def test_a_schedule_needs_a_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        PeriodicGc(0, GcReport, RecordingLog())


# -- the same thresholds as `perago-worker gc` --------------------------------------------------


def _capture_collect(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake(scratch_root: Path, lakefs: Any, conductor: Any, repositories: list[str], **kw: Any):
        calls.append({"scratch_root": scratch_root, "repositories": repositories, **kw})
        return GcReport()

    monkeypatch.setattr(gc, "collect", fake)
    return calls


def test_the_schedule_collects_with_the_thresholds_of_the_gc_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _capture_collect(monkeypatch)
    monkeypatch.setattr(cli, "clients", lambda s: (None, None))
    for key in ("PERAGO_CONFIG", "PERAGO_GC_OLDER_THAN_SECONDS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PERAGO_SCRATCH_ROOT", str(tmp_path))
    monkeypatch.setenv("PERAGO_ALLOWED_REPOSITORIES", '["sales"]')
    monkeypatch.setenv("PERAGO_GC_OLDER_THAN_SECONDS", "120")
    monkeypatch.setenv("PERAGO_GC_INTENT_OLDER_THAN_SECONDS", "86400")
    args = cli.build_parser().parse_args(["gc"])
    assert cli.cmd_gc(args) == 0

    schedule = gc.schedule(Settings(), None, None, every=60, log=RecordingLog(), first_delay=0)  # type: ignore[arg-type]
    try:
        assert wait_for(lambda: len(calls) == 2)
    finally:
        schedule.stop()
    command, scheduled = calls
    assert command == scheduled
    assert command["older_than"] == 120 and command["intent_older_than"] == 86400
    assert command["repositories"] == ["sales"] and command["dry_run"] is False


def test_gc_flags_override_the_threshold_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _capture_collect(monkeypatch)
    collect_configured(
        settings(tmp_path, allowed_repositories=["sales"]),
        None,
        None,
        repositories=["ml"],
        older_than=5,
        intent_older_than=0,
    )
    [call] = calls
    assert (call["older_than"], call["intent_older_than"]) == (5, 0)
    assert call["repositories"] == ["ml"]


def test_the_threshold_settings_default_to_the_collect_defaults(tmp_path: Path) -> None:
    import inspect

    defaults = inspect.signature(gc.collect).parameters
    configured = settings(tmp_path)
    assert configured.gc_intent_older_than_seconds == defaults["intent_older_than"].default
    assert configured.gc_older_than_seconds == 3600
    assert configured.gc_every_seconds == 0, "off unless asked for"


# -- who runs it ---------------------------------------------------------------------------------


def test_gc_every_overrides_the_setting_and_zero_turns_it_off(tmp_path: Path) -> None:
    parser = cli.build_parser()
    on = settings(tmp_path, gc_every_seconds=600)
    assert cli.gc_interval(parser.parse_args(["run", "m:app"]), on) == 600
    assert cli.gc_interval(parser.parse_args(["run", "m:app", "--gc-every", "30"]), on) == 30
    assert cli.gc_interval(parser.parse_args(["run", "m:app", "--gc-every", "0"]), on) == 0


def test_a_supervised_child_never_runs_the_schedule(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["run", "m:app", "--child", "--gc-every", "30"])
    assert cli.gc_interval(args, settings(tmp_path, gc_every_seconds=600)) == 0


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_gc_every_refuses_what_is_not_a_number_of_seconds(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["run", "m:app", "--gc-every", value])
    assert exit_info.value.code == 2
    assert "--gc-every" in capsys.readouterr().err
