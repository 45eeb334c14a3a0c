"""Conductor task definitions derived from the registered handlers, and how they drift.

The code is the source of truth: `perago-worker register` creates or updates a definition
per handler, carrying JSON schemas of the input (`workspace` + `params`) and output
(`workspace` + `result`) generated from the Pydantic models.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conductor.client.http.models.schema_def import SchemaDef
from conductor.client.http.models.task_def import TaskDef
from pydantic import BaseModel

from perago_worker.app import TaskOptions, TaskSpec, Worker
from perago_worker.contract import WorkspaceRef

if TYPE_CHECKING:
    from perago_worker.settings import Settings

MANAGED_FIELDS = (
    "description",
    "retry_count",
    "retry_logic",
    "retry_delay_seconds",
    "response_timeout_seconds",
    "timeout_seconds",
    "timeout_policy",
    "rate_limit_per_frequency",
    "rate_limit_frequency_in_seconds",
    "input_keys",
    "output_keys",
)
# What the worker itself relies on; retries and timeouts beyond these are the operator's call,
# so `check` does not fail a definition whose retry policy someone tuned.
COMPATIBILITY_FIELDS = ("response_timeout_seconds", "input_keys", "output_keys")
DEFAULT_OWNER = "perago-worker@localhost"
MARK = "[perago-worker]"  # ends the description of every definition this tool manages
_OWNED = re.compile(r"\[perago-worker(?: app=(?P<app>[^\]\s]+))?\]$")


def owner_mark(app_path: str | None) -> str:
    """What ends a managed definition's description: the mark, naming the app that
    registered it (`module:attribute`) when it was loaded by path."""
    return MARK if not app_path else f"[perago-worker app={app_path}]"


def owner_of(description: str | None) -> str | None:
    """The app a managed definition belongs to ("" when its mark names none), or None for a
    definition this tool does not manage."""
    match = _OWNED.search(description or "")
    if match is None:
        return None
    return match.group("app") or ""


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _envelope(spec: TaskSpec, payload: str, model: type[BaseModel]) -> dict[str, Any]:
    """`{workspace?, <payload>}`: the workspace part only for workspace tasks."""
    props: dict[str, Any] = {payload: model.model_json_schema()}
    required = [payload]
    if spec.workspace is not None:
        props["workspace"] = WorkspaceRef.model_json_schema()
        required.insert(0, "workspace")
    return _object(props, required)


def input_schema(spec: TaskSpec) -> dict[str, Any]:
    return _envelope(spec, "params", spec.params_model)


def output_schema(spec: TaskSpec) -> dict[str, Any]:
    return _envelope(spec, "result", spec.result_model)


# What a definition gets for an option neither the decorator nor the settings set.
DEFAULT_OPTIONS = TaskOptions(
    retries=3,
    retry_logic="EXPONENTIAL_BACKOFF",
    retry_delay_seconds=1,
    rate_limit_per_frequency=0,
    rate_limit_frequency_seconds=1,
)


def effective_options(
    spec: TaskSpec, settings: Settings | None = None, *, retries: int | None = None
) -> TaskOptions:
    """Pure: the options a definition gets: the `task_options` setting, then the decorator,
    then `retries` (register's `--retries`), then DEFAULT_OPTIONS."""
    override = TaskOptions()
    if settings is not None and spec.name in settings.task_options:
        override = TaskOptions(**settings.task_options[spec.name].model_dump())
    fallback = TaskOptions(retries=retries).over(DEFAULT_OPTIONS)
    return override.over(spec.options).over(fallback)


def options_sources(spec: TaskSpec, settings: Settings | None) -> dict[str, str]:
    """Where each effective option comes from: `settings`, `code` or `default`."""
    override = settings.task_options.get(spec.name) if settings is not None else None
    sources = {}
    for name in (f.name for f in dataclasses.fields(TaskOptions)):
        if override is not None and getattr(override, name) is not None:
            sources[name] = "settings"
        elif getattr(spec.options, name) is not None:
            sources[name] = "code"
        else:
            sources[name] = "default"
    return sources


def task_def_for(
    spec: TaskSpec,
    *,
    owner_email: str = DEFAULT_OWNER,
    retries: int = 3,
    settings: Settings | None = None,
) -> TaskDef:
    keys = ["workspace", "params"] if spec.workspace is not None else ["params"]
    out_keys = ["workspace", "result"] if spec.workspace is not None else ["result"]
    options = effective_options(spec, settings, retries=retries)
    total = (
        options.total_timeout_seconds
        if options.total_timeout_seconds is not None
        else spec.conductor_timeout_seconds
    )
    return TaskDef(
        name=spec.name,
        description=f"{spec.description or spec.qualname} {owner_mark(spec.app_path)}",
        retry_count=options.retries,
        retry_logic=options.retry_logic,
        retry_delay_seconds=options.retry_delay_seconds,
        response_timeout_seconds=spec.response_timeout_seconds,
        # Conductor must not time the task out before the attempt's own deadline (plus one
        # response timeout for the publish after it): a `timeout=` beyond the default wins.
        timeout_seconds=max(
            total, math.ceil(spec.timeout_seconds or 0) + spec.response_timeout_seconds
        ),
        timeout_policy="RETRY",
        rate_limit_per_frequency=options.rate_limit_per_frequency,
        rate_limit_frequency_in_seconds=options.rate_limit_frequency_seconds,
        input_keys=keys,
        output_keys=out_keys,
        owner_email=owner_email,
        input_schema=SchemaDef(
            name=f"{spec.name}-input", version=1, type="JSON", data=input_schema(spec)
        ),
        output_schema=SchemaDef(
            name=f"{spec.name}-output", version=1, type="JSON", data=output_schema(spec)
        ),
        enforce_schema=False,
    )


def describe_options(spec: TaskSpec, settings: Settings | None, definition: TaskDef) -> str:
    """One line of a task's effective options and where each comes from (`register
    --dry-run`): `retries=5 (settings)`, `concurrency=2 (code)`, ..."""
    sources = options_sources(spec, settings)
    concurrency = (
        settings.concurrency_for(spec.name, spec.options.concurrency)
        if settings is not None
        else spec.options.concurrency
    )
    if settings is not None and spec.name in settings.concurrency_per_task:
        sources["concurrency"] = "settings"
    values = {
        "concurrency": concurrency,
        "retries": definition.retry_count,
        "retry_logic": definition.retry_logic,
        "retry_delay_seconds": definition.retry_delay_seconds,
        "response_timeout_seconds": definition.response_timeout_seconds,
        "total_timeout_seconds": definition.timeout_seconds,
        "rate_limit_per_frequency": definition.rate_limit_per_frequency,
        "rate_limit_frequency_seconds": definition.rate_limit_frequency_in_seconds,
    }
    sources.setdefault("response_timeout_seconds", "code")
    return ", ".join(f"{k}={v} ({sources.get(k, 'default')})" for k, v in values.items())


@dataclass(frozen=True)
class Drift:
    task_type: str
    action: str  # "create", "update" or "ok"
    fields: dict[str, tuple[Any, Any]]  # field -> (current, desired)

    def describe(self) -> str:
        if self.action == "create":
            return f"+ {self.task_type}: create"
        if self.action == "ok":
            return f"  {self.task_type}: up to date"
        changes = ", ".join(f"{k}: {cur!r} -> {want!r}" for k, (cur, want) in self.fields.items())
        return f"~ {self.task_type}: {changes}"


def drift(
    desired: TaskDef, current: TaskDef | None, fields: tuple[str, ...] = MANAGED_FIELDS
) -> Drift:
    """Pure: what `register` would change for one task type (among `fields`)."""
    if current is None:
        return Drift(desired.name, "create", {})
    changed = {}
    for name in fields:
        want, have = getattr(desired, name), getattr(current, name)
        if isinstance(want, list):
            want, have = sorted(want), sorted(have or [])
        if want != have:
            changed[name] = (have, want)
    return Drift(desired.name, "update" if changed else "ok", changed)


@dataclass(frozen=True)
class Coverage:
    """Handlers without task definitions, and task definitions without handlers."""

    missing_definitions: list[str]
    unserved_definitions: list[str]


def coverage(app: Worker, defined: list[TaskDef]) -> Coverage:
    """Pure: compare handlers with the definitions Conductor holds.

    A definition without a handler counts only when it is this app's: `register` records
    the app in the mark it writes, so another perago app's definitions on the same Conductor
    are not "no handler" here. A mark naming no app counts only for an app loaded without a
    path (built in-process), as before the owner was recorded.
    """
    handlers = set(app.tasks)
    names = {d.name for d in defined}
    paths = {spec.app_path for spec in app.tasks.values()}
    ours = (paths.pop() or "") if len(paths) == 1 else ""
    managed = {d.name for d in defined if owner_of(d.description) == ours}
    return Coverage(sorted(handlers - names), sorted(managed - handlers))
