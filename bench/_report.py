"""Results, targets and the Markdown they are printed and written as."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from _harness import TIMES, Bench, GiB, median

Better = Literal["lower", "higher"]
NONE = "\u2013"  # an en dash: no figure


@dataclass(frozen=True)
class Target:
    """A goal a row is judged against: `check(row)` is True when it is met."""

    text: str
    check: Callable[[Row], bool]


@dataclass
class Row:
    """One comparison: perago's figures and the reference's, measured in the same run."""

    item: str
    reference: str
    unit: str  # "s", "ms", "MiB", "tasks/s"
    perago: list[float]
    ref: list[float]
    better: Better = "lower"
    target: Target | None = None
    extra: str = ""  # a derived figure: throughput, overhead, fraction

    @property
    def perago_median(self) -> float:
        return median(self.perago)

    @property
    def ref_median(self) -> float:
        return median(self.ref)

    @property
    def ratio(self) -> float:
        """> 1.0 means perago is better: reference time / perago time (or rate / rate)."""
        p, r = self.perago_median, self.ref_median
        if not (p > 0 and r > 0):
            return float("nan")
        return r / p if self.better == "lower" else p / r

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        try:
            return "met" if self.target.check(self) else "**missed**"
        except (ValueError, ZeroDivisionError):
            return "n/a"


@dataclass
class Section:
    title: str
    method: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # Markdown tables after the rows


# -- formatting ---------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return NONE
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if unit in ("ms", "MiB", "tasks/s"):
        return f"{value:.1f}" if value < 1000 else f"{value:.0f}"
    return f"{value:.3g}"


def fmt_runs(values: Sequence[float], unit: str) -> str:
    return ", ".join(fmt(v, unit) for v in values)


def render_section(section: Section, *, runs: bool) -> str:
    lines = [f"### {section.title}", "", section.method, ""]
    header = ["item", "perago", "reference", "ref. figure", "ratio", "derived", "target", "status"]
    if runs:
        header += ["perago runs", "reference runs"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in section.rows:
        unit = f" {row.unit}"
        cells = [
            row.item,
            fmt(row.perago_median, row.unit) + unit,
            row.reference,
            fmt(row.ref_median, row.unit) + unit if row.ref else NONE,
            f"{row.ratio:.2f}{TIMES}" if row.ref and not math.isnan(row.ratio) else NONE,
            row.extra,
            row.target.text if row.target else "",
            row.status,
        ]
        if runs:
            cells += [fmt_runs(row.perago, row.unit), fmt_runs(row.ref, row.unit)]
        lines.append("| " + " | ".join(cells) + " |")
    for table in section.tables:
        lines += ["", table.rstrip("\n")]
    for note in section.notes:
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def targets_summary(sections: Sequence[Section]) -> str:
    lines = ["| case | item | target | perago | ratio | status |", "|---|---|---|---|---|---|"]
    for section in sections:
        for row in section.rows:
            if row.target is None:
                continue
            lines.append(
                f"| {section.title} | {row.item} vs {row.reference} | {row.target.text} | "
                f"{fmt(row.perago_median, row.unit)} {row.unit} | "
                f"{NONE if math.isnan(row.ratio) else f'{row.ratio:.2f}{TIMES}'} | {row.status} |"
            )
    return "\n".join(lines) + "\n"


# -- the machine --------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, f"{parts[2]} ({parts[0]} on {mount})"
    except OSError:
        pass
    return kind


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # loopback only (checked by run.py)
        return str(resp.read().decode(errors="replace"))


def _lakefs_version(b: Bench) -> str:
    import base64

    e = b.endpoints
    request = urllib.request.Request(f"{e.lakefs_url}/api/v1/config/version")
    token = base64.b64encode(f"{e.lakefs_access_key_id}:{e.lakefs_secret_access_key}".encode())
    request.add_header("Authorization", "Basic " + token.decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            reported = json.load(resp).get("version", "?")
    except (OSError, ValueError):
        reported = "?"
    from perago_worker.devstack import tools

    return f"{tools.LAKEFS_VERSION} (built from the Go module; the server reports {reported!r})"


def _store_rows(b: Bench) -> list[tuple[str, str]]:
    from perago_worker.devstack import tools

    if b.endpoints.store is None:
        return [("blockstore", "local (lakeFS keeps objects in a folder; no presigned URLs)")]
    rows = [
        (
            "blockstore",
            f"s3: VersityGW {tools.VERSITYGW_VERSION} (posix backend, built from its Go module) "
            f"on loopback, path-style, bucket {b.endpoints.store.bucket}",
        )
    ]
    if b.s5cmd is not None:
        rows.append(("s5cmd", f"{tools.S5CMD_VERSION} (built from its Go module)"))
    return rows


def _conductor_version(b: Bench) -> str:
    root = b.endpoints.conductor_url
    try:
        return _get(f"{root}/version").strip() + " (conductor-server boot jar, SQLite)"
    except OSError:
        from perago_worker.devstack import tools

        return tools.CONDUCTOR_VERSION + " (pinned)"


def _java_version() -> str:
    from perago_worker.devstack import tools

    try:
        java = tools.java_runtime()
        proc = subprocess.run(
            [str(java), "-version"], capture_output=True, text=True, timeout=30, check=False
        )
        return (proc.stderr or proc.stdout).splitlines()[0]
    except (OSError, RuntimeError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}" or "unknown"


def machine(b: Bench) -> list[tuple[str, str]]:
    import psutil

    from perago_worker import __version__

    load = os.getloadavg()
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {psutil.cpu_count(logical=False)} physical"),
        ("RAM", f"{psutil.virtual_memory().total / GiB:.1f} GiB"),
        ("disk free", f"{shutil.disk_usage(b.workdir).free / GiB:.1f} GiB at {b.workdir}"),
        ("file system", _fs_type(b.workdir)),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("load average at start", ", ".join(f"{x:.2f}" for x in load)),
        ("Python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("lakeFS and lakectl", _lakefs_version(b)),
        *_store_rows(b),
        ("Conductor", _conductor_version(b)),
        ("Java", _java_version()),
        (
            "perago-worker",
            f"{__version__} (git {_git_revision()}); lakefs-sdk {_version('lakefs-sdk')}, "
            f"conductor-python {_version('conductor-python')}",
        ),
    ]


def render_report(
    *,
    command: str,
    machine_rows: list[tuple[str, str]],
    settings: list[tuple[str, str]],
    sections: Sequence[Section],
    started: str,
    seconds: float,
    quick: bool,
) -> str:
    out = ["# perago-worker benchmarks", ""]
    if quick:
        out += [
            "> **--quick run**: counts and sizes divided by about 50. The figures show that the "
            "harness works end to end; fixed costs dominate at these sizes, so the targets are "
            "indicative only.",
            "",
        ]
    out += [
        f"Run started {started}, took {seconds / 60:.1f} min. Command:",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {k} | {v} |" for k, v in machine_rows]
    out += ["", "## Settings", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in settings]
    out += [
        "",
        "## Results",
        "",
        "Figures are medians over the repeats; *ratio* is reference / perago for times and "
        "memory and perago / reference for rates, so **> 1.0 means perago is better**. Each "
        "repeat runs the tools in a rotated order, into fresh folders on the same disk as the "
        "servers' data, after a `sync`.",
        "",
    ]
    out += [render_section(s, runs=True) for s in sections]
    out += ["## Targets", "", targets_summary(sections)]
    return "\n".join(out)
