"""Case 6, the data path: perago presigned, perago through the API, lakectl and s5cmd.

The same three sets are downloaded (materialize) and published (upload + commit + merge)
by each tool the stack allows: on the `local` blockstore perago's API path and lakectl
(nothing can presign there); on `s3` also perago's presigned path and, as the store's own
ceiling, s5cmd copying the same number and size of objects straight from and to the bucket
(no lakeFS in the path). Around every measured operation the lakeFS server's CPU time
(utime + stime of its process) and its API request counters are read, giving CPU seconds
per GiB moved and lakeFS calls per object for every tool.
"""

from __future__ import annotations

import os
import re
import resource
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from _harness import (
    TRANSFER_SETS,
    Bench,
    DataSet,
    GiB,
    log,
    median,
    rotated,
    settle,
    timed,
)
from _report import NONE, Row, Section, Target
from _transfer import Measure, lakectl_path, materialize_once, mib_per_s, publish_once

OPS = ("materialize", "publish")
TARGET_VS_LAKECTL = {"materialize": 1.5, "publish": 1.2}
TARGET_VS_S5CMD = {"small": 0.5, "large": 0.8}  # of s5cmd's speed; the medium set has none
CPU_SHARE = 0.10  # presigned lakeFS CPU per GiB at most this share of the API path's
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


def at_least(x: float) -> Target:
    return Target(f"ratio ≥ {x:g}", lambda r: r.ratio >= x)


CPU_TARGET = Target(
    f"≤ {CPU_SHARE:.0%} of API",
    lambda r: r.perago_median <= CPU_SHARE * r.ref_median,
)


# -- what the servers spent ---------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # field 3 (state) onwards: the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def lakefs_metrics(url: str) -> tuple[Counter[str], float, float]:
    """lakeFS's API requests by operation (`api_request_duration_seconds_count`), the
    seconds it spent answering them (`..._sum`, all operations) and its own
    `process_cpu_seconds_total`, from its Prometheus endpoint (a scrape is not counted)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:  # loopback (checked)
        text = resp.read().decode()
    calls: Counter[str] = Counter()
    busy = cpu = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        if name == "api_request_duration_seconds_count":
            op = re.search(r'operation="([^"]*)"', labels or "")
            calls[op.group(1) if op else "?"] += int(float(value))
        elif name == "api_request_duration_seconds_sum":
            busy += float(value)
        elif name == "process_cpu_seconds_total":
            cpu = float(value)
    return calls, busy, cpu


def machine_cpu() -> float:
    """CPU seconds all processes have spent (/proc/stat's first line: every state but idle
    and iowait), to tell what other processes took while a tool ran."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def client_cpu() -> float:
    """CPU seconds of this process (perago runs in it) and of its waited-for children
    (lakectl, s5cmd)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Sample:
    """One measured operation: wall time, CPU of the servers and of the client, lakeFS calls
    by operation and the seconds lakeFS spent answering them (summed over requests)."""

    seconds: float
    lakefs_cpu: float
    store_cpu: float | None
    calls: Counter[str]
    client_cpu: float = 0.0
    lakefs_busy: float = 0.0
    machine_cpu: float = 0.0


class Meter:
    """Reads the servers before and after each measured operation.

    The lakeFS CPU comes from /proc/<pid>/stat when the harness started the server, else
    (`--stack-from-env`) from its `process_cpu_seconds_total`, the same two fields read by
    the server itself. The object store's CPU is known only for a stack the harness started.
    """

    def __init__(self, b: Bench) -> None:
        self.url = b.endpoints.lakefs_url
        self.lakefs_pid = b.lakefs_pid
        self.store_pid = b.store_pid

    def read(self) -> tuple[float, float | None, Counter[str], float, float, float]:
        calls, busy, reported = lakefs_metrics(self.url)
        cpu = process_cpu(self.lakefs_pid) if self.lakefs_pid else reported
        store = process_cpu(self.store_pid) if self.store_pid else None
        return cpu, store, calls, busy, client_cpu(), machine_cpu()

    def measure(self, into: list[Sample]) -> Measure:
        def run(fn: Callable[[], Any]) -> tuple[float, Any]:
            cpu0, store0, calls0, busy0, client0, all0 = self.read()
            seconds, result = timed(fn)
            cpu1, store1, calls1, busy1, client1, all1 = self.read()
            store = None if store0 is None or store1 is None else store1 - store0
            into.append(
                Sample(
                    seconds,
                    cpu1 - cpu0,
                    store,
                    calls1 - calls0,
                    client_cpu=client1 - client0,
                    lakefs_busy=busy1 - busy0,
                    machine_cpu=all1 - all0,
                )
            )
            return seconds, result

        return run


# -- s5cmd: the bucket without lakeFS -----------------------------------------------------


def scratch(b: Bench, ds: DataSet) -> str:
    """Where s5cmd's download source lives: a copy of the set made with s5cmd (not measured)."""
    return f"bench-s5cmd/{b.repo}/{ds.name}/"


