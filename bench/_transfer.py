"""The data-path cases: materialize, publish, 1 %-changed publish, warm cache, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

from _harness import (
    BENCH_DIR,
    TRANSFER_SETS,
    Bench,
    DataSet,
    GiB,
    check_tree,
    discard,
    fmt_bytes,
    log,
    median,
    rotated,
    settle,
    timed,
)
from _report import Row, Section, Target
from perago_worker.cache import CacheMode, ObjectCache
from perago_worker.changes import Manifest, diff, scan
from perago_worker.materialize import materialize
from perago_worker.publish import commit_staged, stage

RATIO_AT_LEAST_1 = Target("ratio ≥ 1.0", lambda r: r.ratio >= 1.0)
RATIO_AT_LEAST_5 = Target("ratio ≥ 5.0", lambda r: r.ratio >= 5.0)
FRACTION_UNDER_10 = Target("< 10 % of full", lambda r: r.perago_median / r.ref_median < 0.10)
RSS_UNDER_200 = Target("peak RSS < 200 MiB", lambda r: r.perago_median < 200)
# What the worker attaches to every merge: the same number of keys, so commits cost the same.
PROVENANCE = {f"perago.field_{i}": f"value-{i}" for i in range(10)}


def mib_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / (1 << 20) / seconds:.0f} MiB/s" if seconds > 0 else ""


# -- materialize --------------------------------------------------------------------------


Measure = Callable[[Callable[[], Any]], tuple[float, Any]]


def perago_materialize(b: Bench, ds: DataSet, dest: Path, data_path: str | None = None) -> None:
    """`materialize` with the run's client, or one on `data_path` (api, presign)."""
    lakefs = b.lakefs if data_path is None else b.client(data_path)
    materialize(lakefs, b.repo, b.seed_commit, ds.prefix, dest, concurrency=b.parallelism)


def lakectl_download(b: Bench, ds: DataSet, dest: Path) -> None:
    b.lakectl_run(
        [
            "fs",
            "download",
            "--recursive",
            "--no-progress",
            "--parallelism",
            str(b.parallelism),
            b.uri(b.seed_commit, ds.prefix),
            str(dest) + "/",
        ],
        timeout=b.timeout_for(ds.total),
    )


