"""Specification of how lakeFS answers become errors: readable messages, never raw JSON."""

from __future__ import annotations

import pytest

from perago_worker.lakefs import Conflict, LakeFSError, NoChanges, NotFound, translate


def test_a_merge_conflict_answer_without_a_message_reads_conflict_found() -> None:
    error = translate(409, b'{"reference":""}\n')  # what lakeFS 1.86 answers a conflicting merge
    assert isinstance(error, Conflict)
    assert error.message == "conflict found"


def test_an_error_answer_reads_as_its_message() -> None:
    error = translate(404, '{"message":"branch not found"}\n')
    assert isinstance(error, NotFound)
    assert error.message == "branch not found"
    assert str(error) == "lakeFS 404: branch not found"


def test_a_multi_line_message_is_one_line() -> None:
    assert translate(400, '{"message":"bad\\n  request"}').message == "bad request"


@pytest.mark.parametrize("body", [b"", "", None, b"{}", b"[]", b'{"message":""}'])
def test_an_answer_with_no_message_reads_as_its_status(body: object) -> None:
    assert translate(503, body).message == "service unavailable"


def test_a_body_that_is_not_json_is_kept_shortened_on_one_line() -> None:
    message = translate(502, "<html>\n<body>" + "x" * 1000 + "</body></html>").message
    assert message.startswith("<html> <body>xxx")
    assert len(message) == 300 and message.endswith("…")


def test_no_changes_is_still_told_apart() -> None:
    error = translate(400, '{"message":"commit: no changes"}')
    assert isinstance(error, NoChanges)


def test_an_unknown_status_without_a_message_names_the_status() -> None:
    error = translate(599, b"{}")
    assert type(error) is LakeFSError
    assert error.message == "status 599"
