"""Stage a change set on a hidden branch, commit it with provenance, and merge it once.

All writes go to the staging branch created from the input commit; the merge into the
target branch is the single atomic step that makes anything visible there. The merge goes
through the publish fence (see `fences`): the staged commit is claimed by an intent branch,
and whoever finds an intent merges that commit, never a second one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perago_worker import fences
from perago_worker.changes import ChangeSet
from perago_worker.contract import FailureKind, TaskFailure
from perago_worker.lakefs import Conflict, LakeFS, NoChanges, NotFound
from perago_worker.paths import relative_to_key

MAX_RESULT_METADATA = 256 * 1024


@dataclass
class StageStats:
    files: int = 0
    bytes: int = 0
    deleted: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Published:
    ref: str
    result: dict[str, Any]
    adopted: bool
    merged: bool


def stage(
    lakefs: LakeFS,
    repository: str,
    input_ref: str,
    branch: str,
    prefix: str,
    root: Path,
    changes: ChangeSet,
    *,
    concurrency: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> StageStats:
    started = time.monotonic()
    stats = StageStats()
    lakefs.create_branch(repository, branch, input_ref, hidden=True)

    def put(rel_size: tuple[Any, int]) -> None:
        rel, _size = rel_size
        if cancelled():
            raise TaskFailure(FailureKind.ABORTED, "cancelled while uploading")
        lakefs.upload(repository, branch, relative_to_key(rel, prefix), root.joinpath(*rel.parts))

    uploads = [(f.rel, f.size) for f in changes.uploads]
    # Largest first: a few big files start at once instead of finishing last, alone.
    uploads.sort(key=lambda item: -item[1])
    if uploads:
        # Unlike downloads, uploads of small objects wait on the server (measured: 2,000 x
        # 16 KiB took 15 s with 2 threads, 3.2 s with 8, 2 s with 16 to 64): use them all.
        with ThreadPoolExecutor(min(concurrency, len(uploads)), thread_name_prefix="stage") as pool:
            list(pool.map(put, uploads))
    if changes.deleted:
        lakefs.delete_objects(
            repository, branch, [relative_to_key(r, prefix) for r in changes.deleted]
        )
    stats.files = len(uploads)
    stats.bytes = changes.upload_bytes
    stats.deleted = len(changes.deleted)
    stats.seconds = time.monotonic() - started
    return stats


def result_metadata(result: dict[str, Any]) -> str:
    text = json.dumps(result, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_RESULT_METADATA:
        raise TaskFailure(
            FailureKind.INVALID_RESULT,
            f"result is {len(text)} bytes of JSON; the limit is {MAX_RESULT_METADATA} "
            "(return a path to a file in the workspace instead of large data)",
        )
    return text


def commit_staged(
    lakefs: LakeFS, repository: str, branch: str, message: str, metadata: dict[str, str]
) -> str:
    try:
        return lakefs.commit(repository, branch, message, metadata).id
    except NoChanges:
        # A retried commit whose first request landed: the head is ours if it carries our key.
        head = lakefs.get_commit(repository, lakefs.branch_head(repository, branch))
        if head.metadata.get(fences.META_KEY) == metadata.get(fences.META_KEY):
            return head.id
        raise


def claim(lakefs: LakeFS, repository: str, key: str, staged_commit: str) -> bool:
    """Create the intent branch at our staged commit: True if we own the publish now."""
    try:
        lakefs.create_branch(repository, fences.intent_branch(key), staged_commit, hidden=True)
    except Conflict:
        return False
    return True


def existing_intent(lakefs: LakeFS, repository: str, key: str) -> str | None:
    """The staged commit an earlier attempt claimed for this key, if any."""
    try:
        return lakefs.branch_head(repository, fences.intent_branch(key))
    except NotFound:
        return None


def merge_intent(
    lakefs: LakeFS,
    repository: str,
    target: str,
    key: str,
    staged_commit: str,
    message: str,
    metadata: dict[str, str],
) -> tuple[str, bool]:
    """Merge the claimed commit into `target` once; return (target ref, merged-by-us)."""
    meta = {**metadata, fences.META_KEY: key, fences.META_STAGED: staged_commit}
    try:
        return lakefs.merge(repository, fences.intent_branch(key), target, message, meta), True
    except NoChanges:
        pass
    log = lakefs.log(repository, target, amount=1000, first_parent=True)
    found = fences.find_merge_commit(log, key, staged_commit)
    if found is not None:
        return found, False
    # Nothing to merge and no merge of ours: the target already holds exactly this content
    # (another execution published the same change). Its head is the truthful answer.
    return lakefs.branch_head(repository, target), False


def conflicting_paths(
    lakefs: LakeFS, repository: str, input_ref: str, target: str, ours: list[str], limit: int = 10
) -> list[str]:
    """Paths both this attempt and the target branch changed since the input ref."""
    theirs = set(lakefs.changed_paths(repository, input_ref, target, limit=10_000))
    return sorted(p for p in ours if p in theirs)[:limit]


def adopt(
    lakefs: LakeFS, repository: str, target: str, key: str, message: str, metadata: dict[str, str]
) -> Published | None:
    """Finish (or just read back) a publish an earlier attempt claimed for this key."""
    staged = existing_intent(lakefs, repository, key)
    if staged is None:
        return None
    commit = lakefs.get_commit(repository, staged)
    try:
        ref, merged = merge_intent(lakefs, repository, target, key, staged, message, metadata)
    except Conflict as exc:
        # The claimed commit can never land: free the key so an operator's retry re-runs.
        lakefs.delete_branch(repository, fences.intent_branch(key))
        raise TaskFailure(
            FailureKind.MERGE_CONFLICT,
            f"the publish claimed by an earlier attempt conflicts with branch {target!r} "
            f"({exc.message}); nothing was published",
        ) from None
    result = json.loads(commit.metadata.get(fences.META_RESULT, "{}"))
    return Published(ref, result, adopted=True, merged=merged)
