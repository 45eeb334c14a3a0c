"""The configuration reference documents every setting the code has."""

from __future__ import annotations

from pathlib import Path

from perago_worker.settings import ConductorSettings, LakeFSSettings, Settings

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def test_every_setting_has_a_row_in_the_configuration_reference() -> None:
    names = [
        f"PERAGO_{n.upper()}" for n in Settings.model_fields if n not in ("lakefs", "conductor")
    ]
    names += [f"PERAGO_LAKEFS__{n.upper()}" for n in LakeFSSettings.model_fields]
    names += [f"PERAGO_CONDUCTOR__{n.upper()}" for n in ConductorSettings.model_fields]
    missing = [n for n in names if f"`{n}`" not in DOC]
    assert missing == []


FENCES = (Path(__file__).parents[2] / "docs" / "fences.md").read_text()


def _field_default(model: type, name: str) -> object:
    return model.model_fields[name].default  # type: ignore[attr-defined]


def test_fences_doc_quotes_the_timeouts_and_budgets_the_code_uses() -> None:
    quoted = {
        "`clock_skew_seconds` (300 s by default)": _field_default(Settings, "clock_skew_seconds"),
        "`merge_retry_seconds` (60 s)": _field_default(Settings, "merge_retry_seconds"),
        "`lakefs.request_timeout_seconds`, 60 s": _field_default(
            LakeFSSettings, "request_timeout_seconds"
        ),
        "`conductor.request_timeout_seconds`,\n10 s": _field_default(
            ConductorSettings, "request_timeout_seconds"
        ),
    }
    for phrase, default in quoted.items():
        assert phrase in FENCES, phrase
        number = float(phrase.split("(")[-1].split(",")[-1].split()[0].strip("`"))
        assert number == default, (phrase, default)


def test_fences_doc_quotes_the_chain_depth_token_size_and_intent_age() -> None:
    import inspect

    from perago_worker import execution, fences, gc

    assert "deeper than 1,000" in FENCES and execution.MAX_CHAIN == 1000
    token = fences.delivery_token("w")
    assert "12 random hex digits" in FENCES and len(token.split("#")[1]) == 12
    age = inspect.signature(gc.collect).parameters["intent_older_than"].default
    assert "(7 days by\ndefault)" in FENCES and age == 7 * 86400


def test_fences_doc_quotes_the_lease_factor_and_the_unverifiable_fence_budget() -> None:
    import inspect

    from perago_worker.runner import Runner

    assert "renews at half the timeout" in FENCES
    assert _field_default(Settings, "lease_factor") == 0.5
    assert "(60 s of\n  retries before a merge)" in FENCES
    assert inspect.signature(Runner.is_live).parameters["retry_seconds"].default == 60
