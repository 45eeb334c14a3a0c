"""Remove what crashed workers left behind, never what a live attempt still uses.

* Attempt folders: removed when their lock is free (the owning process is gone) and they
  are older than the threshold.
* Staging branches (`perago-stage-<task>-<created>-<uid>`): removed when older than the
  threshold and Conductor no longer shows their task in progress.
* Intent branches (`perago-intent-<key>`): the publish fence's memory. Kept while their
  workflow could still retry; removed once the workflow is terminal (or gone) and the
  intent is older than `intent_older_than`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from perago_worker import fences
from perago_worker.conductor import Conductor, ConductorError
from perago_worker.lakefs import LakeFS
from perago_worker.workspace import leftovers, remove_leftover

TERMINAL_WORKFLOW = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "TERMINATED"})


@dataclass
class GcReport:
    attempt_dirs: list[str] = field(default_factory=list)
    staging_branches: list[str] = field(default_factory=list)
    intent_branches: list[str] = field(default_factory=list)
    kept_live: list[str] = field(default_factory=list)


def collect(
    scratch_root: Path,
    lakefs: LakeFS | None,
    conductor: Conductor | None,
    repositories: list[str],
    *,
    older_than: float,
    intent_older_than: float = 7 * 86400,
    dry_run: bool = False,
) -> GcReport:
    report = GcReport()
    for leftover in leftovers(scratch_root, older_than):
        report.attempt_dirs.append(str(leftover.path))
        if not dry_run:
            remove_leftover(leftover)
    if lakefs is None or conductor is None:
        return report
    now = time.time()
    for repository in repositories:
        for name, _head in list(lakefs.list_branches(repository, fences.STAGING_PREFIX)):
            parsed = fences.parse_staging_branch(name)
            if parsed is None:
                continue
            task_id, created = parsed
            if now - created < older_than:
                continue
            state = conductor.task_state(task_id)
            if state is not None and not state.terminal:
                report.kept_live.append(f"{repository}:{name}")
                continue
            report.staging_branches.append(f"{repository}:{name}")
            if not dry_run:
                lakefs.delete_branch(repository, name)
        for name, head in list(lakefs.list_branches(repository, fences.INTENT_PREFIX)):
            commit = lakefs.get_commit(repository, head)
            if now - commit.creation_date < intent_older_than:
                continue
            workflow_id = commit.metadata.get("perago.workflow_id", "")
            try:
                status = str(conductor.get_workflow(workflow_id).status) if workflow_id else ""
            except ConductorError:
                status = ""  # gone: nothing can retry it any more
            if status and status not in TERMINAL_WORKFLOW:
                report.kept_live.append(f"{repository}:{name}")
                continue
            report.intent_branches.append(f"{repository}:{name}")
            if not dry_run:
                lakefs.delete_branch(repository, name)
    return report
