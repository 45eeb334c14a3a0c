"""Download every object under a prefix at a commit into an attempt workspace.

Listing pages feed a bounded queue as they arrive (pagination overlaps the downloads), a
fixed set of transfer threads drains it, bodies stream to disk in 1 MiB blocks so memory
stays flat whatever the object size, and the listing's size and checksum are trusted: no
per-object stat call. Objects a previous attempt fetched come from the local content cache.

Every materialized file's SHA-256 is computed here, from the bytes as they are written,
before the handler runs (the data plane hashes its stream; a cache hit hashes what it copies),
so that `changes.diff` can tell a rewrite with the same bytes from an edit, and the cache can
check every entry it serves. lakeFS's own checksum is not used for that: it is the MD5 of the
content only for some blockstores and upload paths (an S3 multipart or SSE-KMS ETag is not).

Per-object CPU is what bounds small-file throughput on a small machine, so the hot path is
lean: one queue hand-off per object (no future), containment proved once per directory on
its resolved path (the leaf is opened with O_NOFOLLOW), the signature taken from the open
descriptor.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from perago_worker import faultpoints
from perago_worker.ahead import Ahead
from perago_worker.cache import ObjectCache
from perago_worker.changes import FileSignature, Manifest, ManifestEntry
from perago_worker.contract import FailureKind, TaskFailure
from perago_worker.lakefs import LakeFS, ObjectInfo
from perago_worker.paths import TreeShape, UnsafeKey, key_to_relative, local_path

# Python threads share one interpreter lock: past a handful, more threads only add
# contention for small objects. Large objects are I/O-bound and release it while waiting.
SMALL_OBJECT_THREADS = 8
SMALL_OBJECT = 256 * 1024
# See `settle`: racy entries up to this many bytes are cheaper to read at diff time than to
# wait for the file system's clock; past it, wait up to RACY_WAIT_SECONDS.
RACY_READ_BYTES = 4 << 20
RACY_WAIT_SECONDS = 0.05
SCOPE_TTL_SECONDS = 300.0


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
    listing: Iterator[list[ObjectInfo]] | None = None,
) -> tuple[Manifest, MaterializeStats]:
    """Download `prefix` at `ref` under `root`; the manifest of what landed.

    `listing` is the prefix's listing when the caller asked for it ahead (`listing_ahead`),
    else it is read here."""
    started = time.monotonic()
    stats = MaterializeStats()
    manifest: Manifest = {}
    shape = TreeShape()
    safe_dirs: set[Path] = {root}
    lock = threading.Lock()
    jobs: queue.Queue[Job | None] = queue.Queue(maxsize=concurrency * 4)
    errors: list[BaseException] = []
    stop = threading.Event()

    scope = repository_scope(lakefs, repository) if cache is not None else ""
    transfers = lakefs.transfers

    def fetch(obj: ObjectInfo, rel: PurePosixPath, dest: Path) -> None:
        key = cache.key(scope, obj.checksum, obj.size, obj.mtime) if cache is not None else ""
        served = cache.serve(key, obj.size, dest) if cache is not None and key else None
        hit = served is not None
        if served is not None:
            st, digest = served
        else:
            done = transfers.download(repository, ref, obj, dest)
            st, digest = done.stat, done.sha256
        faultpoints.hit("materialize.object")
        entry = ManifestEntry(FileSignature.of(st), obj.checksum, digest, key)
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
    listed = 0
    try:
        pages = listing if listing is not None else transfers.list_objects(repository, ref, prefix)
        for page in pages:
            big = any(obj.size >= SMALL_OBJECT for obj in page)
            listed += len(page)
            # Never more threads than objects: a small prefix (a few files) would otherwise
            # start 8 threads to fetch 3 files, and a thread start costs about as much CPU
            # as a small cached file.
            ensure_workers(min(listed, concurrency if big else small_object_threads))
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
    manifest = settle(root, manifest)
    stats.seconds = time.monotonic() - started
    return manifest, stats


def listing_ahead(
    lakefs: LakeFS, repository: str, ref: str, prefix: str
) -> Iterator[list[ObjectInfo]]:
    """The listing `materialize` reads, its first page asked for now (`ahead.Ahead`).

    An attempt starts it before resolving its execution (two ledger round trips), so a small
    prefix's listing is there when materialize begins; later pages are read as they are
    consumed, as before. A read at an immutable commit: nothing a fence orders. Unused (the
    attempt adopted an earlier merge), it costs one listing request."""
    pages = lakefs.transfers.list_objects(repository, ref, prefix)
    first = Ahead(lambda: next(pages, None), name="list-ahead")

    def iterate() -> Iterator[list[ObjectInfo]]:
        page = first.result()
        if page is None:
            return
        yield page
        yield from pages  # continued on the caller's thread, after the first page finished

    return iterate()


def fs_clock(folder: Path) -> int:
    """The file system's current time as it stamps a ctime: that of a new, removed file."""
    while True:
        probe = folder / f".perago-clock-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        try:
            return os.fstat(fd).st_ctime_ns
        finally:
            os.close(fd)
            probe.unlink()


def settle(
    root: Path,
    manifest: Manifest,
    *,
    read_bytes: int = RACY_READ_BYTES,
    wait_seconds: float = RACY_WAIT_SECONDS,
) -> Manifest:
    """Make sure any later change to a materialized file moves its signature, or flag it.

    A ctime is stamped with the file system's clock, whose granularity is a few milliseconds
    on Linux (a kernel tick; finer on kernels with multigrain timestamps): a handler write in
    the same tick as a file's download could leave its ctime, and so its signature, as it
    was. Entries stamped at or after the clock's current reading are therefore `racy` and
    always read by `diff`. When they are few bytes, reading them later is cheaper than
    waiting; past `read_bytes` the clock is given up to `wait_seconds` to move past them.
    """
    if not manifest:
        return manifest
    newest = max(entry.signature.ctime_ns for entry in manifest.values())
    now = fs_clock(root)
    if now > newest:
        return manifest
    racy_bytes = sum(e.signature.size for e in manifest.values() if e.signature.ctime_ns >= now)
    if racy_bytes > read_bytes:
        deadline = time.monotonic() + wait_seconds
        while now <= newest and time.monotonic() < deadline:
            time.sleep(0.001)
            now = fs_clock(root)
    return {
        rel: replace(entry, racy=True) if entry.signature.ctime_ns >= now else entry
        for rel, entry in manifest.items()
    }


_SCOPES: dict[tuple[str, str], tuple[float, str]] = {}
_SCOPES_LOCK = threading.Lock()


def repository_scope(lakefs: LakeFS, repository: str) -> str:
    """What makes an object's cache key unique across servers, repositories and re-creations.

    A lakeFS checksum identifies content only within one repository's storage (an ETag from
    another bucket, server or environment may name other bytes), so cache keys carry the
    server, the repository's name, its storage namespace and its creation time. Looked up
    once per repository every few minutes (one small request).
    """
    memo_key = (lakefs.endpoint, repository)
    now = time.monotonic()
    with _SCOPES_LOCK:
        known = _SCOPES.get(memo_key)
    if known is not None and now - known[0] < SCOPE_TTL_SECONDS:
        return known[1]
    repo = lakefs.call(lakefs.repos.get_repository, repository)
    scope = json.dumps(
        [lakefs.endpoint, repository, str(repo.storage_namespace), str(repo.creation_date)]
    )
    with _SCOPES_LOCK:
        _SCOPES[memo_key] = (now, scope)
    return scope


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
