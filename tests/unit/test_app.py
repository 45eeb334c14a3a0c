"""Specification of `perago_worker.app` (registration) and `perago_worker.context`."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pydantic import BaseModel

from perago_worker.app import RegistrationError, Worker, WorkspaceSpec, load_app
from perago_worker.checks import require_file
from perago_worker.context import (
    AttemptWorkspace,
    Cancelled,
    NoWorkspaceError,
    TaskContext,
    UnknownConfigKey,
)
from perago_worker.settings import Settings


class Params(BaseModel):
    n: int = 1


class Result(BaseModel):
    total: int


class NotAModel:
    pass


def good_handler(ctx: TaskContext, params: Params) -> Result:
    """Add things up.

    More detail that is not part of the description.
    """
    return Result(total=params.n)


# --- WorkspaceSpec -----------------------------------------------------------------------


def test_workspace_spec_default_exposes_whole_repository() -> None:
    assert WorkspaceSpec().key_prefix == ""


def test_workspace_spec_normalizes_prefix() -> None:
    assert WorkspaceSpec("/audio/render").key_prefix == "audio/render/"


@pytest.mark.parametrize("prefix", ["../x", "a/../b", "~/data", "C:\\data", "//host/x"])
def test_workspace_spec_bad_prefix_is_registration_error(prefix: str) -> None:
    with pytest.raises(RegistrationError, match="WorkspaceSpec"):
        WorkspaceSpec(prefix)


# --- Worker.task: valid registration ----------------------------------------------------


def test_task_registration_records_models_and_workspace() -> None:
    worker = Worker()
    spec_ws = WorkspaceSpec("/audio/render")
    worker.task("render", workspace=spec_ws, post=[require_file("out.wav")])(good_handler)
    spec = worker.tasks["render"]
    assert spec.params_model is Params
    assert spec.result_model is Result
    assert spec.workspace is spec_ws
    assert spec.workspace.key_prefix == "audio/render/"
    assert spec.post == (require_file("out.wav"),)
    assert spec.pre == ()


def test_task_decorator_returns_the_function_unchanged() -> None:
    assert Worker().task("render")(good_handler) is good_handler


def test_task_description_defaults_to_first_docstring_line() -> None:
    worker = Worker()
    worker.task("render")(good_handler)
    assert worker.tasks["render"].description == "Add things up."


def test_task_registration_without_workspace_is_workspace_free() -> None:
    worker = Worker()
    worker.task("sum")(good_handler)
    assert worker.tasks["sum"].workspace is None


def test_task_qualname_names_module_and_function() -> None:
    worker = Worker()
    worker.task("sum")(good_handler)
    assert worker.tasks["sum"].qualname == f"{__name__}.good_handler"


def test_tasks_property_is_a_copy() -> None:
    worker = Worker()
    worker.task("sum")(good_handler)
    worker.tasks.clear()
    assert "sum" in worker.tasks


# --- Worker.task: registration errors ---------------------------------------------------


def test_registration_refuses_missing_params_hint() -> None:
    def handler(ctx: TaskContext, params) -> Result:  # type: ignore[no-untyped-def]
        return Result(total=0)

    with pytest.raises(RegistrationError, match="params type hint is missing"):
        Worker().task("t")(handler)


def test_registration_refuses_missing_return_hint() -> None:
    def handler(ctx: TaskContext, params: Params):  # type: ignore[no-untyped-def]
        return Result(total=0)

    with pytest.raises(RegistrationError, match="return type hint is missing"):
        Worker().task("t")(handler)


def test_registration_refuses_non_pydantic_params() -> None:
    def handler(ctx: TaskContext, params: dict) -> Result:  # type: ignore[type-arg]
        return Result(total=0)

    with pytest.raises(RegistrationError, match="params type hint must be a Pydantic v2 model"):
        Worker().task("t")(handler)


def test_registration_refuses_non_pydantic_class_result() -> None:
    def handler(ctx: TaskContext, params: Params) -> NotAModel:
        return NotAModel()

    with pytest.raises(RegistrationError, match="return type hint must be a Pydantic v2 model"):
        Worker().task("t")(handler)


def test_registration_refuses_wrongly_typed_context() -> None:
    def handler(ctx: dict, params: Params) -> Result:  # type: ignore[type-arg]
        return Result(total=0)

    with pytest.raises(RegistrationError, match="first parameter must be typed TaskContext"):
        Worker().task("t")(handler)


def test_registration_refuses_unresolvable_hint() -> None:
    def handler(ctx: TaskContext, params: DoesNotExist) -> Result:  # type: ignore[name-defined]  # noqa: F821
        return Result(total=0)

    with pytest.raises(RegistrationError, match="cannot resolve type hints"):
        Worker().task("t")(handler)


def test_registration_refuses_handler_without_context_parameter() -> None:
    def handler(params: Params) -> Result:
        return Result(total=0)

    with pytest.raises(RegistrationError, match="got 1 parameter"):
        Worker().task("t")(handler)


def test_registration_refuses_handler_with_extra_parameter() -> None:
    def handler(ctx: TaskContext, params: Params, extra: int) -> Result:
        return Result(total=0)

    with pytest.raises(RegistrationError, match="got 3 parameter"):
        Worker().task("t")(handler)


def test_registration_refuses_duplicate_name_naming_first_handler() -> None:
    worker = Worker()
    worker.task("render")(good_handler)
    with pytest.raises(RegistrationError, match=r"already registered by .*good_handler"):
        worker.task("render")


def test_registration_refuses_checks_on_workspace_free_task() -> None:
    with pytest.raises(RegistrationError, match="workspace-free"):
        Worker().task("t", post=[require_file("a")])


def test_registration_refuses_non_check_in_checks() -> None:
    with pytest.raises(RegistrationError, match="not a workspace check"):
        Worker().task("t", workspace=WorkspaceSpec(), pre=["a.txt"])  # type: ignore[list-item]


def test_registration_refuses_workspace_that_is_not_a_spec() -> None:
    with pytest.raises(RegistrationError, match="must be a WorkspaceSpec"):
        Worker().task("t", workspace="/audio")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "has space", "-dash-first", "x" * 129, "a/b"])
def test_registration_refuses_bad_task_name(name: str) -> None:
    with pytest.raises(RegistrationError, match="must match"):
        Worker().task(name)


def test_registration_refuses_non_positive_timeout() -> None:
    with pytest.raises(RegistrationError, match="response_timeout_seconds"):
        Worker().task("t", response_timeout_seconds=0)


def test_failed_registration_registers_nothing() -> None:
    worker = Worker()

    def handler(ctx: TaskContext, params: Params):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(RegistrationError):
        worker.task("t")(handler)
    assert worker.tasks == {}


def test_registration_error_is_a_type_error() -> None:
    assert issubclass(RegistrationError, TypeError)


# --- load_app ----------------------------------------------------------------------------

app = Worker()


def test_load_app_returns_the_named_worker() -> None:
    assert load_app(f"{__name__}:app") is app


@pytest.mark.parametrize("target", ["no_colon", ":app", f"{__name__}:"])
def test_load_app_refuses_malformed_target(target: str) -> None:
    with pytest.raises(RegistrationError, match="module:attribute"):
        load_app(target)


def test_load_app_refuses_non_worker_attribute() -> None:
    with pytest.raises(RegistrationError, match=r"not a perago_worker\.Worker"):
        load_app(f"{__name__}:Params")


# --- TaskContext -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_perago_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PERAGO_"):
            monkeypatch.delenv(name)


def _ctx(**overrides: Any) -> TaskContext:
    values: dict[str, Any] = {
        "task_id": "t-1",
        "workflow_id": "wf-1",
        "task_type": "sum",
        "reference_name": "sum_ref",
        "retry_count": 0,
        "poll_count": 1,
        "worker_id": "w-1",
        "environment": "dev",
    }
    values.update(overrides)
    return TaskContext(**values)


def test_workspace_on_workspace_free_context_raises_clear_error() -> None:
    ctx = _ctx()
    with pytest.raises(NoWorkspaceError) as info:
        _ = ctx.workspace
    message = str(info.value)
    assert "'sum'" in message
    assert "workspace-free" in message
    assert "WorkspaceSpec" in message


def test_workspace_free_context_reports_no_workspace() -> None:
    assert not _ctx().has_workspace


def test_workspace_is_returned_when_set(tmp_path: Any) -> None:
    ws = AttemptWorkspace(tmp_path, "audio-lake", "main", "c0ffee", "audio/")
    ctx = _ctx(_workspace=ws)
    assert ctx.has_workspace
    assert ctx.workspace is ws


def test_config_returns_known_value_and_secret() -> None:
    settings = Settings(handler_config={"bucket": "b-1"}, handler_secrets={"token": "s3cr3t"})
    ctx = _ctx(_config=settings.handler_value)
    assert ctx.config("bucket") == "b-1"
    assert ctx.config("token") == "s3cr3t"


def test_config_unknown_key_lists_known_keys() -> None:
    settings = Settings(
        handler_config={"bucket": "b-1", "region": "eu"}, handler_secrets={"token": "s3cr3t"}
    )
    ctx = _ctx(_config=settings.handler_value)
    with pytest.raises(UnknownConfigKey) as info:
        ctx.config("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert "known keys: bucket, region, token" in message
    assert "s3cr3t" not in message


def test_config_unknown_key_with_no_keys_says_none() -> None:
    ctx = _ctx(_config=Settings().handler_value)
    with pytest.raises(UnknownConfigKey, match="known keys: none"):
        ctx.config("nope")


def test_config_without_configuration_raises_unknown_key() -> None:
    with pytest.raises(UnknownConfigKey, match="'nope' is unknown"):
        _ctx().config("nope")


def test_check_cancelled_raises_with_first_reason() -> None:
    ctx = _ctx()
    ctx.check_cancelled()
    ctx.cancel("lease lost")
    ctx.cancel("draining")
    assert ctx.cancelled
    with pytest.raises(Cancelled, match="lease lost"):
        ctx.check_cancelled()


# --- deadlines, isolation, async handlers ------------------------------------------------


def test_an_async_handler_registers_with_its_models_and_is_marked_async() -> None:
    async def handler(ctx: TaskContext, params: Params) -> Result:
        return Result(total=0)

    worker = Worker()
    worker.task("t")(handler)
    spec = worker.tasks["t"]
    assert spec.is_async and (spec.params_model, spec.result_model) == (Params, Result)
    worker.task("s")(good_handler)
    assert not worker.tasks["s"].is_async


def test_registration_refuses_an_async_generator_handler() -> None:
    async def handler(ctx: TaskContext, params: Params) -> Result:  # type: ignore[misc]
        yield Result(total=0)

    with pytest.raises(RegistrationError, match=r"'t'.*a generator \(`yield`\) cannot be one"):
        Worker().task("t")(handler)


def test_registration_records_timeout_and_isolation() -> None:
    worker = Worker()
    worker.task("t", timeout=90, isolation="process")(good_handler)
    spec = worker.tasks["t"]
    assert (spec.timeout_seconds, spec.isolation) == (90.0, "process")


def test_timeout_and_isolation_default_to_the_settings() -> None:
    worker = Worker()
    worker.task("t")(good_handler)
    assert (worker.tasks["t"].timeout_seconds, worker.tasks["t"].isolation) == (None, None)


@pytest.mark.parametrize("timeout", [0, -1, True, "60"])
def test_registration_refuses_a_timeout_that_is_not_positive_seconds(timeout: Any) -> None:
    with pytest.raises(RegistrationError, match="timeout must be a number of seconds > 0"):
        Worker().task("t", timeout=timeout)


def test_registration_refuses_an_unknown_isolation() -> None:
    with pytest.raises(RegistrationError, match="isolation must be one of thread, process"):
        Worker().task("t", isolation="container")  # type: ignore[arg-type]


def test_load_app_records_the_app_path_on_every_task() -> None:
    app.task("loaded")(good_handler)
    try:
        assert load_app(f"{__name__}:app").tasks["loaded"].app_path == f"{__name__}:app"
    finally:
        app._tasks.pop("loaded")


def test_the_default_deadline_is_the_timeout_register_gives_the_definition() -> None:
    from perago_worker.register import task_def_for

    worker = Worker()
    worker.task("short", response_timeout_seconds=60)(good_handler)
    worker.task("long", response_timeout_seconds=1200)(good_handler)
    for spec in worker.tasks.values():
        assert spec.conductor_timeout_seconds == task_def_for(spec).timeout_seconds
    assert [s.conductor_timeout_seconds for s in worker.tasks.values()] == [3600, 4800]


def test_expire_cancels_and_marks_the_attempt_timed_out() -> None:
    ctx = _ctx()
    assert ctx.expire("deadline")
    assert ctx.cancelled and ctx.timed_out
    with pytest.raises(Cancelled, match="deadline"):
        ctx.check_cancelled()


def test_expire_never_cuts_an_attempt_that_began_to_publish() -> None:
    ctx = _ctx()
    assert ctx.begin_publish()
    assert not ctx.expire("deadline")
    assert not ctx.cancelled and not ctx.timed_out


def test_expire_leaves_an_earlier_cancellation_as_it_was() -> None:
    ctx = _ctx()
    ctx.cancel("lease lost")
    assert not ctx.expire("deadline")
    assert not ctx.timed_out and ctx.cancel_reason == "lease lost"


def test_an_expired_attempt_cannot_begin_to_publish() -> None:
    ctx = _ctx()
    ctx.expire("deadline")
    assert not ctx.begin_publish()


def test_seconds_left_counts_down_to_the_deadline_and_stops_at_zero() -> None:
    import time

    assert _ctx().seconds_left() is None
    assert 9 < (_ctx(deadline=time.monotonic() + 10).seconds_left() or 0) <= 10
    assert _ctx(deadline=time.monotonic() - 5).seconds_left() == 0.0


def test_a_task_timeout_beyond_the_default_extends_the_registered_timeout() -> None:
    """Conductor must not time a task out before its own deadline and the publish after it."""
    from perago_worker.register import task_def_for

    worker = Worker()
    worker.task("slow", response_timeout_seconds=60, timeout=7200.5)(good_handler)
    worker.task("quick", response_timeout_seconds=60, timeout=10)(good_handler)
    assert task_def_for(worker.tasks["slow"]).timeout_seconds == 7201 + 60
    assert task_def_for(worker.tasks["quick"]).timeout_seconds == 3600
