"""Specification of `perago_worker.fences`: attempt verdicts, publish keys, branch names."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from perago_worker.conductor import TaskState
from perago_worker.fences import (
    INTENT_PREFIX,
    META_KEY,
    META_STAGED,
    STAGING_PREFIX,
    attempt_verdict,
    find_merge_commit,
    intent_branch,
    parse_staging_branch,
    publish_key,
    staging_branch,
)

# lakeFS validates branch ids with Go's regexp, where \w is ASCII-only.
LAKEFS_BRANCH = re.compile(r"^\w[-\w]*$", re.ASCII)
hex_uid = st.text(alphabet="0123456789abcdef", min_size=8, max_size=8)
created = st.floats(min_value=0, max_value=2**40, allow_nan=False)


def _state(**overrides: Any) -> TaskState:
    values: dict[str, Any] = {
        "task_id": "t-1",
        "status": "IN_PROGRESS",
        "worker_id": "w-1",
        "poll_count": 2,
    }
    values.update(overrides)
    return TaskState(**values)


# --- attempt_verdict ---------------------------------------------------------------------


def test_attempt_verdict_gone_when_task_unknown() -> None:
    verdict = attempt_verdict(None, "w-1", 2)
    assert not verdict.live
    assert verdict.kind == "gone"


@pytest.mark.parametrize("status", ["COMPLETED", "FAILED", "TIMED_OUT", "CANCELED", "SCHEDULED"])
def test_attempt_verdict_not_in_progress(status: str) -> None:
    verdict = attempt_verdict(_state(status=status), "w-1", 2)
    assert not verdict.live
    assert verdict.kind == "not_in_progress"
    assert status in verdict.reason


def test_attempt_verdict_other_worker() -> None:
    verdict = attempt_verdict(_state(worker_id="w-2"), "w-1", 2)
    assert not verdict.live
    assert verdict.kind == "other_worker"
    assert "'w-2'" in verdict.reason


def test_attempt_verdict_redelivered_when_poll_count_changed() -> None:
    verdict = attempt_verdict(_state(poll_count=3), "w-1", 2)
    assert not verdict.live
    assert verdict.kind == "redelivered"
    assert "3 != 2" in verdict.reason


def test_attempt_verdict_live_when_everything_matches() -> None:
    verdict = attempt_verdict(_state(), "w-1", 2)
    assert verdict.live
    assert verdict.kind == ""


# --- publish_key -------------------------------------------------------------------------

BASE = ("wf-1", "render_ref", "render", "c0ffee", {"a": 1, "b": {"x": [1, 2], "y": "z"}})


def test_publish_key_is_sha256_hex() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", publish_key(*BASE))


def test_publish_key_stable_under_params_key_order() -> None:
    reordered = {"b": {"y": "z", "x": [1, 2]}, "a": 1}
    assert publish_key(*BASE[:4], reordered) == publish_key(*BASE)


@pytest.mark.parametrize(
    "changed",
    [
        ("wf-2", *BASE[1:]),
        (BASE[0], "other_ref", *BASE[2:]),
        (*BASE[:2], "other_type", *BASE[3:]),
        (*BASE[:3], "deadbeef", BASE[4]),
        (*BASE[:4], {"a": 2, "b": {"x": [1, 2], "y": "z"}}),
        (*BASE[:4], {"a": 1, "b": {"x": [2, 1], "y": "z"}}),
        (*BASE[:4], {"a": "1", "b": {"x": [1, 2], "y": "z"}}),
    ],
    ids=[
        "workflow",
        "reference_name",
        "task_type",
        "input_ref",
        "param_value",
        "list_order",
        "param_type",
    ],
)
def test_publish_key_differs_when_execution_differs(changed: tuple[Any, ...]) -> None:
    assert publish_key(*changed) != publish_key(*BASE)


def test_publish_key_accepts_non_json_params() -> None:
    key = publish_key(*BASE[:4], {"when": uuid.UUID(int=1)})
    assert key == publish_key(*BASE[:4], {"when": str(uuid.UUID(int=1))})


# --- branch names ------------------------------------------------------------------------


def test_intent_branch_is_prefixed_and_truncated() -> None:
    key = publish_key(*BASE)
    assert intent_branch(key) == INTENT_PREFIX + key[:48]


@given(st.text(), st.text(), st.text(), st.text())
def test_intent_branch_matches_lakefs_branch_regex(wf: str, ref: str, ttype: str, inp: str) -> None:
    assert LAKEFS_BRANCH.match(intent_branch(publish_key(wf, ref, ttype, inp, {})))


@given(task_id=st.text(alphabet=st.characters(max_codepoint=127)), uid=hex_uid, when=created)
def test_staging_branch_matches_lakefs_branch_regex_for_ascii_task_ids(
    task_id: str, uid: str, when: float
) -> None:
    assert LAKEFS_BRANCH.match(staging_branch(task_id, uid, when))


@given(task_id=st.text(), uid=hex_uid, when=created)
@example(task_id="tâche-1", uid="abcd1234", when=1_700_000_000.0)
def test_staging_branch_matches_lakefs_branch_regex_for_arbitrary_task_ids(
    task_id: str, uid: str, when: float
) -> None:
    assert LAKEFS_BRANCH.match(staging_branch(task_id, uid, when))


def test_staging_branch_layout() -> None:
    name = staging_branch("task/1 x", "abcd1234", 255.9)
    assert name == f"{STAGING_PREFIX}task-1-x-ff-abcd1234"


def test_staging_branch_truncates_long_task_ids() -> None:
    name = staging_branch("t" * 100, "abcd1234", 0)
    assert name == f"{STAGING_PREFIX}{'t' * 40}-0-abcd1234"


@given(task_id=st.uuids().map(str), uid=hex_uid, when=created)
def test_parse_staging_branch_round_trips_conductor_task_ids(
    task_id: str, uid: str, when: float
) -> None:
    assert parse_staging_branch(staging_branch(task_id, uid, when)) == (task_id, float(int(when)))


@pytest.mark.parametrize(
    "name", ["main", f"{INTENT_PREFIX}abc", f"{STAGING_PREFIX}task", f"{STAGING_PREFIX}t-zz-abc"]
)
def test_parse_staging_branch_ignores_other_names(name: str) -> None:
    assert parse_staging_branch(name) is None


# --- find_merge_commit -------------------------------------------------------------------


@dataclass
class Commit:
    id: str
    parents: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


KEY = "k" * 64
STAGED = "staged-commit"


def test_find_merge_commit_by_key_and_parent() -> None:
    log = [
        Commit("c3", ["c2"]),
        Commit("merge", ["c1", STAGED], {META_KEY: KEY}),
        Commit("c1", ["c0"]),
    ]
    assert find_merge_commit(log, KEY, STAGED) == "merge"


def test_find_merge_commit_by_key_and_staged_metadata() -> None:
    log = [Commit("merge", ["c1", "other"], {META_KEY: KEY, META_STAGED: STAGED})]
    assert find_merge_commit(log, KEY, STAGED) == "merge"


def test_find_merge_commit_ignores_other_keys() -> None:
    log = [Commit("merge", ["c1", STAGED], {META_KEY: "other-key"})]
    assert find_merge_commit(log, KEY, STAGED) is None


def test_find_merge_commit_ignores_same_key_for_other_staged_commit() -> None:
    log = [Commit("merge", ["c1", "another-staged"], {META_KEY: KEY})]
    assert find_merge_commit(log, KEY, STAGED) is None


def test_find_merge_commit_returns_newest_match() -> None:
    log = [
        Commit("newer", ["x", STAGED], {META_KEY: KEY}),
        Commit("older", ["y", STAGED], {META_KEY: KEY}),
    ]
    assert find_merge_commit(log, KEY, STAGED) == "newer"


def test_find_merge_commit_empty_log() -> None:
    assert find_merge_commit([], KEY, STAGED) is None