def sdk_loop(b: Bench, ds: DataSet, dest: Path) -> None:
    """The naive client: list pages, then `get_object` (whole body in memory) one by one."""
    objects = b.lakefs.objects
    after = ""
    while True:
        page = objects.list_objects(
            b.repo, b.seed_commit, prefix=ds.prefix, after=after, amount=1000
        )
        for obj in page.results:
            body = objects.get_object(b.repo, b.seed_commit, obj.path)
            path = dest / obj.path.removeprefix(ds.prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        if not page.pagination.has_more:
            return
        after = page.pagination.next_offset


DOWNLOADERS: dict[str, Callable[[Bench, DataSet, Path], None]] = {
    "perago": perago_materialize,
    "presign": partial(perago_materialize, data_path="presign"),
    "api": partial(perago_materialize, data_path="api"),
    "lakectl": lakectl_download,
    "sdk": sdk_loop,
}


def lakectl_path(b: Bench) -> str:
    """How lakectl moves bodies on this stack (it presigns whenever the server can)."""
    if b.endpoints.blockstore == "local":
        return (
            "the local blockstore has no pre-signed URLs, so lakectl streams through the "
            "lakeFS API like perago"
        )
    return "lakectl presigns on the s3 blockstore (`--pre-sign` defaults to true)"


def materialize_once(
    b: Bench,
    tool: str,
    ds: DataSet,
    download: Callable[[Bench, DataSet, Path], None] | None = None,
    measure: Measure = timed,
) -> float:
    """One timed download of the set into a fresh folder, checked and then removed."""
    dest = b.fresh_dir(f"mat-{tool}-{ds.name}")
    settle()
    seconds, _ = measure(partial(download or DOWNLOADERS[tool], b, ds, dest))
    check_tree(dest, ds, f"{tool} materialize of {ds.name}")
    discard(dest)
    log(f"materialize {ds.name} {tool}: {seconds:.3f}s")
    return seconds


def case_materialize(b: Bench) -> Section:
    section = Section(
        "1. Materialize",
        f"Download every object under the set's prefix at the seed commit into an empty "
        f"folder. perago: `materialize(concurrency={b.parallelism})`; lakectl: `lakectl fs "
        f"download --recursive --parallelism {b.parallelism}` ({lakectl_path(b)}; its process "
        f"start is included); SDK loop: one thread, `list_objects` pages then "
        f"`ObjectsApi.get_object` per object, bytes written to a file.",
    )
    tools = ("perago", "lakectl", "sdk")
    for name in TRANSFER_SETS:
        ds = b.sets[name]
        times: dict[str, list[float]] = {t: [] for t in tools}
        for rep in range(b.repeat):
            for tool in rotated(tools, rep):
                times[tool].append(materialize_once(b, tool, ds))
        speed = mib_per_s(ds.total, median(times["perago"]))
        section.rows.append(
            Row(
                ds.label,
                "lakectl fs download",
                "s",
                times["perago"],
                times["lakectl"],
                target=RATIO_AT_LEAST_1,
                extra=f"perago {speed}",
            )
        )
        section.rows.append(
            Row(
                ds.label,
                "sequential SDK loop",
                "s",
                times["perago"],
                times["sdk"],
                target=RATIO_AT_LEAST_5 if name == "small" else None,
                extra=f"SDK {mib_per_s(ds.total, median(times['sdk']))}",
            )
        )
    section.notes.append(
        "The SDK loop holds each object in memory (`get_object` returns a bytearray): up to "
        f"{fmt_bytes(b.sets['large'].size)} at a time on the large set."
    )
    return section


# -- publish ------------------------------------------------------------------------------


def perago_publish(
    b: Bench, prefix: str, root: Path, target: str, data_path: str | None = None
) -> int:
    """scan + diff + stage (creates the hidden staging branch, uploads) + commit + merge,
    with the run's client or one on `data_path` (api, presign)."""
    lakefs = b.lakefs if data_path is None else b.client(data_path)
    scanned = scan(root)
    changes = diff({}, scanned)
    staging = target + "-staging"
    stage(
        lakefs,
        b.repo,
        b.seed_commit,
        staging,
        prefix,
        root,
        changes,
        scanned=scanned,
        concurrency=b.parallelism,
    )
    commit_staged(lakefs, b.repo, staging, "bench: publish", PROVENANCE)
    lakefs.merge(b.repo, staging, target, "bench: publish", PROVENANCE)
    return len(changes.uploads)


def lakectl_publish(b: Bench, prefix: str, root: Path, target: str, nbytes: int) -> None:
    """The same steps with the CLI: branch create, fs upload -r, commit, merge."""
    staging = target + "-staging"
    b.lakectl_run(["branch", "create", b.uri(staging), "--source", b.uri(target)], timeout=60)
    b.lakectl_run(
        [
            "fs",
            "upload",
            "--recursive",
            "--no-progress",
            "--parallelism",
            str(b.parallelism),
            "--source",
            str(root),
            b.uri(staging, prefix),
        ],
        timeout=b.timeout_for(nbytes),
    )
    meta = [arg for k, v in PROVENANCE.items() for arg in ("--meta", f"{k}={v}")]
    b.lakectl_run(["commit", b.uri(staging), "-m", "bench: publish", *meta], timeout=120)
    b.lakectl_run(
        ["merge", b.uri(staging), b.uri(target), "-m", "bench: publish", *meta], timeout=120
    )


def check_published(b: Bench, target: str, prefix: str, ds: DataSet, what: str) -> None:
    found = [o for page in b.lakefs.list_objects(b.repo, target, prefix) for o in page]
    total = sum(o.size for o in found)
    if (len(found), total) != (ds.count, ds.total):
        raise RuntimeError(
            f"{what}: {len(found)} objects / {total} bytes under {prefix} on {target}, "
            f"expected {ds.count} / {ds.total}"
        )


def publisher(b: Bench, tool: str, ds: DataSet) -> Callable[[str, Path, str], object]:
    """(prefix, root, target) -> publish with `tool`: perago (the run's client), presign,
    api (perago on that data path) or lakectl."""
    if tool == "lakectl":
        return partial(lakectl_publish, b, nbytes=ds.total)
    return partial(perago_publish, b, data_path=None if tool == "perago" else tool)


def publish_once(b: Bench, tool: str, ds: DataSet, measure: Measure = timed) -> float:
    """One timed full publish of the set's local copy as new files on a new target branch."""
    target = b.unique(f"pub-{tool}-{ds.name}")
    b.lakefs.create_branch(b.repo, target, b.seed_commit, hidden=False)  # not measured
    prefix = f"published/{ds.name}/"
    root = b.local[ds.name]
    settle()
    seconds, _ = measure(partial(publisher(b, tool, ds), prefix, root, target))
    check_published(b, target, prefix, ds, f"{tool} publish of {ds.name}")
    log(f"publish {ds.name} {tool}: {seconds:.3f}s")
    return seconds


def case_publish(b: Bench) -> Section:
    section = Section(
        "2. Publish (new files: upload + commit + merge)",
        f"Publish the set as new files onto a fresh branch made from the seed commit. "
        f"perago: `scan` + `diff` + `stage` (creates the hidden staging branch, uploads with "
        f"concurrency {b.parallelism}) + `commit_staged` + `merge`; lakectl: `branch create` + "
        f"`fs upload --recursive --parallelism {b.parallelism}` + `commit` + `merge` (four "
        f"processes). Both commits carry the same 10 metadata keys. The source files are the "
        f"same local copy for both tools (in the page cache).",
    )
    for name in TRANSFER_SETS:
        ds = b.sets[name]
        times: dict[str, list[float]] = {"perago": [], "lakectl": []}
        for rep in range(b.repeat):
            for tool in rotated(list(times), rep):
                times[tool].append(publish_once(b, tool, ds))
        b.full_publish[name] = times["perago"]
        section.rows.append(
            Row(
                ds.label,
                "lakectl upload+commit+merge",
                "s",
                times["perago"],
                times["lakectl"],
                target=RATIO_AT_LEAST_1,
                extra=f"perago {mib_per_s(ds.total, median(times['perago']))}",
            )
        )
    return section


def publish_changes(b: Bench, prefix: str, root: Path, manifest: Manifest, target: str) -> int:
    """What the worker does after a handler: scan, diff, stage, commit, merge."""
    scanned = scan(root)
    changes = diff(manifest, scanned, root)
    staging = target + "-staging"
    stage(
        b.lakefs,
        b.repo,
        b.seed_commit,
        staging,
        prefix,
        root,
        changes,
        scanned=scanned,
        concurrency=b.parallelism,
    )
    commit_staged(b.lakefs, b.repo, staging, "bench: 1 %", PROVENANCE)
    b.lakefs.merge(b.repo, staging, target, "bench: 1 %", PROVENANCE)
    return len(changes.modified)


def case_incremental(b: Bench) -> Section:
    section = Section(
        "2b. Publish after changing 1 % of the files",
        "Materialize the set, rewrite 1 % of its files in place (same size, new random bytes), "
        "then time what the worker does after a handler: `scan` + `diff` (stat signatures; the "
        "rewritten files kept their size, so they are hashed and compared with the digest taken "
        "at materialize) + `stage` + `commit_staged` + `merge`. The reference figure is perago's "
        "full publish of the same set (case 2, or measured here when case 2 did not run).",
    )
    for name in ("small", "medium"):
        ds = b.sets[name]
        n = max(1, ds.count // 100)
        full = b.full_publish.get(name)
        if not full:
            full = [publish_once(b, "perago", ds) for _ in range(b.repeat)]
            b.full_publish[name] = full
        times: list[float] = []
        for _rep in range(b.repeat):
            root = b.fresh_dir(f"inc-{name}")
            manifest, _ = materialize(
                b.lakefs, b.repo, b.seed_commit, ds.prefix, root, concurrency=b.parallelism
            )
            time.sleep(0.05)  # past the file system's timestamp granularity
            chosen = sorted(manifest)[:: max(1, ds.count // n)][:n]
            for rel in chosen:
                (root / rel).write_bytes(os.urandom(ds.size))
            target = b.unique(f"inc-{name}")
            b.lakefs.create_branch(b.repo, target, b.seed_commit, hidden=False)
            settle()
            seconds, modified = timed(
                partial(publish_changes, b, ds.prefix, root, manifest, target)
            )
            if modified != n:
                raise RuntimeError(f"1 % publish of {name}: {modified} modified, expected {n}")
            discard(root)
            times.append(seconds)
            log(f"1 % publish {name} ({n} files): {seconds:.3f}s")
        fraction = median(times) / median(full)
        section.rows.append(
            Row(
                f"{ds.label}, {n} changed",
                "perago full publish",
                "s",
                times,
                full,
                target=FRACTION_UNDER_10,
                extra=f"{fraction * 100:.1f} % of full",
            )
        )
    return section


# -- warm cache ---------------------------------------------------------------------------


def warm_cache(b: Bench, ds: DataSet, mode: CacheMode) -> ObjectCache:
    """A cache holding every object of the set, filled the way the worker fills it."""
    cache = ObjectCache(b.fresh_dir(f"cache-{mode}-entries"), 4 * ds.total + GiB, mode)
    fill = b.fresh_dir(f"cache-{mode}-fill")
    manifest, _ = materialize(
        b.lakefs, b.repo, b.seed_commit, ds.prefix, fill, concurrency=b.parallelism, cache=cache
    )
    cache.adopt(manifest, fill)
    discard(fill)
    return cache


def cached_materialize(b: Bench, ds: DataSet, dest: Path, cache: ObjectCache | None) -> int:
    _, stats = materialize(
        b.lakefs, b.repo, b.seed_commit, ds.prefix, dest, concurrency=b.parallelism, cache=cache
    )
    return stats.cached_files


def case_cache(b: Bench) -> Section:
    ds = b.sets["small"]
    section = Section(
        "5. Materialize from a warm object cache",
        "The small set materialized again when every object is already in the worker's "
        "content cache (filled as the worker does: `ObjectCache.adopt` of each materialized "
        "file). The reference is perago's cold materialize in the same repeat. Each hit gets "
        "its own inode (a reflink where the file system supports it, else a copy) and is "
        "verified by hashing what was copied.",
    )
    times: dict[str, list[float]] = {"cold": [], "copy": []}
    modes: list[CacheMode | Literal["cold"]] = ["cold", "copy"]
    for rep in range(b.repeat):
        for mode in rotated(modes, rep):
            dest = b.fresh_dir(f"cache-{mode}")
            cache = None if mode == "cold" else warm_cache(b, ds, mode)
            settle()
            seconds, hits = timed(partial(cached_materialize, b, ds, dest, cache))
            check_tree(dest, ds, f"{mode} materialize")
            expected = 0 if cache is None else ds.count
            if hits != expected:
                raise RuntimeError(f"{mode}: {hits} cache hits, expected {expected}")
            discard(dest)
            if cache is not None:
                discard(cache.folder)
            times[mode].append(seconds)
            log(f"cache {mode} #{rep + 1}: {seconds:.3f}s")
    for mode in ("copy",):
        section.rows.append(
            Row(f"{ds.label}, warm ({mode})", "perago cold", "s", times[mode], times["cold"])
        )
    return section


# -- memory -------------------------------------------------------------------------------


def run_probe(b: Bench, mode: str, extra: list[str], timeout: float) -> dict[str, Any]:
    e = b.endpoints
    env = {
        **os.environ,
        "BENCH_LAKEFS_URL": e.lakefs_url,
        "BENCH_LAKEFS_KEY": e.lakefs_access_key_id,
        "BENCH_LAKEFS_SECRET": e.lakefs_secret_access_key,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    ds = b.sets["huge"]
    root = b.fresh_dir(f"mem-{mode}")
    cmd = [
        sys.executable,
        str(BENCH_DIR / "_memory_probe.py"),
        mode,
        "--repo",
        b.repo,
        "--ref",
        b.seed_commit,
        "--prefix",
        ds.prefix,
        "--root",
        str(root),
        "--concurrency",
        str(b.parallelism),
        "--timeout",
        str(timeout),
        *extra,
    ]
    settle()
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout + 30, check=False
        )
    finally:
        discard(root)
    if proc.returncode != 0:
        raise RuntimeError(
            f"memory probe {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["materialized_bytes"] != ds.total:
        raise RuntimeError(f"memory probe {mode}: {result}")
    log(f"memory {mode}: {result}")
    return result


def case_memory(b: Bench) -> Section:
    ds = b.sets["huge"]
    size = fmt_bytes(ds.size)
    section = Section(
        f"4. Peak memory for a {size} object",
        f"Each figure is the peak RSS (`VmHWM`) of a fresh process (bench/_memory_probe.py). "
        f"perago: materialize the {size} object, move a new {size} file into the workspace and "
        f"publish it (scan, diff, stage, commit, merge). References: the SDK's `get_object` "
        f"(download only) and `lakectl fs download` (download only, peak RSS of the child).",
    )
    timeout = b.timeout_for(2 * ds.total)
    new_file = b.local["huge"] / ds.rel_paths()[0]  # the seeded bytes, as a new key
    runs: dict[str, list[dict[str, Any]]] = {"perago": [], "sdk": [], "lakectl": []}
    for rep in range(b.repeat):
        for mode in rotated(list(runs), rep):
            extra: list[str] = []
            if mode == "perago":
                extra = ["--new-file", str(new_file), "--target", b.unique("mem")]
            elif mode == "lakectl":
                extra = ["--lakectl", str(b.lakectl)]
            runs[mode].append(run_probe(b, mode, extra, timeout))

    def peaks(mode: str, key: str = "peak_hwm_mib") -> list[float]:
        return [float(r[key]) for r in runs[mode]]

    p = runs["perago"]
    mat = median([float(r["after_materialize_hwm_mib"]) for r in p])
    base = median([float(r["baseline_hwm_mib"]) for r in p])
    pub_s = median([float(r["publish_s"]) for r in p])
    mat_s = median([float(r["materialize_s"]) for r in p])
    section.rows.append(
        Row(
            f"{size}: materialize + publish {size}",
            "SDK get_object (download only)",
            "MiB",
            peaks("perago"),
            peaks("sdk"),
            target=RSS_UNDER_200,
            extra=f"after imports {base:.0f} MiB, after materialize {mat:.0f} MiB",
        )
    )
    section.rows.append(
        Row(
            f"{size}: materialize + publish {size}",
            "lakectl fs download",
            "MiB",
            peaks("perago"),
            peaks("lakectl"),
            extra=f"perago materialize {mat_s:.2f} s, publish {pub_s:.2f} s",
        )
    )
    return section
