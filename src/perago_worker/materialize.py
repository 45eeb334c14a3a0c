"""Download every object under a prefix at a commit into an attempt workspace.

Listing pages feed a bounded download pool as they arrive (pagination overlaps the
downloads), bodies stream to disk in 1 MiB blocks so memory stays flat whatever the object
size, and the listing's size and checksum are trusted: no per-object stat call. Objects a
previous attempt fetched come from the local content cache as hard links, costing only
metadata.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from perago_worker import faultpoints
from perago_worker.cache import ObjectCache
from perago_worker.changes import FileSignature, Manifest, ManifestEntry
from perago_worker.contract import FailureKind, TaskFailure
from perago_worker.lakefs import LakeFS, ObjectInfo
from perago_worker.paths import TreeShape, UnsafeKey, key_to_relative, local_path


@dataclass
class MaterializeStats:
    files: int = 0
    bytes: int = 0
    cached_files: int = 0
    seconds: float = 0.0


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
) -> tuple[Manifest, MaterializeStats]:
    started = time.monotonic()
    stats = MaterializeStats()
    manifest: Manifest = {}
    shape = TreeShape()
    made_dirs: set[Path] = {root}
    lock = threading.Lock()
    # At most 2x the pool in flight: enough to keep every worker busy without holding a
    # future per object for a 100k-object prefix.
    slots = threading.BoundedSemaphore(concurrency * 2)
    pending: set[Future[None]] = set()

    def fetch(obj: ObjectInfo, rel: PurePosixPath, dest: Path) -> None:
        try:
            hit = cache is not None and cache.link_into(obj.checksum, obj.size, dest)
            if not hit:
                lakefs.download(repository, ref, obj.key, dest, obj.size)
            entry = ManifestEntry(FileSignature.of(dest.stat()), obj.checksum)
            faultpoints.hit("materialize.object")
            with lock:
                manifest[rel] = entry
                stats.files += 1
                stats.bytes += obj.size
                stats.cached_files += int(hit)
        finally:
            slots.release()

    with ThreadPoolExecutor(concurrency, thread_name_prefix="materialize") as pool:
        try:
            for page in lakefs.list_objects(repository, ref, prefix):
                for obj in page:
                    if cancelled():
                        raise TaskFailure(FailureKind.ABORTED, "cancelled while materializing")
                    try:
                        rel = key_to_relative(obj.key, prefix)
                        shape.add(rel)
                        dest = local_path(root, rel)
                    except UnsafeKey as exc:
                        raise TaskFailure(
                            FailureKind.UNSAFE_KEY,
                            f"{exc}; it cannot be materialized safely "
                            f"(repository {repository!r} at {ref[:12]})",
                        ) from None
                    if dest.parent not in made_dirs:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        made_dirs.add(dest.parent)
                    slots.acquire()
                    pending.add(pool.submit(fetch, obj, rel, dest))
                    # Surface a failed download early instead of after the whole listing.
                    done = {f for f in pending if f.done()}
                    for future in done:
                        future.result()
                    pending -= done
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    stats.seconds = time.monotonic() - started
    return manifest, stats
