"""Start a workflow at a branch head, wait for it, and say what it merged (`start`, `ref`).

A task's input takes an immutable commit id, never a branch name, so that a retry reads
what the first attempt read. A person (or a script) starting work thinks in branches: these
functions resolve the branch's head once, start the workflow with exactly the contract's
flat `workspace` input, and read back the provenance of every merge the run made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from perago_worker.conductor import Conductor
from perago_worker.contract import WorkspaceRef
from perago_worker.lakefs import LakeFS, NotFound

TERMINAL = ("COMPLETED", "FAILED", "TERMINATED", "TIMED_OUT")
WAIT_POLL_SECONDS = 0.5


class LaunchError(Exception):
    """Something a person can fix, said in one line: what is wrong and what to do."""


def require_repository(lakefs: LakeFS, repository: str) -> None:
    if not lakefs.repository_exists(repository):
        raise LaunchError(
            f"repository {repository!r} does not exist on {lakefs.endpoint}: create it "
            "(lakectl repo create) or check the name"
        )


def branch_workspace(lakefs: LakeFS, repository: str, branch: str) -> WorkspaceRef:
    """The `workspace` object for `branch`'s head: its commit, and the branch as the target."""
    require_repository(lakefs, repository)
    try:
        head = lakefs.branch_head(repository, branch)
    except NotFound:
        raise LaunchError(
            f"branch {branch!r} does not exist in repository {repository!r}: create it "
            f"(lakectl branch create lakefs://{repository}/{branch} --source ...) or check "
            "the name"
        ) from None
    return WorkspaceRef(repository=repository, branch=branch, ref_type="commit", ref=head)


def commit_workspace(lakefs: LakeFS, repository: str, ref: str, branch: str) -> WorkspaceRef:
    """The `workspace` object for a full commit id (a branch name or a short id is refused,
    as a task's input refuses it)."""
    require_repository(lakefs, repository)
    try:
        commit = lakefs.get_commit(repository, ref)
    except NotFound:
        raise LaunchError(f"no commit {ref!r} in repository {repository!r}") from None
    if commit.id != ref:
        raise LaunchError(
            f"--ref {ref!r} is a branch, tag or abbreviation (it resolves to commit "
            f"{commit.id}); give the full commit id, or use --branch"
        )
    return WorkspaceRef(repository=repository, branch=branch, ref_type="commit", ref=ref)


def workflow_input(workspace: WorkspaceRef, params: dict[str, Any]) -> dict[str, Any]:
    """What `start` sends: the flat `workspace` object and the params, nothing else."""
    return {"workspace": workspace.model_dump(), "params": params}


def start(
    conductor: Conductor,
    name: str,
    workspace: WorkspaceRef,
    params: dict[str, Any],
    *,
    version: int | None = None,
) -> str:
    """Start workflow `name` on `workspace`; its id.

    Refused before anything starts when the definition is missing, or names a task type
    with no task definition: Conductor would start the run and leave it failed on its first
    such task, which a newcomer only sees by reading the run.
    """
    which = name if version is None else f"{name} version {version}"
    definition = conductor.workflow_definition(name, version)
    if definition is None:
        raise LaunchError(
            f"no workflow definition {which!r} on {conductor.url}: register it first "
            "(PUT /api/metadata/workflow with its JSON)"
        )
    defined = {d.name for d in conductor.get_task_defs()}
    missing = sorted(set(simple_task_types(definition.get("tasks") or [])) - defined)
    if missing:
        raise LaunchError(
            f"workflow {which!r} uses task type(s) {', '.join(missing)} with no task "
            f"definition on {conductor.url}: register the app that handles them first "
            "(perago-worker register MODULE:app)"
        )
    return conductor.start_workflow(name, workflow_input(workspace, params), version=version)


def simple_task_types(tasks: list[Any]) -> Iterator[str]:
    """Pure: the task types of the SIMPLE tasks (a worker's) in a definition's task list,
    nested ones included (fork branches, switch cases, loop bodies)."""
    for task in tasks:
        if not isinstance(task, dict):
            continue
        if task.get("type", "SIMPLE") == "SIMPLE" and task.get("name"):
            yield str(task["name"])
        for branch in task.get("forkTasks") or []:
            yield from simple_task_types(branch)
        for case in (task.get("decisionCases") or {}).values():
            yield from simple_task_types(case)
        yield from simple_task_types(task.get("defaultCase") or [])
        yield from simple_task_types(task.get("loopOver") or [])


def wait(conductor: Conductor, workflow_id: str, timeout: float) -> Any:
    """The run once it is terminal; `LaunchError` when it is still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        run = conductor.get_workflow(workflow_id)
        if run.status in TERMINAL:
            return run
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"workflow {workflow_id} is still {run.status} after {timeout:g} s "
                "(is a worker serving its task types? `perago-worker check APP`)"
            )
        time.sleep(WAIT_POLL_SECONDS)


@dataclass(frozen=True)
class Merge:
    """One merge a run made: the task that made it, the commit, and its provenance."""

    task: str  # the task's reference name
    commit: str
    metadata: dict[str, str]


def merges(lakefs: LakeFS, run: Any) -> list[Merge]:
    """Every completed task whose output names a new commit: the merge and its provenance."""
    found = []
    for task in run.tasks or []:
        out = (task.output_data or {}).get("workspace")
        given = (task.input_data or {}).get("workspace")
        if task.status != "COMPLETED" or not isinstance(out, dict) or not isinstance(given, dict):
            continue
        if out.get("ref") == given.get("ref"):
            continue  # nothing changed: the output ref is the input ref
        commit = lakefs.get_commit(out["repository"], out["ref"])
        provenance = {k: v for k, v in commit.metadata.items() if k.startswith("perago.")}
        found.append(Merge(task.reference_task_name, commit.id, provenance))
    return found
