"""`preflight.describe`: one line naming why a probe failed, in the same words for both
servers."""

from __future__ import annotations

import pytest

from perago_worker.conductor import ConductorError
from perago_worker.preflight import describe

URL = "http://nonexistent.invalid:8080/api"


@pytest.mark.parametrize(
    ("resolver", "named"),
    [
        ("[Errno -2] Name or service not known", "host name not found"),
        ("[Errno -3] Temporary failure in name resolution", "host name not found"),
        ("[Errno 111] Connection refused", "connection refused"),
    ],
)
def test_a_failed_conductor_connection_is_named_in_the_same_words_as_lakefs(
    resolver: str, named: str
) -> None:
    exc = ConductorError(0, f"cannot connect to {URL}: {resolver}")
    assert describe(exc, URL) == f"cannot connect to {URL}: {named}"
    assert describe(OSError(resolver), URL) == f"cannot connect to {URL}: {named}"


def test_a_conductor_answer_keeps_its_status_and_message() -> None:
    exc = ConductorError(503, "Conductor 503: unavailable")
    assert describe(exc, URL) == str(exc)
