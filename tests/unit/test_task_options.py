"""Per-task options: declared next to the handler, overridden per environment, registered."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from perago_worker import TaskContext, Worker
from perago_worker.app import RegistrationError, TaskOptions
from perago_worker.invocation import timeout_for
from perago_worker.register import describe_options, effective_options, task_def_for
from perago_worker.settings import Settings


class P(BaseModel):
    pass


class R(BaseModel):
    ok: bool = True


def handler(ctx: TaskContext, params: P) -> R:
    return R()


def registered(**options: object) -> Worker:
    app = Worker()
    app.task("t", **options)(handler)  # type: ignore[arg-type]
    return app


def test_declared_options_reach_the_task_definition() -> None:
    spec = registered(
        retries=5,
        retry_logic="FIXED",
        retry_delay_seconds=7,
        total_timeout_seconds=4000,
        rate_limit=(10, 60),
    ).tasks["t"]
    definition = task_def_for(spec)
    assert (definition.retry_count, definition.retry_logic, definition.retry_delay_seconds) == (
        5,
        "FIXED",
        7,
    )
    assert definition.timeout_seconds == 4000
    assert (definition.rate_limit_per_frequency, definition.rate_limit_frequency_in_seconds) == (
        10,
        60,
    )


def test_undeclared_options_get_the_defaults_and_register_retries() -> None:
    spec = registered().tasks["t"]
    assert effective_options(spec) == TaskOptions(
        retries=3,
        retry_logic="EXPONENTIAL_BACKOFF",
        retry_delay_seconds=1,
        rate_limit_per_frequency=0,
        rate_limit_frequency_seconds=1,
    )
    assert task_def_for(spec, retries=0).retry_count == 0
    assert task_def_for(spec).timeout_seconds == 3600  # max(3600, 4 x 300)


def test_settings_override_declared_options_and_register_retries() -> None:
    spec = registered(retries=5, retry_logic="FIXED").tasks["t"]
    settings = Settings(task_options={"t": {"retries": 9, "rate_limit_per_frequency": 2}})
    options = effective_options(spec, settings, retries=1)
    assert (options.retries, options.retry_logic, options.rate_limit_per_frequency) == (
        9,
        "FIXED",
        2,
    )


def test_concurrency_comes_from_settings_then_the_decorator_then_the_default() -> None:
    assert Settings().concurrency_for("t", 2) == 2
    assert Settings().concurrency_for("t") == 4
    assert Settings(task_options={"t": {"concurrency": 3}}).concurrency_for("t", 2) == 3
    assert (
        Settings(
            concurrency_per_task={"t": 1}, task_options={"t": {"concurrency": 3}}
        ).concurrency_for("t", 2)
        == 1
    )


def test_a_total_timeout_is_the_attempts_default_deadline() -> None:
    spec = registered(total_timeout_seconds=900).tasks["t"]
    assert timeout_for(spec, Settings()) == 900
    assert timeout_for(spec, Settings(task_options={"t": {"total_timeout_seconds": 1200}})) == 1200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency must be a whole number >= 1, got 0"),
        ({"retries": -1}, "retries must be a whole number >= 0, got -1"),
        ({"retry_logic": "SOMETIMES"}, "retry_logic must be one of FIXED, EXPONENTIAL_BACKOFF"),
        ({"rate_limit": 5}, r"rate_limit must be \(tasks, per_seconds\), got 5"),
        ({"rate_limit": (5, 0)}, "rate_limit_frequency_seconds must be a whole number >= 1"),
        (
            {"timeout": 3600, "total_timeout_seconds": 3700},
            "total_timeout_seconds 3700 must leave room for the attempt's timeout",
        ),
    ],
)
def test_an_impossible_option_is_refused_at_registration_naming_it(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(RegistrationError, match=message):
        registered(**options)


def test_an_unknown_or_invalid_override_is_refused_by_the_settings() -> None:
    with pytest.raises(ValidationError, match="retry"):
        Settings(task_options={"t": {"retry": 2}})
    with pytest.raises(ValidationError):
        Settings(task_options={"t": {"concurrency": 0}})


def test_dry_run_names_each_options_source() -> None:
    spec = registered(retries=5).tasks["t"]
    settings = Settings(task_options={"t": {"retry_delay_seconds": 30}})
    line = describe_options(spec, settings, task_def_for(spec, settings=settings))
    assert line.startswith("concurrency=4 (default), retries=5 (code), ")
    assert "retry_delay_seconds=30 (settings)" in line


def test_the_handlers_guide_quotes_the_option_defaults() -> None:
    from pathlib import Path

    from perago_worker.register import DEFAULT_OPTIONS

    guide = (Path(__file__).parents[2] / "docs" / "handlers.md").read_text()
    section = guide[guide.index("## Per-task options") : guide.index("## Testing handlers")]
    assert f"default (retries {DEFAULT_OPTIONS.retries}, or `register --retries N`; " in section
    assert (
        f"`{DEFAULT_OPTIONS.retry_logic}`; a delay of {DEFAULT_OPTIONS.retry_delay_seconds} s"
        in section
    )
    assert DEFAULT_OPTIONS.rate_limit_per_frequency == 0 and "no rate limit" in section