def s5cmd_download(b: Bench, ds: DataSet, dest: Path) -> None:
    uri = b.bucket_uri(scratch(b, ds) + "*")
    b.s5cmd_run(["cp", uri, str(dest) + "/"], timeout=b.timeout_for(ds.total))


def s5cmd_upload(b: Bench, ds: DataSet, root: Path, prefix: str) -> None:
    b.s5cmd_run(["cp", str(root) + "/", b.bucket_uri(prefix)], timeout=b.timeout_for(ds.total))


def check_bucket(b: Bench, prefix: str, ds: DataSet, what: str) -> None:
    answer = b.s5cmd_run(["du", b.bucket_uri(prefix + "*")], timeout=120, quiet=False)
    match = re.search(r"(\d+) bytes in (\d+) objects", answer)
    found = (int(match.group(2)), int(match.group(1))) if match else None
    if found != (ds.count, ds.total):
        raise RuntimeError(f"{what}: {answer.strip()!r}, expected {ds.count} / {ds.total}")


def s5cmd_publish_once(b: Bench, ds: DataSet, measure: Measure) -> float:
    """One timed upload of the set's local copy to a new bucket prefix, checked, removed."""
    prefix = f"bench-s5cmd/{b.repo}/{b.unique('up-' + ds.name)}/"
    settle()
    seconds, _ = measure(partial(s5cmd_upload, b, ds, b.local[ds.name], prefix))
    check_bucket(b, prefix, ds, f"s5cmd upload of {ds.name}")
    b.s5cmd_run(["rm", b.bucket_uri(prefix + "*")], timeout=b.timeout_for(ds.total))
    log(f"publish {ds.name} s5cmd: {seconds:.3f}s")
    return seconds


def run_once(b: Bench, op: str, mode: str, ds: DataSet, measure: Measure) -> float:
    if op == "materialize":
        download = s5cmd_download if mode == "s5cmd" else None
        return materialize_once(b, mode, ds, download, measure)
    if mode == "s5cmd":
        return s5cmd_publish_once(b, ds, measure)
    return publish_once(b, mode, ds, measure)


# -- the case -----------------------------------------------------------------------------


def per_gib(samples: list[Sample], ds: DataSet, key: str = "lakefs") -> list[float]:
    cpu = {
        "lakefs": [s.lakefs_cpu for s in samples],
        "store": [s.store_cpu for s in samples],
        "client": [s.client_cpu for s in samples],
    }[key]
    return [c / (ds.total / GiB) for c in cpu if c is not None]


def cores_busy(samples: list[Sample]) -> float:
    """CPU seconds of lakeFS, the store and the client per wall second (the machine's
    cores bound it; other processes' CPU is not counted)."""
    return median(
        [(s.lakefs_cpu + (s.store_cpu or 0.0) + s.client_cpu) / s.seconds for s in samples]
    )


def others_busy(samples: list[Sample]) -> float:
    """Cores the rest of the machine used meanwhile (all CPU minus lakeFS, store, client)."""
    return median(
        [
            max(0.0, s.machine_cpu - s.lakefs_cpu - (s.store_cpu or 0.0) - s.client_cpu) / s.seconds
            for s in samples
        ]
    )


def lakefs_ms_per_object(samples: list[Sample], ds: DataSet) -> float:
    """Milliseconds lakeFS spent answering requests, summed over them, per object."""
    return median([s.lakefs_busy * 1000 / ds.count for s in samples])


def calls_per_object(samples: list[Sample], ds: DataSet) -> float:
    return median([sum(s.calls.values()) / ds.count for s in samples])


def top_calls(samples: list[Sample], ds: DataSet, n: int = 4) -> str:
    """The most frequent lakeFS operations per object in the median sample."""
    total: Counter[str] = Counter()
    for s in samples:
        total.update(s.calls)
    share = [(op, count / len(samples) / ds.count) for op, count in total.most_common(n)]
    return ", ".join(f"{op} {per:.2f}" for op, per in share if per >= 0.005) or "none"


def fmt_opt(value: float, spec: str = ".3f") -> str:
    return NONE if value != value else format(value, spec)  # NaN: nothing measured


