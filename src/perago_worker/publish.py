"""Stage a change set on a hidden branch, commit it with provenance, and merge it once.

All writes go to the staging branch created from the input commit; the merge into the
target branch is the single atomic step that makes anything visible there. The merge goes
through the publish fence (see `fences`): the staged commit is claimed by an intent branch,
whoever finds an intent merges that commit, never a second one, and no merge is sent while
the target's history already holds one for the execution.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from perago_worker import fences
from perago_worker.changes import ChangeSet, FileSignature
from perago_worker.contract import FailureKind, TaskFailure
from perago_worker.execution import Execution, published
from perago_worker.lakefs import Conflict, LakeFS, NoChanges, NotFound, SourceChanged, is_transient
from perago_worker.paths import open_beneath, relative_to_key

MAX_RESULT_METADATA = 256 * 1024


@dataclass
class StageStats:
    files: int = 0
    bytes: int = 0
    deleted: int = 0
    seconds: float = 0.0


def stage(
    lakefs: LakeFS,
    repository: str,
    input_ref: str,
    branch: str,
    prefix: str,
    root: Path,
    changes: ChangeSet,
    *,
    scanned: Mapping[PurePosixPath, os.stat_result],
    concurrency: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> StageStats:
    """Upload the change set to a new hidden branch: exactly the files the scan saw.

    Each file is opened beneath the root's descriptor without following a link
    (`paths.open_beneath`) and must still be what `scanned` recorded (a regular file, same
    device, inode, size, mtime and ctime); after its upload it must still have them.
    Anything else means something (a thread or process the handler left behind) changed
    it after the scan: the attempt fails `unpublishable` naming the path, nothing merges.
    """
    started = time.monotonic()
    stats = StageStats()
    lakefs.create_branch(repository, branch, input_ref, hidden=True)
    transfers = lakefs.transfers
    failed = threading.Event()

    def changed(rel: PurePosixPath, how: str) -> TaskFailure:
        failed.set()
        return TaskFailure(
            FailureKind.UNPUBLISHABLE,
            f"{rel.as_posix()}: changed after the scan ({how}); nothing was published",
        )

    def put(rel_size: tuple[PurePosixPath, int]) -> None:
        # The first failure stops the rest: a file not yet begun would otherwise spend a
        # retry budget of its own against a server already known to be down.
        try:
            put_one(rel_size)
        except BaseException:
            failed.set()
            raise

    def put_one(rel_size: tuple[PurePosixPath, int]) -> None:
        rel, _size = rel_size
        if cancelled():
            raise TaskFailure(FailureKind.ABORTED, "cancelled while uploading")
        if failed.is_set():
            return
        seen = scanned[rel]
        try:
            fd = open_beneath(root_fd, rel)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise changed(rel, "it is gone") from None
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise changed(rel, "it or a folder above it is a link or not a folder") from None
            raise
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode):
                raise changed(rel, "it is no longer a regular file")
            if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
                raise changed(rel, "another file is in its place")
            # The change set's own signature (size, mtime, ctime, inode): a write that put
            # the mtime back still moves the ctime (nothing unprivileged can set one).
            signature = FileSignature.of(now)
            if signature != FileSignature.of(seen):
                raise changed(rel, "it was written to")
            try:
                transfers.upload(repository, branch, relative_to_key(rel, prefix), fd, seen.st_size)
            except SourceChanged:
                raise changed(rel, "it was cut short while it was uploaded") from None
            if FileSignature.of(os.fstat(fd)) != signature:
                raise changed(rel, "it was written to while it was uploaded")
        finally:
            os.close(fd)

    uploads = [(f.rel, f.size) for f in changes.uploads]
    # Largest first: a few big files start at once instead of finishing last, alone.
    uploads.sort(key=lambda item: -item[1])
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise
        raise TaskFailure(
            FailureKind.UNPUBLISHABLE,
            "the workspace root changed after the scan (it is gone or a link now); "
            "nothing was published",
        ) from None
    try:
        if uploads:
            # Unlike downloads, uploads of small objects wait on the server (measured: 2,000 x
            # 16 KiB took 15 s with 2 threads, 3.2 s with 8, 2 s with 16 to 64): use them all.
            workers = min(concurrency, len(uploads))
            with ThreadPoolExecutor(workers, thread_name_prefix="stage") as pool:
                list(pool.map(put, uploads))
    finally:
        os.close(root_fd)
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
) -> str | None:
    """Commit the staging branch; None when lakeFS finds nothing changed.

    "No changes" has two causes: a retried commit whose first request landed (the head then
    carries our execution key and is the answer), or uploads whose bytes equal what the
    input commit already held (nothing to publish, which is a success, not an error).
    """
    try:
        return lakefs.commit(repository, branch, message, metadata).id
    except NoChanges:
        head = lakefs.get_commit(repository, lakefs.branch_head(repository, branch))
        if head.metadata.get(fences.META_EXECUTION) == metadata.get(fences.META_EXECUTION):
            return head.id
        return None


def claim(lakefs: LakeFS, execution: Execution, staged_commit: str) -> str:
    """Create the intent branch at our staged commit; return the commit the intent holds.

    Branch creation is atomic: whoever creates it owns the publish. A 409 means an earlier
    or racing attempt of the same execution claimed first, and its commit is the one to
    merge (our own staged commit is dropped).
    """
    repository = execution.target.repository
    try:
        lakefs.create_branch(repository, execution.intent_branch, staged_commit, hidden=True)
    except Conflict:
        claimed = existing_intent(lakefs, execution)
        if claimed is None:  # claimed and freed (a terminal conflict) in between: ours now
            return claim(lakefs, execution, staged_commit)
        return claimed
    return staged_commit


def existing_intent(lakefs: LakeFS, execution: Execution) -> str | None:
    """The staged commit an earlier attempt claimed for this execution, if any."""
    try:
        return lakefs.branch_head(execution.target.repository, execution.intent_branch)
    except NotFound:
        return None


def release_intent(lakefs: LakeFS, execution: Execution) -> None:
    """Free the key after a publish that can never land, so a fixed rerun can run."""
    lakefs.delete_branch(execution.target.repository, execution.intent_branch)


class NotLive(Exception):
    """The attempt fence or cancellation stopped a merge before its request was sent."""


@dataclass
class MergeFigures:
    tries: int = 0
    fence_to_merge_ms: float = 0.0  # the window: fence answer received -> merge answered


def merge_once(
    lakefs: LakeFS,
    execution: Execution,
    staged_commit: str,
    message: str,
    metadata: dict[str, str],
    *,
    fence: Callable[[], bool],
    retry_seconds: float,
    figures: MergeFigures | None = None,
    unpublished: bool = False,
) -> tuple[str, bool]:
    """Merge `staged_commit` into the target once; return (merge commit, merged by us).

    Before every merge request (the first and each retry) the target's history since the
    execution began is searched for its merge, and then `fence` (cancellation and the
    attempt fence) must pass, immediately before the request. So a request whose answer
    was lost is never repeated once it landed, and a superseded attempt sends nothing after
    it learnt so. lakeFS has no compare-and-swap on merge: what remains is the window between
    the fence's answer and the merge landing (`figures.fence_to_merge_ms`).

    Merges are sent without `allow_empty`, so a second merge of a commit that already landed
    (a slow first request, a racing delivery inside the window) is refused by lakeFS as "no
    changes" rather than recorded twice. Only when lakeFS says "no changes", the history
    holds no merge of the execution and no request of ours has an unknown outcome is the
    merge sent again with `allow_empty`: the target already holds exactly this change (a
    recomputation), and the execution still gets a merge commit of its own, never an
    unrelated head. After a request with an unknown outcome that case fails retryably
    (`MergeOutcomeUnknown`): the retry finds the merge if it landed.

    `unpublished`: the caller knows the history cannot hold the execution's merge yet (a
    fresh execution, see `Execution.fresh`, whose intent branch the caller created itself:
    nothing merged it before its resolve, and any merge since would be a merge of this
    intent, made after its claim). The history read before the *first* request is then
    skipped; should a merge of the intent have landed anyway, lakeFS refuses the request as
    "no changes" and the history is read before anything else is sent, as above.
    """
    figures = figures if figures is not None else MergeFigures()
    target = execution.target
    meta = {**metadata, fences.META_EXECUTION: execution.key, fences.META_STAGED: staged_commit}
    deadline = time.monotonic() + retry_seconds
    delay = 0.2
    unknown_outcome = False
    allow_empty = False
    read_history = not unpublished
    while True:
        if read_history:
            found = published(lakefs, execution)
            if found is not None:
                return found.commit_id, False
        read_history = True
        if not fence():
            raise NotLive("the attempt fence failed immediately before the merge")
        fenced_at = time.monotonic()
        figures.tries += 1
        try:
            ref = lakefs.merge(
                target.repository,
                # The intent branch, not the commit id: a zombie whose intent was freed and
                # re-claimed at another commit merges what the claim holds now (already
                # merged: "no changes"), never a second commit of the same execution.
                execution.intent_branch,
                target.branch,
                message,
                meta,
                allow_empty=allow_empty,
                retry=False,
            )
        except NoChanges:
            if allow_empty:
                raise  # lakeFS refused even an empty merge: not a state to guess about
            if published(lakefs, execution) is None and unknown_outcome:
                raise MergeOutcomeUnknown(
                    "lakeFS answers 'no changes' after a merge request whose outcome is "
                    "unknown, and the target's history shows no merge of this execution yet"
                ) from None
            allow_empty = True  # the loop re-checks the history and the fence first
            continue
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            unknown_outcome = True
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(5.0, delay * 2)
            continue
        figures.fence_to_merge_ms = (time.monotonic() - fenced_at) * 1000
        return ref, True


class MergeOutcomeUnknown(Exception):
    """A merge whose landing cannot be told yet; retrying the attempt later settles it."""


def result_of(lakefs: LakeFS, repository: str, staged_commit: str) -> dict[str, Any]:
    """The handler result an execution's staged commit carries."""
    commit = lakefs.get_commit(repository, staged_commit)
    result: dict[str, Any] = json.loads(commit.metadata.get(fences.META_RESULT, "{}"))
    return result


def conflicting_paths(
    lakefs: LakeFS, repository: str, input_ref: str, target: str, ours: list[str], limit: int = 10
) -> list[str]:
    """Paths both this attempt and the target branch changed since the input ref."""
    theirs = set(lakefs.changed_paths(repository, input_ref, target, limit=10_000))
    return sorted(p for p in ours if p in theirs)[:limit]
