"""Specification of `perago_worker.checks`: workspace checks on a local tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from perago_worker.checks import (
    CheckFailure,
    forbid_glob,
    require_dir,
    require_file,
    require_glob,
    run_checks,
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """out/a.csv, out/b.csv, out/nested/c.csv, logs/ (empty), readme.txt."""
    (tmp_path / "out" / "nested").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    for rel in ("out/a.csv", "out/b.csv", "out/nested/c.csv", "readme.txt"):
        (tmp_path / rel).write_text("x")
    return tmp_path


# --- require_file ------------------------------------------------------------------------


def test_require_file_passes_on_regular_file(tree: Path) -> None:
    assert require_file("out/a.csv").run(tree) is None


def test_require_file_fails_when_missing_naming_check_and_path(tree: Path) -> None:
    failure = require_file("out/missing.csv").run(tree)
    assert failure is not None
    assert failure.check == "require_file('out/missing.csv')"
    assert "out/missing.csv is missing" in failure.detail


def test_require_file_fails_on_directory(tree: Path) -> None:
    failure = require_file("logs").run(tree)
    assert failure is not None
    assert "logs is not a regular file" in failure.detail


def test_require_file_fails_on_symlink_to_regular_file(tree: Path) -> None:
    os.symlink(tree / "readme.txt", tree / "link.txt")
    failure = require_file("link.txt").run(tree)
    assert failure is not None
    assert "link.txt is not a regular file" in failure.detail


def test_require_file_fails_on_dangling_symlink(tree: Path) -> None:
    os.symlink(tree / "nowhere", tree / "dangling")
    assert require_file("dangling").run(tree) is not None


# --- require_dir -------------------------------------------------------------------------


def test_require_dir_passes_on_directory(tree: Path) -> None:
    assert require_dir("out/nested").run(tree) is None


def test_require_dir_accepts_trailing_slash(tree: Path) -> None:
    check = require_dir("logs/")
    assert check.target == "logs"
    assert check.run(tree) is None


def test_require_dir_fails_when_missing_naming_check_and_path(tree: Path) -> None:
    failure = require_dir("reports").run(tree)
    assert failure is not None
    assert failure.check == "require_dir('reports')"
    assert "reports is missing" in failure.detail


def test_require_dir_fails_on_regular_file(tree: Path) -> None:
    failure = require_dir("readme.txt").run(tree)
    assert failure is not None
    assert "readme.txt is not a directory" in failure.detail


def test_require_dir_fails_on_symlink_to_directory(tree: Path) -> None:
    os.symlink(tree / "out", tree / "out-link")
    failure = require_dir("out-link").run(tree)
    assert failure is not None
    assert "out-link" in failure.detail


# --- require_glob / forbid_glob ----------------------------------------------------------


def test_require_glob_passes_when_enough_files_match(tree: Path) -> None:
    assert require_glob("out/**/*.csv", min_count=3).run(tree) is None


def test_require_glob_fails_below_min_count_with_counts(tree: Path) -> None:
    failure = require_glob("out/*.csv", min_count=3).run(tree)
    assert failure is not None
    assert failure.check == "require_glob('out/*.csv', min_count=3)"
    assert "2 file(s) match 'out/*.csv', need 3" in failure.detail


def test_require_glob_does_not_count_directories(tree: Path) -> None:
    failure = require_glob("lo*").run(tree)
    assert failure is not None
    assert "0 file(s)" in failure.detail


def test_require_glob_refuses_min_count_below_one() -> None:
    with pytest.raises(ValueError, match="min_count"):
        require_glob("*.csv", min_count=0)


def test_forbid_glob_passes_when_nothing_matches(tree: Path) -> None:
    assert forbid_glob("**/*.tmp").run(tree) is None


def test_forbid_glob_fails_naming_offending_files(tree: Path) -> None:
    (tree / "out" / "nested" / "part.tmp").write_text("x")
    failure = forbid_glob("**/*.tmp").run(tree)
    assert failure is not None
    assert failure.check == "forbid_glob('**/*.tmp')"
    assert "out/nested/part.tmp" in failure.detail


def test_forbid_glob_catches_symlinks(tree: Path) -> None:
    os.symlink("/etc/hostname", tree / "host.tmp")
    failure = forbid_glob("*.tmp").run(tree)
    assert failure is not None
    assert "host.tmp" in failure.detail


def test_forbid_glob_lists_at_most_five_offenders(tree: Path) -> None:
    for i in range(8):
        (tree / f"f{i}.tmp").write_text("x")
    failure = forbid_glob("*.tmp").run(tree)
    assert failure is not None
    assert failure.detail.count(".tmp") == 5


# --- run_checks --------------------------------------------------------------------------


def test_run_checks_returns_empty_when_all_pass(tree: Path) -> None:
    checks = [require_file("readme.txt"), require_dir("out"), forbid_glob("*.tmp")]
    assert run_checks(checks, tree) == []


def test_run_checks_reports_every_failure_in_order(tree: Path) -> None:
    checks = [
        require_file("missing.txt"),
        require_dir("readme.txt"),
        require_file("readme.txt"),
        require_glob("*.parquet"),
    ]
    failures = run_checks(checks, tree)
    assert [f.check for f in failures] == [
        "require_file('missing.txt')",
        "require_dir('readme.txt')",
        "require_glob('*.parquet')",
    ]


def test_check_failure_str_names_check_and_detail() -> None:
    failure = CheckFailure("require_file('a')", "a is missing")
    assert str(failure) == "require_file('a'): a is missing"


# --- constructor validation --------------------------------------------------------------


@pytest.mark.parametrize("constructor", [require_file, require_dir])
@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../b", "a\\b", ""])
def test_path_checks_refuse_unsafe_paths(constructor, path: str) -> None:
    with pytest.raises(ValueError, match=constructor.__name__):
        constructor(path)


@pytest.mark.parametrize("constructor", [require_glob, forbid_glob])
@pytest.mark.parametrize("pattern", ["/abs/*.csv", "../*.csv", "a/../*.csv", "a\\*.csv", ""])
def test_glob_checks_refuse_unsafe_patterns(constructor, pattern: str) -> None:
    with pytest.raises(ValueError, match=constructor.__name__):
        constructor(pattern)


def test_checks_are_frozen_values() -> None:
    assert require_file("a.txt") == require_file("a.txt")
    assert hash(require_glob("*.csv", min_count=2)) == hash(require_glob("*.csv", min_count=2))
