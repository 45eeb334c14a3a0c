"""The handler registry: `Worker().task(...)` turns a typed function into a task definition.

Everything a handler declares (its name, params and result models from the type hints, its
workspace spec and checks) is validated when the decorator runs, so that a mistake surfaces
at import time with a clear message, not on the first task at 3 a.m.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel

from perago_worker.changes import VERIFY_MODES, Verify
from perago_worker.checks import Check
from perago_worker.context import TaskContext
from perago_worker.paths import InvalidPrefix, normalize_prefix

DEFAULT_RESPONSE_TIMEOUT = 300
TASK_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
# How a handler runs (see `invocation`): on a thread of the worker, or in a child process
# that can be killed at the deadline.
Isolation = Literal["thread", "process"]
ISOLATIONS: tuple[str, ...] = get_args(Isolation)
# Conductor's retry policies (TaskDef.retryLogic).
RetryLogic = Literal["FIXED", "EXPONENTIAL_BACKOFF", "LINEAR_BACKOFF"]
RETRY_LOGICS: tuple[str, ...] = get_args(RetryLogic)


@dataclass(frozen=True)
class TaskOptions:
    """What a data engineer decides per task, next to its handler (`@app.task(...)`).

    `register` writes them into the task definition; the `task_options` setting overrides
    any of them per environment; None leaves the worker's default (see docs/handlers.md,
    "Per-task options").
    """

    concurrency: int | None = None  # attempts in flight per worker process
    retries: int | None = None  # retryCount
    retry_logic: RetryLogic | None = None  # retryLogic
    retry_delay_seconds: int | None = None  # retryDelaySeconds
    total_timeout_seconds: int | None = None  # timeoutSeconds: when Conductor gives up
    rate_limit_per_frequency: int | None = None  # rateLimitPerFrequency (0: unlimited)
    rate_limit_frequency_seconds: int | None = None  # rateLimitFrequencyInSeconds

    def problems(self) -> list[str]:
        """What is wrong with these values, each naming its option (empty: nothing)."""
        found = []
        for name in ("concurrency", "total_timeout_seconds", "rate_limit_frequency_seconds"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                found.append(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("retries", "retry_delay_seconds", "rate_limit_per_frequency"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                found.append(f"{name} must be a whole number >= 0, got {value!r}")
        if self.retry_logic is not None and self.retry_logic not in RETRY_LOGICS:
            found.append(
                f"retry_logic must be one of {', '.join(RETRY_LOGICS)}, got {self.retry_logic!r}"
            )
        return found

    def over(self, base: TaskOptions) -> TaskOptions:
        """These options where set, `base`'s elsewhere."""
        return TaskOptions(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(base, f.name)
                for f in dataclasses.fields(self)
            }
        )


def conductor_timeout_seconds(response_timeout_seconds: int) -> int:
    """The `timeoutSeconds` a registered definition gets: when Conductor times the task out.

    Without a `timeout` (per task or `task_timeout_seconds`) it is also the attempt's
    deadline, so a hung handler holds its slot no longer than Conductor waits for it.
    """
    return max(3600, 4 * response_timeout_seconds)


class RegistrationError(TypeError):
    """A handler that cannot be registered as declared."""


@dataclass(frozen=True)
class WorkspaceSpec:
    """Task metadata: which repository folder the handler sees as its workspace root.

    The default `/` exposes the whole repository; `/audio/render` maps the objects under
    `audio/render/` to the root of the local workspace.

    `verify` decides how a file the handler left is compared with what it was given (see
    docs/handlers.md, "What counts as a change"): `"stat"` (the default) reads a file only
    when its stat signature moved; `"hash"` reads every file that kept its size, for file
    systems whose ctime cannot be trusted.
    """

    prefix: str = "/"
    verify: Verify = "stat"
    key_prefix: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "key_prefix", normalize_prefix(self.prefix))
        except InvalidPrefix as exc:
            raise RegistrationError(f"WorkspaceSpec: {exc}") from None
        if self.verify not in VERIFY_MODES:
            raise RegistrationError(
                f"WorkspaceSpec: verify must be one of {', '.join(VERIFY_MODES)}, "
                f"got {self.verify!r}"
            )


