"""Real lakeFS: `publish.commit_staged` turns lakeFS's "no changes" into the right outcome.

lakeFS answers a commit whose staged entries equal what the branch's head already holds
`400 commit: no changes` (seen on the S3 store, through the API and presigned uploads alike).
That has two causes, told apart by the head's execution key: the handler's uploads carried the
bytes the input commit already had (a success with nothing to publish: None, and the task's
output ref is its input ref), or a retried commit whose first request landed (the head is
ours, and is the answer). Any other head is not ours and must never be returned.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from perago_testing import read, seed, suffix
from perago_worker import fences
from perago_worker.lakefs import LakeFS, NoChanges, Transfers
from perago_worker.publish import commit_staged

KEY = "data/same.txt"
CONTENT = b"the committed bytes\n"


def staging_at(lakefs: LakeFS, repo: str, tmp_path: Path) -> tuple[str, str]:
    """(a fresh hidden staging branch, the commit it starts at, which holds KEY = CONTENT)."""
    source = f"src-{suffix()}"
    lakefs.create_branch(repo, source, "main", hidden=False)
    ref = seed(lakefs, repo, {KEY: CONTENT + suffix().encode()}, tmp_path, branch=source)
    staging = f"staging-{suffix()}"
    lakefs.create_branch(repo, staging, ref, hidden=True)
    return staging, ref


def upload(transfers: Transfers, repo: str, branch: str, key: str, data: bytes, tmp: Path) -> None:
    """Stage `data` at `key` the way the publisher does (`publish.stage`: `transfers.upload`)."""
    path = tmp / f"upload-{suffix()}"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        transfers.upload(repo, branch, key, fd, len(data))
    finally:
        os.close(fd)


def metadata(execution: str) -> dict[str, str]:
    return {fences.META_EXECUTION: execution, fences.META_RESULT: "{}"}


def test_lakefs_answers_no_changes_to_a_commit_of_the_bytes_the_head_already_holds(
    lakefs: LakeFS, transfers: Transfers, repo: str, tmp_path: Path
) -> None:
    staging, ref = staging_at(lakefs, repo, tmp_path)
    upload(transfers, repo, staging, KEY, read(lakefs, repo, ref, KEY, tmp_path), tmp_path)

    with pytest.raises(NoChanges):
        lakefs.commit(repo, staging, "identical bytes", metadata(f"exec-{suffix()}"))


def test_staging_the_committed_bytes_again_commits_to_no_change_and_leaves_the_input_ref(
    lakefs: LakeFS, transfers: Transfers, repo: str, tmp_path: Path
) -> None:
    staging, ref = staging_at(lakefs, repo, tmp_path)
    upload(transfers, repo, staging, KEY, read(lakefs, repo, ref, KEY, tmp_path), tmp_path)

    staged = commit_staged(lakefs, repo, staging, "identical bytes", metadata(f"exec-{suffix()}"))

    assert staged is None  # no change: the attempt's output ref is then its input ref
    assert lakefs.branch_head(repo, staging) == ref


def test_a_commit_retried_after_its_first_request_landed_returns_that_commit(
    lakefs: LakeFS, transfers: Transfers, repo: str, tmp_path: Path
) -> None:
    staging, ref = staging_at(lakefs, repo, tmp_path)
    upload(transfers, repo, staging, KEY, b"new bytes\n", tmp_path)
    ours = metadata(f"exec-{suffix()}")
    first = commit_staged(lakefs, repo, staging, "changed", ours)
    assert first is not None and first != ref

    again = commit_staged(lakefs, repo, staging, "changed", ours)

    assert again == first
    assert lakefs.branch_head(repo, staging) == first


def test_no_changes_under_a_head_another_execution_committed_is_no_change_not_that_commit(
    lakefs: LakeFS, transfers: Transfers, repo: str, tmp_path: Path
) -> None:
    staging, _ref = staging_at(lakefs, repo, tmp_path)
    upload(transfers, repo, staging, KEY, b"theirs\n", tmp_path)
    theirs = commit_staged(lakefs, repo, staging, "theirs", metadata(f"exec-{suffix()}"))
    assert theirs is not None

    staged = commit_staged(lakefs, repo, staging, "ours", metadata(f"exec-{suffix()}"))

    assert staged is None
    assert lakefs.branch_head(repo, staging) == theirs
