"""Specification of `publish.merge_once`'s decisions: when a merge request is (re)sent.

The fake below stands in for lakeFS's answers only (pure logic: which request follows which
answer); the real-server behaviour is proven in tests/faults/test_exactly_once.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from perago_worker import fences, publish
from perago_worker.execution import Execution
from perago_worker.fences import Incarnation, Target
from perago_worker.lakefs import CommitInfo, LakeFSError, NoChanges

TARGET = Target("repo", "main", "")
EXECUTION = Execution(
    key="e" * 64,
    slot="s" * 64,
    root=Incarnation("t-1", 0, 0, 0),
    target=TARGET,
    input_ref="input",
    not_before=0.0,
)


@dataclass
class FakeLakeFS:
    """Answers scripted per merge request; a landed merge appears in the history."""

    answers: list[str]  # "ok", "no_changes", "timeout", "timeout_landed"
    history: list[CommitInfo] = field(default_factory=list)
    requests: list[bool] = field(default_factory=list)  # allow_empty of each request

    def merge(self, *_: Any, allow_empty: bool = False, retry: bool = True, **__: Any) -> str:
        self.requests.append(allow_empty)
        answer = self.answers.pop(0)
        if answer in ("ok", "timeout_landed"):
            commit = CommitInfo(
                f"m{len(self.history)}",
                [],
                "",
                {fences.META_EXECUTION: EXECUTION.key, fences.META_STAGED: "staged"},
                1,
            )
            self.history.insert(0, commit)
        if answer == "no_changes":
            raise NoChanges(400, "no changes")
        if answer.startswith("timeout"):
            raise LakeFSError(504, "gateway timeout")
        return self.history[0].id

    def walk_log(self, *_: Any, **__: Any) -> Iterator[CommitInfo]:
        yield from self.history
        yield CommitInfo("input", [], "", {}, 1)


def merge(lakefs: FakeLakeFS, *, live: bool = True) -> tuple[str, bool]:
    return publish.merge_once(
        lakefs,  # type: ignore[arg-type]
        EXECUTION,
        "staged",
        "msg",
        {},
        fence=lambda: live,
        retry_seconds=30,
    )


def test_a_first_merge_is_sent_once_without_allow_empty() -> None:
    lakefs = FakeLakeFS(["ok"])
    assert merge(lakefs) == ("m0", True)
    assert lakefs.requests == [False]


def test_a_merge_that_landed_behind_a_lost_answer_is_not_sent_again() -> None:
    lakefs = FakeLakeFS(["timeout_landed"])
    assert merge(lakefs) == ("m0", False)
    assert lakefs.requests == [False]


def test_a_recomputation_the_target_already_holds_gets_an_empty_merge_of_its_own() -> None:
    lakefs = FakeLakeFS(["no_changes", "ok"])
    assert merge(lakefs) == ("m0", True)
    assert lakefs.requests == [False, True]


def test_no_changes_after_an_unknown_outcome_fails_retryably_instead_of_merging_empty() -> None:
    lakefs = FakeLakeFS(["timeout", "no_changes"])
    with pytest.raises(publish.MergeOutcomeUnknown):
        merge(lakefs)
    assert lakefs.requests == [False, False]
    assert lakefs.history == []


def test_a_superseded_attempt_sends_no_merge() -> None:
    lakefs = FakeLakeFS(["ok"])
    with pytest.raises(publish.NotLive):
        merge(lakefs, live=False)
    assert lakefs.requests == []


def test_the_fence_is_asked_before_every_request() -> None:
    asked: list[int] = []
    lakefs = FakeLakeFS(["timeout", "timeout", "ok"])

    def fence() -> bool:
        asked.append(len(lakefs.requests))
        return True

    publish.merge_once(
        lakefs,  # type: ignore[arg-type]
        EXECUTION,
        "staged",
        "msg",
        {},
        fence=fence,
        retry_seconds=30,
    )
    assert asked == [0, 1, 2]  # once before each of the three requests


# -- `unpublished`: our own claim of a fresh execution (attempt._publish) ---------------------


@dataclass
class CountingLakeFS(FakeLakeFS):
    """The fake, counting the history reads (one `walk_log` per read)."""

    reads: list[int] = field(default_factory=list)  # requests sent before each read

    def walk_log(self, *args: Any, **kwargs: Any) -> Iterator[CommitInfo]:
        self.reads.append(len(self.requests))
        yield from super().walk_log(*args, **kwargs)


def merge_unpublished(lakefs: FakeLakeFS) -> tuple[str, bool]:
    return publish.merge_once(
        lakefs,  # type: ignore[arg-type]
        EXECUTION,
        "staged",
        "msg",
        {},
        fence=lambda: True,
        retry_seconds=30,
        unpublished=True,
    )


def test_an_unpublished_execution_sends_its_first_merge_without_reading_the_history() -> None:
    lakefs = CountingLakeFS(["ok"])
    assert merge_unpublished(lakefs) == ("m0", True)
    assert lakefs.requests == [False]
    assert lakefs.reads == []


def test_an_unpublished_claim_merged_meanwhile_is_found_not_merged_twice() -> None:
    # A racing delivery adopted our intent and merged it before our first request: lakeFS
    # refuses ours as "no changes" (no allow_empty), and the history read that follows finds
    # the merge before anything else is sent.
    landed = CommitInfo(
        "racer", [], "", {fences.META_EXECUTION: EXECUTION.key, fences.META_STAGED: "staged"}, 1
    )
    lakefs = CountingLakeFS(["no_changes"], history=[landed])
    assert merge_unpublished(lakefs) == ("racer", False)
    assert lakefs.requests == [False]
    assert lakefs.reads and lakefs.reads[-1] == 1


def test_an_unpublished_execution_still_reads_the_history_before_every_retry() -> None:
    lakefs = CountingLakeFS(["timeout", "ok"])
    assert merge_unpublished(lakefs) == ("m0", True)
    assert lakefs.requests == [False, False]
    assert lakefs.reads == [1]  # none before the first request, one before the retry
