"""Specification of `perago_worker.contract`: task input/output shapes and failure statuses."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perago_worker.contract import (
    CONDUCTOR_INJECTED_KEYS,
    MAX_REASON,
    FailureKind,
    Status,
    TaskFailure,
    TaskOutput,
    WorkspaceRef,
    bound_reason,
    parse_input,
    status_for,
)

COMMIT = "a" * 64


def _workspace(**overrides: Any) -> dict[str, Any]:
    ws = {"repository": "audio-lake", "branch": "main", "ref_type": "commit", "ref": COMMIT}
    ws.update(overrides)
    return ws


def _invalid(raw: dict[str, Any], *, wants_workspace: bool = True) -> TaskFailure:
    with pytest.raises(TaskFailure) as info:
        parse_input(raw, wants_workspace=wants_workspace)
    assert info.value.kind is FailureKind.INVALID_INPUT
    return info.value


# --- parse_input -------------------------------------------------------------------------


def test_parse_input_accepts_workspace_task_input() -> None:
    parsed = parse_input({"workspace": _workspace(), "params": {"n": 1}}, wants_workspace=True)
    assert parsed.workspace == WorkspaceRef(**_workspace())
    assert parsed.params == {"n": 1}


def test_parse_input_defaults_params_to_empty() -> None:
    parsed = parse_input({"workspace": _workspace()}, wants_workspace=True)
    assert parsed.params == {}


def test_parse_input_accepts_workspace_free_input() -> None:
    parsed = parse_input({"params": {"x": "y"}}, wants_workspace=False)
    assert parsed.workspace is None


def test_parse_input_rejects_unknown_top_level_key_naming_it() -> None:
    failure = _invalid({"workspace": _workspace(), "prefix": "/audio"})
    assert "prefix:" in failure.reason
    assert "Extra inputs are not permitted" in failure.reason


def test_conductor_injected_keys_are_exactly_the_ones_conductor_injects() -> None:
    # ForkJoinDynamicTaskMapper (forkTaskName/forkTaskInputs) is the only injector in 3.32.
    assert frozenset({"__index"}) == CONDUCTOR_INJECTED_KEYS


@pytest.mark.parametrize("wants_workspace", [True, False])
def test_parse_input_accepts_and_drops_the_dynamic_fork_index(wants_workspace: bool) -> None:
    raw: dict[str, Any] = {"params": {"n": 1}, "__index": 3}
    if wants_workspace:
        raw["workspace"] = _workspace()
    parsed = parse_input(raw, wants_workspace=wants_workspace)
    assert parsed.params == {"n": 1}
    assert "__index" not in parsed.model_dump()
    assert raw["__index"] == 3, "the caller's input is not mutated"


def test_parse_input_with_only_the_fork_index_has_empty_params() -> None:
    parsed = parse_input({"__index": 0}, wants_workspace=False)
    assert parsed.params == {}


def test_parse_input_still_rejects_an_unknown_user_key_next_to_the_fork_index() -> None:
    failure = _invalid({"workspace": _workspace(), "__index": 0, "foo": 1})
    assert "foo:" in failure.reason
    assert "Extra inputs are not permitted" in failure.reason
    assert "__index" not in failure.reason


@pytest.mark.parametrize("key", ["foo", "__other", "_index", "__index__", "__INDEX"])
def test_parse_input_rejects_keys_conductor_does_not_inject(key: str) -> None:
    failure = _invalid({"workspace": _workspace(), key: 1})
    assert f"{key}:" in failure.reason
    assert "Extra inputs are not permitted" in failure.reason


def test_parse_input_rejects_unknown_workspace_key_naming_it() -> None:
    failure = _invalid({"workspace": _workspace(staging_branch="x")})
    assert "workspace.staging_branch:" in failure.reason


def test_parse_input_rejects_ref_type_other_than_commit() -> None:
    failure = _invalid({"workspace": _workspace(ref_type="branch")})
    assert "workspace.ref_type:" in failure.reason
    assert "'commit'" in failure.reason


@pytest.mark.parametrize("repository", ["ab", "Audio", "-lake", "audio_lake", "a" * 64, ""])
def test_parse_input_rejects_repository_outside_pattern(repository: str) -> None:
    failure = _invalid({"workspace": _workspace(repository=repository)})
    assert "workspace.repository:" in failure.reason


@pytest.mark.parametrize("repository", ["abc", "audio-lake", "0data", "a" * 63])
def test_parse_input_accepts_repository_inside_pattern(repository: str) -> None:
    parsed = parse_input({"workspace": _workspace(repository=repository)}, wants_workspace=True)
    assert parsed.workspace is not None
    assert parsed.workspace.repository == repository


@pytest.mark.parametrize("branch", ["-main", "feature/x", "has space", "", "a.b", "b" * 257])
def test_parse_input_rejects_branch_outside_pattern(branch: str) -> None:
    failure = _invalid({"workspace": _workspace(branch=branch)})
    assert "workspace.branch:" in failure.reason


@pytest.mark.parametrize("branch", ["main", "feature-x", "_tmp", "release_2024-01"])
def test_parse_input_accepts_branch_inside_pattern(branch: str) -> None:
    parsed = parse_input({"workspace": _workspace(branch=branch)}, wants_workspace=True)
    assert parsed.workspace is not None
    assert parsed.workspace.branch == branch


@pytest.mark.parametrize("branch", ["brañch", "ветка", "main\u0663"])
def test_parse_input_rejects_non_ascii_branch_that_lakefs_refuses(branch: str) -> None:
    _invalid({"workspace": _workspace(branch=branch)})


@pytest.mark.parametrize("ref", ["", "r" * 257])
def test_parse_input_rejects_ref_outside_length_bounds(ref: str) -> None:
    failure = _invalid({"workspace": _workspace(ref=ref)})
    assert "workspace.ref:" in failure.reason


def test_parse_input_rejects_missing_workspace_field() -> None:
    ws = _workspace()
    del ws["ref"]
    failure = _invalid({"workspace": ws})
    assert "workspace.ref:" in failure.reason


def test_parse_input_rejects_workspace_for_workspace_free_task() -> None:
    failure = _invalid({"workspace": _workspace()}, wants_workspace=False)
    assert "workspace-free" in failure.reason


def test_parse_input_rejects_workspace_task_without_workspace() -> None:
    failure = _invalid({"params": {}}, wants_workspace=True)
    assert "workspace: required" in failure.reason


def test_parse_input_rejects_non_object_params() -> None:
    failure = _invalid({"workspace": _workspace(), "params": [1, 2]})
    assert "params:" in failure.reason


def test_parse_input_failure_is_terminal() -> None:
    failure = _invalid({"bogus": 1})
    assert failure.status is Status.FAILED_WITH_TERMINAL_ERROR


# --- status_for --------------------------------------------------------------------------

TERMINAL = [
    FailureKind.INVALID_INPUT,
    FailureKind.FORBIDDEN_REPOSITORY,
    FailureKind.UNKNOWN_REF,
    FailureKind.BAD_PARAMS,
    FailureKind.UNSAFE_KEY,
    FailureKind.PRE_CHECK,
    FailureKind.HANDLER_TERMINAL,
    FailureKind.INVALID_RESULT,
    FailureKind.UNPUBLISHABLE,
    FailureKind.MERGE_CONFLICT,
    FailureKind.MERGE_REJECTED,
]
RETRYABLE = [
    FailureKind.HANDLER_ERROR,
    FailureKind.POST_CHECK,
    FailureKind.INFRASTRUCTURE,
    FailureKind.DISK_FULL,
    FailureKind.ABORTED,
    FailureKind.TIMED_OUT,
]


@pytest.mark.parametrize("kind", TERMINAL)
def test_status_for_terminal_kinds(kind: FailureKind) -> None:
    assert status_for(kind) is Status.FAILED_WITH_TERMINAL_ERROR


@pytest.mark.parametrize("kind", RETRYABLE)
def test_status_for_retryable_kinds(kind: FailureKind) -> None:
    assert status_for(kind) is Status.FAILED


def test_status_for_covers_every_failure_kind() -> None:
    assert set(TERMINAL) | set(RETRYABLE) == set(FailureKind)
    for kind in FailureKind:
        assert status_for(kind) in (Status.FAILED, Status.FAILED_WITH_TERMINAL_ERROR)


def test_task_failure_status_follows_kind() -> None:
    assert TaskFailure(FailureKind.POST_CHECK, "x").status is Status.FAILED
    assert TaskFailure(FailureKind.PRE_CHECK, "x").status is Status.FAILED_WITH_TERMINAL_ERROR


# --- TaskFailure.reason ------------------------------------------------------------------


def test_task_failure_reason_is_prefixed_by_kind() -> None:
    failure = TaskFailure(FailureKind.PRE_CHECK, "require_file('a'): a is missing")
    assert failure.reason == "pre_check: require_file('a'): a is missing"


def test_task_failure_reason_is_bounded() -> None:
    failure = TaskFailure(FailureKind.HANDLER_ERROR, "x" * 5000)
    assert len(failure.reason) == MAX_REASON
    assert failure.reason.startswith("handler_error: x")
    assert failure.reason.endswith("x")
    assert failure.reason.count("…") == 1


def test_task_failure_reason_collapses_whitespace() -> None:
    failure = TaskFailure(FailureKind.HANDLER_ERROR, "Traceback:\n  line 1\n\tline 2")
    assert failure.reason == "handler_error: Traceback: line 1 line 2"


def test_bound_reason_keeps_short_text() -> None:
    assert bound_reason("short") == "short"


def test_bound_reason_at_exact_limit_is_untouched() -> None:
    text = "y" * MAX_REASON
    assert bound_reason(text) == text


def test_bound_reason_keeps_the_kind_and_the_cause_of_a_1024_byte_key() -> None:
    key = "deep/" + "k" * 1019
    reason = bound_reason(
        f"unsafe_key: object key {key!r} has a segment longer than 255 bytes; it cannot be "
        "materialized safely (repository 'lake' at 0123456789ab)"
    )
    assert len(reason) == MAX_REASON
    assert reason.startswith("unsafe_key: object key 'deep/kkk")
    assert reason.endswith(
        "kkk' has a segment longer than 255 bytes; it cannot be materialized safely "
        "(repository 'lake' at 0123456789ab)"
    )


def test_bound_reason_cuts_the_middle_of_the_longest_values_first() -> None:
    first, second = "/a/" + "1" * 800 + "/one.txt", "/b/" + "2" * 800 + "/two.txt"
    reason = bound_reason(f"post_check: missing {first} and {second} (both required)")
    words = reason.split(" ")
    assert words[:2] == ["post_check:", "missing"]
    assert words[3] == "and" and words[5:] == ["(both", "required)"]
    for word, original in ((words[2], first), (words[4], second)):
        head, tail = word.split("…")
        assert original.startswith(head) and original.endswith(tail)
        assert head.startswith("/a/1" if original is first else "/b/2")
    assert abs(len(words[2]) - len(words[4])) <= 1, "both shortened to the same length"


def test_bound_reason_of_many_short_words_keeps_its_first_and_last_half() -> None:
    text = "post_check: " + "; ".join(f"file{i}.txt missing" for i in range(500))
    reason = bound_reason(text)
    assert len(reason) == MAX_REASON
    head, tail = reason.split("…")
    assert text.startswith(head) and text.endswith(tail)
    assert abs(len(head) - len(tail)) <= 1


@given(st.text(), st.integers(min_value=1, max_value=2000))
def test_bound_reason_fits_any_text_in_the_limit_on_one_line(text: str, limit: int) -> None:
    reason = bound_reason(text, limit)
    assert len(reason.encode("utf-16-le")) // 2 <= limit
    assert reason == " ".join(reason.split())


def test_bound_reason_counts_as_conductor_does_a_character_outside_the_bmp_is_two() -> None:
    reason = bound_reason("handler_error: " + "\U0001f600" * 400)
    assert len(reason.encode("utf-16-le")) // 2 <= MAX_REASON
    assert len(reason) < MAX_REASON


def test_max_reason_is_what_conductor_keeps_of_a_reason() -> None:
    assert MAX_REASON == 500  # TaskResult.setReasonForIncompletion keeps 500 UTF-16 units


@given(st.text())
def test_bound_reason_is_idempotent(text: str) -> None:
    assert bound_reason(bound_reason(text)) == bound_reason(text)


@given(
    st.sampled_from(list(FailureKind)),
    st.lists(st.text(alphabet="abc/._", min_size=1, max_size=3000), min_size=1, max_size=6),
)
def test_bound_reason_always_keeps_the_kind_prefix(kind: FailureKind, values: list[str]) -> None:
    reason = TaskFailure(kind, " ".join(values)).reason
    assert reason.startswith(f"{kind.value}: ")
    assert len(reason) <= MAX_REASON


# --- TaskOutput --------------------------------------------------------------------------


def test_to_conductor_omits_workspace_when_none() -> None:
    assert TaskOutput(result={"rows": 3}).to_conductor() == {"result": {"rows": 3}}


def test_to_conductor_includes_workspace_in_next_input_shape() -> None:
    out = TaskOutput(workspace=WorkspaceRef(**_workspace()), result={}).to_conductor()
    assert out["workspace"] == _workspace()
    parsed = parse_input({"workspace": out["workspace"]}, wants_workspace=True)
    assert parsed.workspace == WorkspaceRef(**_workspace())


def test_to_conductor_keeps_none_values_inside_result() -> None:
    out = TaskOutput(result={"note": None, "nested": {"x": None}}).to_conductor()
    assert out["result"] == {"note": None, "nested": {"x": None}}


def test_workspace_ref_is_frozen() -> None:
    ref = WorkspaceRef(**_workspace())
    with pytest.raises(ValueError, match=re.escape("frozen")):
        ref.branch = "other"  # type: ignore[misc]


def test_a_workspace_task_without_a_workspace_says_how_to_give_it_one() -> None:
    with pytest.raises(TaskFailure) as caught:
        parse_input({"params": {}}, wants_workspace=True)
    reason = caught.value.reason
    assert reason.startswith("invalid_input: workspace: required for a workspace task; ")
    assert '"${workflow.input.workspace}"' in reason and "perago-worker start" in reason
