"""Handlers for the volume tests, served by a real worker process (PERAGO_TEST_SUFFIX names them)."""

from __future__ import annotations

import os
import shutil

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.checks import require_file

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")
app = Worker()


class NoParams(BaseModel):
    pass


class Sized(BaseModel):
    files: int
    bytes: int


@app.task(
    f"vol_stream_{S}",
    workspace=WorkspaceSpec(prefix="/big"),
    pre=[require_file("input.bin")],
    post=[require_file("copy.bin")],
)
def stream_copy(ctx: TaskContext, params: NoParams) -> Sized:
    """Copy a large object in 1 MiB blocks: memory must stay flat through the whole task."""
    root = ctx.workspace.root
    with (root / "input.bin").open("rb") as src, (root / "copy.bin").open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return Sized(files=2, bytes=(root / "copy.bin").stat().st_size)


@app.task(f"vol_count_{S}", workspace=WorkspaceSpec(prefix="/many"))
def count(ctx: TaskContext, params: NoParams) -> Sized:
    root = ctx.workspace.root
    files = [p for p in root.rglob("*") if p.is_file()]
    (root / "count.txt").write_text(str(len(files)))
    return Sized(files=len(files), bytes=sum(p.stat().st_size for p in files))
