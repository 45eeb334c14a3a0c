"""The handlers the task benchmarks serve with a real `perago-worker run bench_app:app`.

Both see the tiny `tiny/` prefix. `bench_noop` changes nothing (the attempt ends with the
no-change path: no staging branch, no commit, no merge); `bench_write` adds one small file
with a name unique to the task, so every run merges without conflicts.
"""

from __future__ import annotations

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec

app = Worker()

NOOP_TASK = "bench_noop"
WRITE_TASK = "bench_write"


class NoParams(BaseModel):
    pass


class Written(BaseModel):
    files: int


@app.task(NOOP_TASK, workspace=WorkspaceSpec(prefix="/tiny"), response_timeout_seconds=120)
def noop(ctx: TaskContext, params: NoParams) -> Written:
    """Look at the workspace, change nothing."""
    return Written(files=0)


@app.task(WRITE_TASK, workspace=WorkspaceSpec(prefix="/tiny"), response_timeout_seconds=120)
def write_one(ctx: TaskContext, params: NoParams) -> Written:
    """Add one 64-byte file named after the task."""
    out = ctx.workspace.root / "out"
    out.mkdir(exist_ok=True)
    (out / f"{ctx.task_id}.txt").write_text(f"{ctx.workflow_id}\n".ljust(64, "."))
    return Written(files=1)
