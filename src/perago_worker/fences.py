"""The attempt fence and the publish fence.

Attempt fence: just before merging (and again before reporting), Conductor must still show
this task id IN_PROGRESS, held by this worker id, with the poll count this attempt saw. A
task that timed out, was cancelled, or was polled again (re-delivered) belongs to someone
else now; the zombie publishes and reports nothing.

Publish fence: at most one merge per logical task execution. The key is

    sha256(workflow id, task reference name, task type, input ref, canonical params)

Conductor gives a retry a new task id but the same reference name, so every attempt of one
logical execution shares the key; a different input ref or different params is a different
execution. lakeFS has no compare-and-swap on merge, but branch creation is atomic, so the
claim is a hidden *intent branch* named from the key and created at the staged commit just
before the merge. Whoever creates it owns the publish; anyone else (a racing attempt, a retry
after a crash between merge and report, a re-delivery) adopts it: it merges the intent's
commit (a second merge of the same commit is a no-op lakeFS answers "no changes") and
returns the merge commit it finds on the target branch together with the result stored in
the staged commit's metadata. A workflow rerun or restart keeps its workflow id and
reference names, so with the same input ref and params it adopts the earlier publish
instead of merging again; change the input or the params to publish anew.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from perago_worker.conductor import TaskState

INTENT_PREFIX = "perago-intent-"
STAGING_PREFIX = "perago-stage-"
META_KEY = "perago.publish_key"
META_STAGED = "perago.staged_commit"
META_RESULT = "perago.result"


@dataclass(frozen=True)
class Verdict:
    live: bool
    kind: str = ""
    reason: str = ""


def attempt_verdict(state: TaskState | None, worker_id: str, poll_count: int) -> Verdict:
    """Pure: may an attempt that polled the task with `poll_count` still act on it?"""
    if state is None:
        return Verdict(False, "gone", "Conductor no longer knows the task")
    if state.status != "IN_PROGRESS":
        return Verdict(False, "not_in_progress", f"task is {state.status}")
    if state.worker_id != worker_id:
        return Verdict(False, "other_worker", f"task is held by worker {state.worker_id!r}")
    if state.poll_count != poll_count:
        return Verdict(
            False,
            "redelivered",
            f"task was polled again (poll count {state.poll_count} != {poll_count})",
        )
    return Verdict(True)


def publish_key(
    workflow_id: str, reference_name: str, task_type: str, input_ref: str, params: dict[str, Any]
) -> str:
    # JSON-encoding the whole tuple keeps field boundaries unambiguous whatever they contain.
    material = json.dumps(
        [workflow_id, reference_name, task_type, input_ref, params],
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def intent_branch(key: str) -> str:
    return f"{INTENT_PREFIX}{key[:48]}"


def staging_branch(task_id: str, attempt_uid: str, created: float) -> str:
    """`perago-stage-<task id>-<created, hex seconds>-<uid>`: gc reads owner and age off it."""
    # lakeFS checks names with Go's ASCII-only \w: keep ASCII letters and digits only.
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in task_id)[:40]
    return f"{STAGING_PREFIX}{safe}-{int(created):x}-{attempt_uid}"


_STAGING = re.compile(
    rf"^{STAGING_PREFIX}(?P<task>[-\w]+)-(?P<created>[0-9a-f]+)-(?P<uid>[0-9a-f]+)$", re.ASCII
)


def parse_staging_branch(name: str) -> tuple[str, float] | None:
    """Pure: (task id, created unix time) of a staging branch name, or None."""
    match = _STAGING.match(name)
    if match is None:
        return None
    return match.group("task"), float(int(match.group("created"), 16))


def find_merge_commit(log: list[Any], key: str, staged_commit: str) -> str | None:
    """Pure: the merge commit on the target that landed `staged_commit` for `key`, if any."""
    for commit in log:
        if commit.metadata.get(META_KEY) == key and (
            staged_commit in commit.parents or commit.metadata.get(META_STAGED) == staged_commit
        ):
            return str(commit.id)
    return None
