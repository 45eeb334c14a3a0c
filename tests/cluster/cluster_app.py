"""The cluster suite's handler, served by two real worker processes (PERAGO_TEST_SUFFIX names it)."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")
app = Worker()


class ClusterParams(BaseModel):
    tag: str
    sleep: float = 0.0  # seconds: long enough that both workers hold tasks at once


class ClusterResult(BaseModel):
    tag: str


@app.task(f"cluster_ws_{S}", workspace=WorkspaceSpec(prefix="/c"), response_timeout_seconds=60)
def write_own_path(ctx: TaskContext, params: ClusterParams) -> ClusterResult:
    """Writes `out/<tag>/part.txt` only: the tasks' paths are disjoint, so their merges into
    one branch never conflict, and each task's change is its own."""
    time.sleep(params.sleep)
    out = ctx.workspace.root / "out" / params.tag
    out.mkdir(parents=True, exist_ok=True)
    (out / "part.txt").write_text(f"{params.tag} by {ctx.worker_id}\n")
    return ClusterResult(tag=params.tag)
