"""Specification of secret masking: one function for the log lines and the reasons sent out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from perago_worker.contract import MAX_REASON, FailureKind, TaskFailure, bound_reason
from perago_worker.observability import logging as plog
from perago_worker.settings import ConductorSettings, LakeFSSettings, Settings

SECRET = "s3cr3t-T0KEN-value-0123456789"


@pytest.fixture
def configured() -> Iterator[None]:
    plog.configure(secrets=[SECRET])
    yield
    plog.configure(secrets=[])


def test_mask_text_replaces_each_secret_given() -> None:
    assert plog.mask_text(f"auth {SECRET} refused", [SECRET]) == "auth ********** refused"


def test_mask_text_replaces_the_configured_secrets(configured: None) -> None:
    assert plog.mask_text(f"token={SECRET};") == "token=**********;"


def test_mask_text_leaves_values_shorter_than_four_characters() -> None:
    assert plog.mask_text("abc and abcd", ["abc", "abcd"]) == "abc and **********"


def test_mask_text_prefers_the_longest_of_overlapping_secrets() -> None:
    assert plog.mask_text("key=abcdefgh", ["abcd", "abcdefgh"]) == "key=**********"


def test_mask_text_masks_a_multi_line_secret_in_its_one_line_spelling() -> None:
    pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAK\n-----END KEY-----"
    reason = bound_reason(f"handler_error: ValueError: bad key {pem} given")
    assert plog.mask_text(reason, [pem]) == "handler_error: ValueError: bad key ********** given"


def test_mask_text_masks_the_pieces_of_a_secret_a_shortened_reason_cut() -> None:
    # One long word after the kind: bound_reason keeps `kept` characters of its head.
    cap = MAX_REASON - len("handler_error: ")
    kept = cap - 1 - (cap - 1) // 2
    reason = bound_reason("handler_error: " + "a" * (kept - 10) + SECRET + "b" * 1000)
    assert reason.split("…")[0].endswith(SECRET[:10]), "the premise: the cut went through it"
    masked = plog.mask_text(reason, [SECRET])
    assert SECRET[:10] not in masked and masked.count("**********") == 1


def test_mask_text_masks_a_secret_middle_left_between_two_cuts() -> None:
    piece = SECRET[5:15]
    assert plog.mask_text(f"x…{piece}…y", [SECRET]) == "x…**********…y"


def test_log_processor_masks_every_field_with_the_same_function(configured: None) -> None:
    reason = TaskFailure(FailureKind.HANDLER_ERROR, "x" * 493 + SECRET + "y" * 900).reason
    event = plog.mask_secrets(None, "info", {"event": "attempt.done", "reason": reason})
    assert event["reason"] == plog.mask_text(reason)
    assert SECRET[:8] not in event["reason"] and SECRET[-8:] not in event["reason"]


def test_log_processor_masks_nested_values(configured: None) -> None:
    event = plog.mask_secrets(None, "info", {"extra": {"items": [f"a {SECRET}"]}})
    assert event == {"extra": {"items": ["a **********"]}}


def test_secret_values_are_lakefs_conductor_and_handler_secrets() -> None:
    settings = Settings(
        lakefs=LakeFSSettings(secret_access_key=SecretStr("lakefs-secret")),
        conductor=ConductorSettings(auth_secret=SecretStr("conductor-secret")),
        handler_secrets={"TOKEN": SecretStr("handler-secret")},
    )
    assert sorted(plog.secret_values(settings)) == [
        "conductor-secret",
        "handler-secret",
        "lakefs-secret",
    ]


_FILLER = st.one_of(
    st.text(alphabet="abc ;/:'", max_size=1500),  # a few long words
    st.lists(st.text(alphabet="abc;", min_size=1, max_size=6), max_size=400).map(" ".join),
)
_SECRETS = st.text(alphabet="XYZ0123456789", min_size=8, max_size=80)


@given(_FILLER, _SECRETS, _FILLER, st.integers(min_value=20, max_value=1000))
def test_no_four_characters_of_a_secret_survive_bounding_then_masking(
    before: str, secret: str, after: str, limit: int
) -> None:
    reason = plog.mask_text(bound_reason(f"kind: {before}{secret}{after}", limit), [secret])
    pieces = {secret[i : i + 4] for i in range(len(secret) - 3)}
    assert not any(piece in reason for piece in pieces), reason


@given(_FILLER, _SECRETS, _FILLER)
def test_no_four_characters_of_a_secret_survive_in_a_bounded_failure_reason(
    before: str, secret: str, after: str
) -> None:
    reason = TaskFailure(FailureKind.HANDLER_ERROR, f"{before} {secret}{after}").reason
    masked = plog.mask_text(bound_reason(plog.mask_text(reason, [secret])), [secret])
    assert not any(secret[i : i + 4] in masked for i in range(len(secret) - 3)), masked
