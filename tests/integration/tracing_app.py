"""A workspace task for the tracing tests, served in-process and by a real worker process."""

from __future__ import annotations

import os

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.checks import require_file

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")


class Write(BaseModel):
    name: str
    fail: bool = False


class Written(BaseModel):
    bytes: int


def write(ctx: TaskContext, params: Write) -> Written:
    """Copy `in/source.txt` to `out/<name>`; refuse when asked to."""
    if params.fail:
        raise ValueError("the handler refused the input")
    root = ctx.workspace.root
    data = (root / "in" / "source.txt").read_bytes()
    (root / "out").mkdir(exist_ok=True)
    (root / "out" / params.name).write_bytes(data)
    return Written(bytes=len(data))


def build_app(task_type: str) -> Worker:
    app = Worker()
    app.task(
        task_type, workspace=WorkspaceSpec(prefix="/traced"), pre=[require_file("in/source.txt")]
    )(write)
    return app


app = build_app(f"traced_write_{S}")
