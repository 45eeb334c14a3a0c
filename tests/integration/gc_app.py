"""The handler of the scheduled-gc tests, served by real worker processes."""

from __future__ import annotations

import os

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")
app = Worker()


class Write(BaseModel):
    name: str


class Written(BaseModel):
    files: int


# A short response timeout: a killed attempt's task times out within seconds.
@app.task(f"gcws_{S}", workspace=WorkspaceSpec(prefix="/gc"), response_timeout_seconds=3)
def write(ctx: TaskContext, params: Write) -> Written:
    (ctx.workspace.root / "out").mkdir(exist_ok=True)
    (ctx.workspace.root / "out" / f"{params.name}.txt").write_text(params.name)
    return Written(files=sum(1 for p in ctx.workspace.root.rglob("*") if p.is_file()))
