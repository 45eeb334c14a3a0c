"""Conductor task definitions derived from the registered handlers, and how they drift.

The code is the source of truth: `perago-worker register` creates or updates a definition
per handler, carrying JSON schemas of the input (`workspace` + `params`) and output
(`workspace` + `result`) generated from the Pydantic models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from conductor.client.http.models.schema_def import SchemaDef
from conductor.client.http.models.task_def import TaskDef
from pydantic import BaseModel

from perago_worker.app import TaskSpec, Worker
from perago_worker.contract import WorkspaceRef

MANAGED_FIELDS = (
    "description",
    "retry_count",
    "retry_logic",
    "retry_delay_seconds",
    "response_timeout_seconds",
    "timeout_seconds",
    "timeout_policy",
    "input_keys",
    "output_keys",
)
# What the worker itself relies on; retries and timeouts beyond these are the operator's call,
# so `check` does not fail a definition whose retry policy someone tuned.
COMPATIBILITY_FIELDS = ("response_timeout_seconds", "input_keys", "output_keys")
DEFAULT_OWNER = "perago-worker@localhost"
MARK = "[perago-worker]"  # ends the description of every definition this tool manages


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


def task_def_for(spec: TaskSpec, *, owner_email: str = DEFAULT_OWNER, retries: int = 3) -> TaskDef:
    keys = ["workspace", "params"] if spec.workspace is not None else ["params"]
    out_keys = ["workspace", "result"] if spec.workspace is not None else ["result"]
    return TaskDef(
        name=spec.name,
        description=f"{spec.description or spec.qualname} {MARK}",
        retry_count=retries,
        retry_logic="EXPONENTIAL_BACKOFF",
        retry_delay_seconds=1,
        response_timeout_seconds=spec.response_timeout_seconds,
        # Conductor must not time the task out before the attempt's own deadline (plus one
        # response timeout for the publish after it): a `timeout=` beyond the default wins.
        timeout_seconds=max(
            spec.conductor_timeout_seconds,
            math.ceil(spec.timeout_seconds or 0) + spec.response_timeout_seconds,
        ),
        timeout_policy="RETRY",
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
    """Pure: compare handlers with the definitions Conductor holds (managed ones marked)."""
    handlers = set(app.tasks)
    names = {d.name for d in defined}
    managed = {d.name for d in defined if (d.description or "").endswith(MARK)}
    return Coverage(sorted(handlers - names), sorted(managed - handlers))
