"""Which room a task's handler runs in, and its deadline: the task's choice, else the settings'."""

from __future__ import annotations

from typing import TYPE_CHECKING

from perago_worker.app import Isolation, TaskSpec

if TYPE_CHECKING:
    from perago_worker.settings import Settings


def isolation_for(spec: TaskSpec, settings: Settings) -> Isolation:
    return spec.isolation or settings.task_isolation


def timeout_for(spec: TaskSpec, settings: Settings) -> float:
    """The attempt's deadline in seconds from its poll: the task's, the settings', or the
    definition's own `timeoutSeconds` (Conductor times the task out then anyway)."""
    if spec.timeout_seconds is not None:
        return spec.timeout_seconds
    if settings.task_timeout_seconds is not None:
        return settings.task_timeout_seconds
    override = settings.task_options.get(spec.name)
    if override is not None and override.total_timeout_seconds is not None:
        return float(override.total_timeout_seconds)
    return float(spec.conductor_timeout_seconds)
