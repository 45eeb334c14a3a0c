"""The handlers the task benchmarks serve with a real `perago-worker run bench_app:app`.

Both see the tiny `tiny/` prefix. `bench_noop` changes nothing (the attempt ends with the
no-change path: no staging branch, no commit, no merge); `bench_write` adds one small file
with a name unique to the task, so every run merges without conflicts.

With `PERAGO_BENCH_CALLS=<file>` in its environment the worker also records every HTTP
round trip it makes (bench/_calls.py) into that file when it exits: the call list per task;
with `PERAGO_BENCH_PROFILE=<file>`, a cProfile of every thread it starts (pstats).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec

if os.environ.get("PERAGO_BENCH_CALLS"):
    import _calls

    _calls.install(Path(os.environ["PERAGO_BENCH_CALLS"]))
if os.environ.get("PERAGO_BENCH_PROFILE"):
    import _calls

    _calls.install_profile(Path(os.environ["PERAGO_BENCH_PROFILE"]))

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