def summary_table(
    b: Bench, samples: dict[tuple[str, str, str], list[Sample]], modes: tuple[str, ...]
) -> str:
    lines = [
        "| set | operation | tool | median | speed | lakeFS CPU per GiB | store CPU per GiB "
        "| client CPU per GiB | cores busy | others' cores | lakeFS calls per object "
        "| lakeFS ms per object | lakeFS calls per object, by operation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in TRANSFER_SETS:
        ds = b.sets[name]
        for op in OPS:
            for mode in modes:
                got = samples[op, name, mode]
                seconds = median([s.seconds for s in got])
                store = per_gib(got, ds, "store")
                lines.append(
                    f"| {ds.label} | {op} | {mode} | {seconds:.3f} s | "
                    f"{mib_per_s(ds.total, seconds)} | "
                    f"{fmt_opt(median(per_gib(got, ds)), '.2f')} s | "
                    f"{fmt_opt(median(store), '.2f') + ' s' if store else NONE} | "
                    f"{fmt_opt(median(per_gib(got, ds, 'client')), '.2f')} s | "
                    f"{cores_busy(got):.2f} | "
                    f"{others_busy(got):.2f} | "
                    f"{calls_per_object(got, ds):.2f} | "
                    f"{lakefs_ms_per_object(got, ds):.2f} | "
                    f"{top_calls(got, ds)} |"
                )
    return "\n".join(lines) + "\n"


def case_datapath(b: Bench) -> Section:
    s3 = b.endpoints.blockstore == "s3"
    modes = ("presign", "api", "lakectl", "s5cmd") if s3 else ("api", "lakectl")
    best = modes[0]  # what `data_path=auto` resolves to on this stack
    section = Section(
        f"6. Data path on the {b.endpoints.blockstore} blockstore",
        "Each set downloaded into an empty folder (materialize) and published as new files "
        "onto a fresh branch (upload + commit + merge) by: "
        + (
            "perago with `data_path=presign` (bodies straight to and from the store on "
            "presigned URLs), "
            if s3
            else ""
        )
        + f"perago with `data_path=api` (bodies through lakeFS), lakectl (`fs download -r` / "
        f"`branch create` + `fs upload -r` + `commit` + `merge`, {lakectl_path(b)})"
        + (
            ", and s5cmd straight from and to the bucket, without lakeFS (`s5cmd cp "
            "'s3://bucket/prefix/*' dir/` from a copy of the set uploaded by s5cmd beforehand, "
            "and `s5cmd cp dir/ s3://bucket/new-prefix/`; no commit or merge exists there)"
            if s3
            else ""
        )
        + f". Parallelism {b.parallelism} for all (perago concurrency, lakectl `-p`, s5cmd "
        f"`--numworkers`). lakeFS CPU: utime + stime of the server process read before and "
        f"after each operation, per GiB moved. *ratio* is reference time / perago time, so "
        f"> 1 means perago ({best}) is faster.",
    )
    meter = Meter(b)
    if s3:
        for name in TRANSFER_SETS:  # s5cmd's download source, not measured
            ds = b.sets[name]
            s5cmd_upload(b, ds, b.local[name], scratch(b, ds))
            check_bucket(b, scratch(b, ds), ds, f"s5cmd scratch copy of {name}")
    samples: dict[tuple[str, str, str], list[Sample]] = {
        (op, name, mode): [] for op in OPS for name in TRANSFER_SETS for mode in modes
    }
    for name in TRANSFER_SETS:
        ds = b.sets[name]
        for op in OPS:
            for rep in range(b.repeat):
                for mode in rotated(modes, rep):
                    run_once(b, op, mode, ds, meter.measure(samples[op, name, mode]))
    for name in TRANSFER_SETS:
        ds = b.sets[name]
        for op in OPS:

            def times(mode: str, op: str = op, name: str = name) -> list[float]:
                return [s.seconds for s in samples[op, name, mode]]

            item = f"{op} {ds.label}"
            speed = f"{best} {mib_per_s(ds.total, median(times(best)))}"
            section.rows.append(
                Row(
                    item,
                    "lakectl",
                    "s",
                    times(best),
                    times("lakectl"),
                    target=at_least(TARGET_VS_LAKECTL[op]),
                    extra=speed,
                )
            )
            if not s3:
                continue
            section.rows.append(Row(item, "perago api", "s", times(best), times("api")))
            target = TARGET_VS_S5CMD.get(name)
            section.rows.append(
                Row(
                    item,
                    "s5cmd (bucket only)",
                    "s",
                    times(best),
                    times("s5cmd"),
                    target=at_least(target) if target else None,
                    extra=f"s5cmd {mib_per_s(ds.total, median(times('s5cmd')))}",
                )
            )
            section.rows.append(
                Row(
                    f"{item}: lakeFS CPU per GiB",
                    "perago api",
                    "s/GiB",
                    per_gib(samples[op, name, best], ds),
                    per_gib(samples[op, name, "api"], ds),
                    target=CPU_TARGET,
                    extra=f"lakectl {fmt_opt(median(per_gib(samples[op, name, 'lakectl'], ds)), '.2f')}"
                    " s/GiB",
                )
            )
    section.tables.append(summary_table(b, samples, modes))
    section.notes.append(
        "Summary table: *lakeFS calls per object* include the fixed ones (branch creation, "
        "commit, merge, listing pages) spread over the set's objects; *lakeFS ms per object* "
        "is the time lakeFS spent answering them (`api_request_duration_seconds_sum`, summed "
        "over concurrent requests); *client CPU* is this process's (perago runs in it) plus "
        "its waited-for children's (lakectl, s5cmd); *cores busy* is lakeFS + store + client "
        f"CPU per wall second (the machine has {os.cpu_count()}); *others' cores* is what "
        "every other process on the machine used meanwhile (the Conductor of the stack, "
        "anything else running; with --stack-from-env the store too, whose CPU is then "
        "unknown), per wall second, from /proc/stat."
    )
    return section
