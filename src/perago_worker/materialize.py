"""Download every object under a prefix at a commit into an attempt workspace.

Listing pages feed a bounded queue as they arrive (pagination overlaps the downloads), a
fixed set of transfer threads drains it, bodies stream to disk in 1 MiB blocks so memory
stays flat whatever the object size, and the listing's size and checksum are trusted: no
per-object stat call. Objects a previous attempt fetched come from the local content cache.

Per-object CPU is what bounds small-file throughput on a small machine, so the hot path is
lean: one queue hand-off per object (no future), containment proved once per directory on
its resolved path (the leaf is opened with O_NOFOLLOW), the signature taken from the open
descriptor.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from perago_worker import faultpoints
from perago_worker.cache import ObjectCache
from perago_worker.changes import FileSignature, Manifest, ManifestEntry
from perago_worker.contract import FailureKind, TaskFailure
from perago_worker.lakefs import LakeFS, ObjectInfo
from perago_worker.paths import TreeShape, UnsafeKey, key_to_relative, local_path

# Python threads share one interpreter lock: past a handful, more threads only add
# contention for small objects. Large objects are I/O-bound and release it while waiting.
SMALL_OBJECT_THREADS = 8
SMALL_OBJECT = 256 * 1024


@dataclass
class MaterializeStats:
    files: int = 0
    bytes: int = 0
    cached_files: int = 0
    seconds: float = 0.0


Job = tuple[ObjectInfo, PurePosixPath, Path]


def materialize(
    lakefs: LakeFS,
    repository: str,
    ref: str,
    prefix: str,
    root: Path,
    *,
    concurrency: int,
    cache: ObjectCache | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    small_object_threads: int = SMALL_OBJECT_THREADS,
) -> tuple[Manifest, MaterializeStats]:
    started = time.monotonic()
    stats = MaterializeStats()
    manifest: Manifest = {}
    shape = TreeShape()
    safe_dirs: set[Path] = {root}
    lock = threading.Lock()
    jobs: queue.Queue[Job | None] = queue.Queue(maxsize=concurrency * 4)
    errors: list[BaseException] = []
    stop = threading.Event()

    def fetch(obj: ObjectInfo, rel: PurePosixPath, dest: Path) -> None:
        hit = cache is not None and cache.link_into(obj.checksum, obj.size, dest)
        st = dest.stat() if hit else lakefs.download(repository, ref, obj.key, dest, obj.size)
        faultpoints.hit("materialize.object")
        entry = ManifestEntry(FileSignature.of(st), obj.checksum)
        with lock:
            manifest[rel] = entry
            stats.files += 1
            stats.bytes += obj.size
            stats.cached_files += int(hit)

    def worker() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            if stop.is_set():
                continue
            try:
                fetch(*job)
            except BaseException as exc:
                with lock:
                    errors.append(exc)
                stop.set()

    threads: list[threading.Thread] = []

    def ensure_workers(wanted: int) -> None:
        while len(threads) < min(wanted, concurrency):
            thread = threading.Thread(target=worker, name="materialize", daemon=True)
            thread.start()
            threads.append(thread)

    ensure_workers(1)
    try:
        for page in lakefs.list_objects(repository, ref, prefix):
            big = any(obj.size >= SMALL_OBJECT for obj in page)
            ensure_workers(concurrency if big else small_object_threads)
            for obj in page:
                if stop.is_set():
                    break
                if cancelled():
                    raise TaskFailure(FailureKind.ABORTED, "cancelled while materializing")
                rel, dest = _place(obj.key, prefix, root, shape, safe_dirs, repository, ref)
                jobs.put((obj, rel, dest))
            if stop.is_set():
                break
    except BaseException:
        stop.set()
        raise
    finally:
        if errors or stop.is_set():
            _drain(jobs)
        for _ in threads:
            jobs.put(None)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    stats.seconds = time.monotonic() - started
    return manifest, stats


def _place(
    key: str,
    prefix: str,
    root: Path,
    shape: TreeShape,
    safe_dirs: set[Path],
    repository: str,
    ref: str,
) -> tuple[PurePosixPath, Path]:
    """Validate a key and create its folder; containment is proved once per folder."""
    try:
        rel = key_to_relative(key, prefix)
        shape.add(rel)
        dest = root.joinpath(*rel.parts)
        parent = dest.parent
        if parent not in safe_dirs:
            parent.mkdir(parents=True, exist_ok=True)
            try:
                local_path(root, rel.parent)
            except UnsafeKey:
                raise UnsafeKey(key, f"resolves outside the workspace root {root}") from None
            safe_dirs.add(parent)
        return rel, dest
    except UnsafeKey as exc:
        raise TaskFailure(
            FailureKind.UNSAFE_KEY,
            f"{exc}; it cannot be materialized safely (repository {repository!r} at {ref[:12]})",
        ) from None


def _drain(jobs: queue.Queue[Job | None]) -> None:
    while True:
        try:
            jobs.get_nowait()
        except queue.Empty:
            return
