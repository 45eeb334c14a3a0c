"""The handler of the scale curve (bench/scale.py), served by real worker processes.

`scale_write_<suffix>` is a one-file workspace task: it writes 64 bytes to
`s/out/<name>.txt`, `name` being a workflow input unique to the workflow, so 400 of them
merge into one branch without a conflict. The workspace is pinned to the seed commit, so
every task materializes the same one file however many merges already landed: each task
costs the same at the start of a run and at its end. The task type carries
`PERAGO_SCALE_SUFFIX` (two runs on one Conductor never share a queue).
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec

S = os.environ.get("PERAGO_SCALE_SUFFIX", "local")
PREFIX = "/s"
TASK = f"scale_write_{S}"
WORKFLOW = f"scale_{S}"
RETRIES = 3
app = Worker()


class WriteParams(BaseModel):
    name: str


class Written(BaseModel):
    path: str


@app.task(TASK, workspace=WorkspaceSpec(prefix=PREFIX), response_timeout_seconds=120)
def write_one(ctx: TaskContext, params: WriteParams) -> Written:
    """Add one 64-byte file named by the workflow's input."""
    out = ctx.workspace.root / "out"
    out.mkdir(exist_ok=True)
    (out / f"{params.name}.txt").write_text(f"{ctx.workflow_id}\n".ljust(64, "."))
    return Written(path=f"s/out/{params.name}.txt")


def workflow(suffix: str) -> dict[str, object]:
    """The one-task workflow definition for `suffix`."""
    return {
        "name": f"scale_{suffix}",
        "version": 1,
        "schemaVersion": 2,
        "ownerEmail": "scale@localhost",
        "description": "one scale_write task: one file into the workspace's branch",
        "tasks": [
            {
                "name": f"scale_write_{suffix}",
                "taskReferenceName": "write",
                "type": "SIMPLE",
                "inputParameters": {
                    "workspace": "${workflow.input.workspace}",
                    "params": {"name": "${workflow.input.name}"},
                },
            }
        ],
    }
