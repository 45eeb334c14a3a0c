"""Handlers `perago-worker exec` runs in tests/integration/test_exec.py (imported by path)."""

from __future__ import annotations

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.checks import forbid_glob, require_file

app = Worker()


class Edit(BaseModel):
    fail: bool = False


class Edited(BaseModel):
    lines: int


@app.task("exec_edit", workspace=WorkspaceSpec(prefix="/x"), pre=[require_file("in.txt")])
def edit(ctx: TaskContext, params: Edit) -> Edited:
    root = ctx.workspace.root
    if params.fail:
        raise ValueError("the input is not what I expected")
    text = (root / "in.txt").read_text()
    (root / "in.txt").write_text(text.upper())
    (root / "out.txt").write_text(text[::-1])
    (root / "old.txt").unlink()
    return Edited(lines=len(text.splitlines()))


class Hello(BaseModel):
    name: str


class Said(BaseModel):
    text: str


@app.task("exec_hello")
def hello(ctx: TaskContext, params: Hello) -> Said:
    return Said(text=f"hello {params.name}")


class Note(BaseModel):
    name: str
    text: str = "note"
    fail: bool = False
    leave_tmp: bool = False


class Noted(BaseModel):
    path: str


@app.task("exec_note", workspace=WorkspaceSpec(prefix="/notes"), post=[forbid_glob("**/*.tmp")])
def note(ctx: TaskContext, params: Note) -> Noted:
    """Writes `notes/<name>.txt`: what `exec --publish` publishes in test_exec_publish.py."""
    path = ctx.workspace.root / f"{params.name}.txt"
    path.write_text(params.text)
    if params.leave_tmp:
        (ctx.workspace.root / "half.tmp").write_text("half-written")
    if params.fail:
        raise ValueError("refusing on purpose")
    return Noted(path=f"notes/{params.name}.txt")
