"""Specification of `perago_worker.fences`: tokens, verdicts, execution identity, names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from perago_worker.conductor import TaskState
from perago_worker.fences import (
    INTENT_PREFIX,
    META_EXECUTION,
    META_ROOT_RETRY,
    META_ROOT_TASK,
    META_SLOT,
    META_STAGED,
    STAGING_PREFIX,
    TOKEN_SEPARATOR,
    Incarnation,
    LedgerEntry,
    LineageError,
    PublishRecord,
    Target,
    attempt_verdict,
    deciding_scheduling,
    delivery_token,
    execution_key,
    find_publish,
    history_ends,
    intent_branch,
    later_scheduling,
    link_execution,
    parse_staging_branch,
    root_of,
    same_scheduling,
    slot_key,
    staging_branch,
    starts_execution,
)

# lakeFS validates branch ids with Go's regexp, where \w is ASCII-only.
LAKEFS_BRANCH = re.compile(r"^\w[-\w]*$", re.ASCII)
hex_uid = st.text(alphabet="0123456789abcdef", min_size=8, max_size=8)
created = st.floats(min_value=0, max_value=2**40, allow_nan=False)
TOKEN = "w-1#aaaaaaaaaaaa"


def _state(**overrides: Any) -> TaskState:
    values: dict[str, Any] = {
        "task_id": "t-1",
        "status": "IN_PROGRESS",
        "worker_id": TOKEN,
        "poll_count": 2,
    }
    values.update(overrides)
    return TaskState(**values)


TARGET = Target("repo", "main", "data/")
SLOT = slot_key("wf-1", "ingest", "ingest", TARGET)
ROOT = Incarnation("t-1", 0, 1_000, 1_500)


# --- delivery tokens and attempt_verdict -------------------------------------------------


def test_delivery_tokens_are_unique_per_poll_and_name_the_worker() -> None:
    tokens = {delivery_token("w-1") for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(t.startswith("w-1" + TOKEN_SEPARATOR) for t in tokens)


def test_attempt_verdict_gone_when_task_unknown() -> None:
    verdict = attempt_verdict(None, TOKEN, 2)
    assert (verdict.live, verdict.kind) == (False, "gone")


@pytest.mark.parametrize("status", ["SCHEDULED", "COMPLETED", "FAILED", "TIMED_OUT", "CANCELED"])
def test_attempt_verdict_not_in_progress(status: str) -> None:
    verdict = attempt_verdict(_state(status=status), TOKEN, 2)
    assert (verdict.live, verdict.kind) == (False, "not_in_progress")
    assert status in verdict.reason


def test_attempt_verdict_superseded_when_another_token_holds_the_task() -> None:
    verdict = attempt_verdict(_state(worker_id="w-1#bbbbbbbbbbbb"), TOKEN, 2)
    assert (verdict.live, verdict.kind) == (False, "superseded")


def test_attempt_verdict_superseded_even_with_a_reset_poll_count() -> None:
    """Rerun-from-task resets pollCount on the same task id: the token still differs."""
    later = delivery_token("w-1")
    verdict = attempt_verdict(_state(worker_id=later, poll_count=2), TOKEN, 2)
    assert not verdict.live


def test_attempt_verdict_redelivered_when_poll_count_changed() -> None:
    verdict = attempt_verdict(_state(poll_count=3), TOKEN, 2)
    assert (verdict.live, verdict.kind) == (False, "redelivered")


def test_attempt_verdict_live_when_everything_matches() -> None:
    verdict = attempt_verdict(_state(), TOKEN, 2)
    assert verdict.live and verdict.kind == ""


# --- execution identity --------------------------------------------------------------------


def test_a_retry_chain_resolves_to_its_root() -> None:
    retry = Incarnation("t-2", 1, 2_000, 2_100, retried_task_id="t-1")
    again = Incarnation("t-3", 2, 3_000, 3_100, retried_task_id="t-2")
    assert root_of([again, retry, ROOT]) == ROOT


def test_a_first_attempt_is_its_own_root() -> None:
    assert root_of([ROOT]) == ROOT


@pytest.mark.parametrize(
    "chain",
    [
        [],
        [Incarnation("t-2", 1, 0, 0, retried_task_id="t-1")],
        [Incarnation("t-2", 1, 0, 0, retried_task_id="t-1"), Incarnation("t-9", 0, 0, 0)],
        [
            Incarnation("t-1", 1, 0, 0, retried_task_id="t-2"),
            Incarnation("t-2", 1, 0, 0, retried_task_id="t-1"),
            Incarnation("t-1", 0, 0, 0),
        ],
    ],
    ids=["empty", "stops-early", "broken-link", "loop"],
)
def test_a_chain_that_is_not_a_chain_is_refused(chain: list[Incarnation]) -> None:
    with pytest.raises(LineageError):
        root_of(chain)


def test_the_execution_key_ignores_everything_a_retry_recomputes() -> None:
    """Input params, task id of the retry, poll count: none of them is in the key."""
    assert execution_key(SLOT, ROOT) == execution_key(SLOT, replace(ROOT))


@pytest.mark.parametrize(
    "rerun",
    [
        replace(ROOT, scheduled_time=9_000, start_time=0),
        replace(ROOT, scheduled_time=9_000, start_time=9_100),
        replace(ROOT, start_time=9_100),
        Incarnation("t-new", 0, 9_000, 9_100),
    ],
    ids=["rerun-from-task", "rerun-polled", "rerun-sibling-reset", "restart"],
)
def test_a_rerun_or_restart_is_a_new_execution(rerun: Incarnation) -> None:
    assert execution_key(SLOT, rerun) != execution_key(SLOT, ROOT)


@pytest.mark.parametrize(
    "other",
    [
        Target("other-repo", "main", "data/"),
        Target("repo", "other", "data/"),
        Target("repo", "main", "other/"),
    ],
)
def test_two_targets_never_share_an_execution(other: Target) -> None:
    assert execution_key(slot_key("wf-1", "ingest", "ingest", other), ROOT) != execution_key(
        SLOT, ROOT
    )


@given(st.text(), st.text(), st.text(), st.text(), st.text(), st.text())
def test_slot_fields_never_bleed_into_each_other(
    a: str, b: str, c: str, d: str, e: str, f: str
) -> None:
    one = slot_key(a, b, c, Target(d, e, f))
    shifted = slot_key(a + b, "", c, Target(d, e, f))
    assert one != shifted or b == ""


def _record(commit: str, execution: str, *, task: str = "t-1", retry: int = 0) -> PublishRecord:
    return PublishRecord(commit, execution, SLOT, task, retry, "staged-" + commit)


# --- the ledger's decisions ----------------------------------------------------------------

ENTRY = LedgerEntry(ROOT, "exec-1", ROOT)


def test_a_redelivery_of_a_known_scheduling_continues_its_execution() -> None:
    assert link_execution(SLOT, replace(ROOT), ENTRY) == ("exec-1", ROOT)


def test_a_task_revived_with_a_bumped_retry_count_continues_its_execution() -> None:
    revived = replace(ROOT, retry_count=1, scheduled_time=5_000, start_time=5_100)
    assert link_execution(SLOT, revived, ENTRY) == ("exec-1", ROOT)


@pytest.mark.parametrize(
    "reset",
    [
        replace(ROOT, scheduled_time=9_000, start_time=9_100),
        replace(ROOT, start_time=9_100),
        replace(ROOT, scheduled_time=9_000, start_time=9_100, retried_task_id="t-0"),
    ],
    ids=["rerun-from-task", "rerun-sibling-reset", "rerun-of-a-retry-keeps-retriedTaskId"],
)
def test_a_reset_without_a_retry_starts_a_new_execution_at_that_link(reset: Incarnation) -> None:
    key, root = link_execution(SLOT, reset, ENTRY) or ("", ROOT)
    assert root == reset
    assert key == execution_key(SLOT, reset) != "exec-1"


def test_an_unknown_link_that_retries_another_defers_to_it() -> None:
    retry = Incarnation("t-2", 1, 0, 2_100, retried_task_id="t-1")
    assert link_execution(SLOT, retry, None) is None


def test_an_unknown_link_that_retries_nothing_is_a_new_root() -> None:
    assert link_execution(SLOT, ROOT, None) == (execution_key(SLOT, ROOT), ROOT)


def test_a_reset_of_a_known_scheduling_is_proven_fresh_a_continued_one_is_not() -> None:
    rerun = replace(ROOT, scheduled_time=9_000, start_time=9_100)
    assert starts_execution(rerun, ENTRY, own_link=True)
    assert starts_execution(rerun, ENTRY, own_link=False)
    assert not starts_execution(replace(ROOT), ENTRY, own_link=True)
    assert not starts_execution(
        replace(ROOT, retry_count=1, start_time=5_100), ENTRY, own_link=True
    )


def test_an_unknown_first_scheduling_of_the_attempt_itself_is_proven_fresh() -> None:
    assert starts_execution(ROOT, None, own_link=True)


def test_an_unknown_root_of_a_retry_chain_is_not_proven_fresh() -> None:
    # The chain's earlier tasks had attempts whose ledger entries are missing (never written,
    # or removed): their merge may be in the history, which must be read.
    assert not starts_execution(ROOT, None, own_link=False)


def test_an_unknown_revival_is_not_proven_fresh() -> None:
    # A retryCount above 0 on the attempt's own task id: an earlier scheduling ran.
    assert not starts_execution(replace(ROOT, retry_count=1), None, own_link=True)


@pytest.mark.parametrize(
    "later",
    [
        replace(ROOT, retry_count=1, scheduled_time=0),
        replace(ROOT, scheduled_time=9_000, start_time=0),
        replace(ROOT, start_time=9_100),
    ],
    ids=["revival", "rerun", "rerun-sibling-reset"],
)
def test_every_reset_conductor_makes_is_a_later_scheduling(later: Incarnation) -> None:
    assert later_scheduling(later, ROOT)
    assert not later_scheduling(ROOT, later)


def test_schedulings_of_other_tasks_are_never_later() -> None:
    assert not later_scheduling(Incarnation("t-9", 5, 9_999, 9_999), ROOT)
    assert not later_scheduling(replace(ROOT), ROOT)


def test_same_scheduling_ignores_the_retried_task_link_only() -> None:
    assert same_scheduling(ROOT, replace(ROOT, retried_task_id="x"))
    assert not same_scheduling(ROOT, replace(ROOT, start_time=1))


def test_a_ledger_entry_round_trips_through_json() -> None:
    entry = LedgerEntry(replace(ROOT, retried_task_id="t-0"), "exec-1", ROOT)
    assert LedgerEntry.from_json(entry.to_json()) == entry


# --- publish records and the history walk ------------------------------------------------


def test_a_merge_commit_parses_into_a_record() -> None:
    record = PublishRecord.parse(
        "m1",
        {
            META_EXECUTION: "e",
            META_STAGED: "s",
            META_SLOT: SLOT,
            META_ROOT_TASK: "t-1",
            META_ROOT_RETRY: "2",
        },
    )
    assert record == PublishRecord("m1", "e", SLOT, "t-1", 2, "s")


@pytest.mark.parametrize(
    "metadata",
    [{}, {META_EXECUTION: "e"}, {META_STAGED: "s"}, {"perago.workflow_id": "wf"}],
    ids=["plain", "staged-commit", "foreign", "provenance-only"],
)
def test_commits_that_are_not_our_merges_parse_to_nothing(metadata: dict[str, str]) -> None:
    assert PublishRecord.parse("c", metadata) is None


def test_find_publish_returns_the_newest_merge_of_the_execution() -> None:
    records = [_record("m3", "other"), _record("m2", "mine"), _record("m1", "mine")]
    found = find_publish(records, "mine")
    assert found is not None and found.commit_id == "m2"
    assert find_publish(records, "absent") is None


@dataclass
class Dated:
    id: str
    creation_date: int
    metadata: dict[str, str] = field(default_factory=dict)


def test_the_history_walk_does_not_end_at_the_input_commit() -> None:
    """A retry's recomputed input may be the execution's own merge: the walk must look past it."""
    assert not history_ends(Dated("input", 10_000), not_before=100)


def test_the_history_walk_ends_before_the_execution_began() -> None:
    assert history_ends(Dated("c", 99), not_before=100)
    assert not history_ends(Dated("c", 100), not_before=100)


# --- branch names ------------------------------------------------------------------------


def test_intent_branch_is_prefixed_and_truncated() -> None:
    key = execution_key(SLOT, ROOT)
    assert intent_branch(key) == INTENT_PREFIX + key[:48]


@given(st.text(), st.text(), st.text(), st.text())
def test_intent_branch_matches_lakefs_branch_regex(wf: str, ref: str, ttype: str, br: str) -> None:
    slot = slot_key(wf, ref, ttype, Target("repo", br, ""))
    assert LAKEFS_BRANCH.match(intent_branch(execution_key(slot, ROOT)))


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


def test_a_links_own_scheduling_decides_it_else_the_latest_earlier_one() -> None:
    rerun = replace(ROOT, scheduled_time=9_000, start_time=9_100)
    revival = replace(ROOT, retry_count=1, scheduled_time=5_000, start_time=5_100)
    assert deciding_scheduling(ROOT, [rerun, ROOT]) == ROOT
    assert deciding_scheduling(replace(revival, start_time=6_000), [ROOT, revival]) == revival
    assert deciding_scheduling(ROOT, [rerun, revival]) is None  # later ones never decide
    assert deciding_scheduling(ROOT, []) is None


# -- manual executions (`exec --publish`) ----------------------------------------------------


@given(st.floats(min_value=1e9, max_value=9.9e9), st.from_regex(r"[0-9a-f]{8}", fullmatch=True))
def test_a_manual_execution_id_carries_its_start_and_is_recognised(now: float, nonce: str) -> None:
    from perago_worker.fences import is_manual, manual_execution_id, manual_started_ms

    execution = manual_execution_id(now, nonce)
    assert execution.startswith("manual-") and execution.endswith(nonce)
    assert manual_started_ms(execution) == int(now * 1000)
    assert is_manual(execution)


@pytest.mark.parametrize(
    "workflow_id",
    ["", "manual-", "manual-123-abcdef01", "manual-1764650000000-XYZ", "3f1c-uuid", "manualx"],
)
def test_a_conductor_workflow_id_is_never_taken_for_a_manual_execution(workflow_id: str) -> None:
    from perago_worker.fences import is_manual

    assert not is_manual(workflow_id)


def test_two_manual_execution_ids_of_one_instant_differ() -> None:
    from perago_worker.fences import manual_execution_id

    assert manual_execution_id(1_800_000_000.0) != manual_execution_id(1_800_000_000.0)


def test_a_manual_execution_id_fits_a_staging_branch_name_whole() -> None:
    from perago_worker.fences import manual_execution_id, parse_staging_branch, staging_branch

    execution = manual_execution_id(1_800_000_000.0)
    parsed = parse_staging_branch(staging_branch(execution, "abcd1234", 1_800_000_000.0))
    assert parsed == (execution, 1_800_000_000.0)