# A plain `def` returning the result model, or an `async def` whose coroutine does.
Handler = Callable[[TaskContext, Any], BaseModel | Awaitable[BaseModel]]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: Handler
    params_model: type[BaseModel]
    result_model: type[BaseModel]
    workspace: WorkspaceSpec | None
    pre: tuple[Check, ...]
    post: tuple[Check, ...]
    response_timeout_seconds: int
    description: str
    timeout_seconds: float | None = None  # None: the settings default (`task_timeout_seconds`)
    isolation: Isolation | None = None  # None: the settings default (`task_isolation`)
    options: TaskOptions = TaskOptions()  # concurrency, retries, timeouts, rate limit
    # The `module:attribute` the app was loaded from (set by `load_app`): a child process
    # finds the handler through it when the function is not importable by its own name.
    app_path: str | None = None

    @property
    def is_async(self) -> bool:
        """An `async def` handler: it runs on the worker's event loop (see `invocation`)."""
        return inspect.iscoroutinefunction(self.fn)

    @property
    def qualname(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    @property
    def conductor_timeout_seconds(self) -> int:
        """When Conductor gives up on the task: `total_timeout_seconds` when the task sets
        one, else max(3600, 4 x response timeout)."""
        if self.options.total_timeout_seconds is not None:
            return self.options.total_timeout_seconds
        return conductor_timeout_seconds(self.response_timeout_seconds)


def models_from_hints(name: str, fn: Callable[..., Any]) -> tuple[type[BaseModel], type[BaseModel]]:
    where = f"task {name!r} ({getattr(fn, '__qualname__', fn)!r})"
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise RegistrationError(
            f"{where}: a handler returns its result once; a generator (`yield`) cannot be one"
        )
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 2:
        raise RegistrationError(
            f"{where}: a handler takes exactly (ctx: TaskContext, params: <Pydantic model>), "
            f"got {len(params)} parameter(s)"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a forward reference that does not resolve
        raise RegistrationError(f"{where}: cannot resolve type hints: {exc}") from None
    params_model = hints.get(params[1].name)
    result_model = hints.get("return")
    for label, model in (("params", params_model), ("return", result_model)):
        if model is None:
            raise RegistrationError(f"{where}: the {label} type hint is missing")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise RegistrationError(
                f"{where}: the {label} type hint must be a Pydantic v2 model class, got {model!r}"
            )
    ctx_hint = hints.get(params[0].name)
    if ctx_hint is not None and ctx_hint is not TaskContext:
        raise RegistrationError(f"{where}: the first parameter must be typed TaskContext")
    assert params_model is not None and result_model is not None
    return params_model, result_model


class Worker:
    """A registry of task handlers; `perago-worker run module:attribute` serves it."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return dict(self._tasks)

    def task(
        self,
        name: str,
        *,
        workspace: WorkspaceSpec | None = None,
        pre: Sequence[Check] = (),
        post: Sequence[Check] = (),
        response_timeout_seconds: int = DEFAULT_RESPONSE_TIMEOUT,
        description: str = "",
        timeout: float | None = None,
        isolation: Isolation | None = None,
        concurrency: int | None = None,
        retries: int | None = None,
        retry_logic: RetryLogic | None = None,
        retry_delay_seconds: int | None = None,
        total_timeout_seconds: int | None = None,
        rate_limit: tuple[int, int] | None = None,
    ) -> Callable[[F], F]:
        """Register `fn` as the handler of Conductor task type `name`.

        Without `workspace` the task is workspace-free: no attempt directory, no lakeFS
        access, and its input must not carry a `workspace`.

        `timeout` (seconds) bounds each attempt up to the start of its publish; `isolation`
        says where the handler runs (`"thread"` or `"process"`, see docs/handlers.md,
        "Deadlines and isolation"). Either defaults to the worker's settings.

        `concurrency` (attempts in flight per worker process), `retries`, `retry_logic`,
        `retry_delay_seconds`, `total_timeout_seconds` (when Conductor gives up on the task)
        and `rate_limit` (`(tasks, per_seconds)`, Conductor's rate limit) are registered
        into the task definition by `register`; the `task_options` setting overrides them.
        """
        import re

        if not isinstance(name, str) or not re.match(TASK_NAME_PATTERN, name):
            raise RegistrationError(f"task name {name!r} must match {TASK_NAME_PATTERN}")
        if name in self._tasks:
            raise RegistrationError(
                f"task {name!r} is already registered by {self._tasks[name].qualname}"
            )
        if workspace is not None and not isinstance(workspace, WorkspaceSpec):
            raise RegistrationError(f"task {name!r}: workspace must be a WorkspaceSpec")
        if workspace is None and (pre or post):
            raise RegistrationError(
                f"task {name!r} is workspace-free: workspace checks (pre/post) need a "
                "workspace=WorkspaceSpec(...)"
            )
        for check in (*pre, *post):
            if not isinstance(check, Check):
                raise RegistrationError(
                    f"task {name!r}: {check!r} is not a workspace check; use "
                    "require_file/require_dir/require_glob/forbid_glob"
                )
        if response_timeout_seconds < 1:
            raise RegistrationError(f"task {name!r}: response_timeout_seconds must be >= 1")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        ):
            raise RegistrationError(
                f"task {name!r}: timeout must be a number of seconds > 0, got {timeout!r}"
            )
        if rate_limit is not None and (not isinstance(rate_limit, tuple) or len(rate_limit) != 2):
            raise RegistrationError(
                f"task {name!r}: rate_limit must be (tasks, per_seconds), got {rate_limit!r}"
            )
        options = TaskOptions(
            concurrency=concurrency,
            retries=retries,
            retry_logic=retry_logic,
            retry_delay_seconds=retry_delay_seconds,
            total_timeout_seconds=total_timeout_seconds,
            rate_limit_per_frequency=None if rate_limit is None else rate_limit[0],
            rate_limit_frequency_seconds=None if rate_limit is None else rate_limit[1],
        )
        if problems := options.problems():
            raise RegistrationError(f"task {name!r}: " + "; ".join(problems))
        if (
            total_timeout_seconds is not None
            and timeout is not None
            and timeout + response_timeout_seconds > total_timeout_seconds
        ):
            raise RegistrationError(
                f"task {name!r}: total_timeout_seconds {total_timeout_seconds} must leave room "
                f"for the attempt's timeout ({timeout:g} s) and one response timeout "
                f"({response_timeout_seconds} s) for its publish"
            )
        if isolation is not None and isolation not in ISOLATIONS:
            raise RegistrationError(
                f"task {name!r}: isolation must be one of {', '.join(ISOLATIONS)}, "
                f"got {isolation!r}"
            )

        def register(fn: F) -> F:
            params_model, result_model = models_from_hints(name, fn)
            self._tasks[name] = TaskSpec(
                name=name,
                fn=fn,
                params_model=params_model,
                result_model=result_model,
                workspace=workspace,
                pre=tuple(pre),
                post=tuple(post),
                response_timeout_seconds=response_timeout_seconds,
                description=description or (inspect.getdoc(fn) or "").split("\n")[0],
                timeout_seconds=None if timeout is None else float(timeout),
                isolation=isolation,
                options=options,
            )
            return fn

        return register


def load_app(target: str) -> Worker:
    """Import `module:attribute` and return the `Worker` it names."""
    import importlib

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise RegistrationError(f"APP must look like 'package.module:attribute', got {target!r}")
    module = importlib.import_module(module_name)
    app = getattr(module, attribute, None)
    if not isinstance(app, Worker):
        raise RegistrationError(f"{target} is {type(app).__name__}, not a perago_worker.Worker")
    for name, spec in app._tasks.items():
        if spec.app_path is None:
            app._tasks[name] = dataclasses.replace(spec, app_path=target)
    return app
