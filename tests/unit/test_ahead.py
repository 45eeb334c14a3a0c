"""Reads started ahead (`ahead.Ahead`, `materialize.listing_ahead`): answers, errors, context."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from perago_worker.ahead import Ahead
from perago_worker.lakefs import LakeFS
from perago_worker.materialize import listing_ahead

FIELD: contextvars.ContextVar[str] = contextvars.ContextVar("field", default="unset")


def test_the_call_runs_at_once_on_another_thread_and_its_value_is_read_later() -> None:
    started = threading.Event()
    release = threading.Event()
    caller = threading.get_ident()
    seen: list[int] = []

    def read() -> int:
        seen.append(threading.get_ident())
        started.set()
        release.wait(5)
        return 7

    ahead = Ahead(read, name="test-read")
    assert started.wait(5), "the call began before anyone asked for its result"
    release.set()
    assert ahead.result() == 7
    assert seen and seen[0] != caller


def test_an_error_is_raised_again_in_the_reading_thread() -> None:
    def read() -> int:
        raise KeyError("gone")

    ahead = Ahead(read, name="test-read")
    with pytest.raises(KeyError, match="gone"):
        ahead.result()


def test_the_call_sees_the_callers_context_so_log_fields_stay_on_it() -> None:
    FIELD.set("task-123")
    assert Ahead(FIELD.get, name="test-read").result() == "task-123"


class FakeTransfers:
    """Pages as a generator, recording when the first one was asked for."""

    def __init__(self, pages: list[list[str]], fail_after: int | None = None) -> None:
        self.pages = pages
        self.fail_after = fail_after
        self.asked = threading.Event()

    def list_objects(self, repository: str, ref: str, prefix: str) -> Iterator[list[str]]:
        self.asked.set()
        for i, page in enumerate(self.pages):
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionError("listing broke")
            yield page


class FakeLakeFS:
    def __init__(self, transfers: FakeTransfers) -> None:
        self.transfers = transfers


def ahead_of(transfers: FakeTransfers) -> Iterator[list[Any]]:
    return listing_ahead(cast(LakeFS, FakeLakeFS(transfers)), "repo", "c" * 64, "p/")


def test_the_listing_is_asked_for_before_materialize_iterates_it() -> None:
    transfers = FakeTransfers([["a", "b"], ["c"]])
    listing = ahead_of(transfers)
    assert transfers.asked.wait(5), "the first page was requested at once"
    assert list(listing) == [["a", "b"], ["c"]]


def test_an_empty_prefix_lists_no_page() -> None:
    assert list(ahead_of(FakeTransfers([]))) == []


def test_a_listing_error_surfaces_when_materialize_reads_that_page() -> None:
    listing = ahead_of(FakeTransfers([["a"], ["b"]], fail_after=1))
    assert next(listing) == ["a"]
    with pytest.raises(ConnectionError, match="listing broke"):
        next(listing)
    first_page_fails = ahead_of(FakeTransfers([["a"]], fail_after=0))
    with pytest.raises(ConnectionError):
        next(first_page_fails)
