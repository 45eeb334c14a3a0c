"""Test handlers, scripted by their params, registered under per-module task names."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel

from perago_worker import TaskContext, TerminalError, Worker, WorkspaceSpec
from perago_worker.checks import forbid_glob, require_dir, require_file, require_glob
from perago_worker.context import NoWorkspaceError


class Op(BaseModel):
    op: Literal["write", "append", "delete", "symlink", "hardlink", "raise", "terminal", "mkdir"]
    path: str = ""
    content: str = ""
    target: str = ""


class OpsParams(BaseModel):
    ops: list[Op] = []
    bad_result: bool = False


class OpsResult(BaseModel):
    files: list[str]


def listing(root: Any) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def apply_ops(ctx: TaskContext, params: OpsParams) -> OpsResult:
    root = ctx.workspace.root
    for op in params.ops:
        path = root / op.path
        if op.op in ("write", "append"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a" if op.op == "append" else "w") as fh:
                fh.write(op.content)
        elif op.op == "delete":
            path.unlink()
        elif op.op == "mkdir":
            path.mkdir(parents=True, exist_ok=True)
        elif op.op == "symlink":
            path.symlink_to(op.target)
        elif op.op == "hardlink":
            os.link(op.target, path)
        elif op.op == "raise":
            raise ValueError(op.content or "boom")
        elif op.op == "terminal":
            raise TerminalError(op.content or "bad data")
    if params.bad_result:
        return {"files": "not-a-list"}  # type: ignore[return-value]
    return OpsResult(files=listing(root))


class FreeParams(BaseModel):
    message: str
    fail: Literal["", "raise", "terminal"] = ""


class FreeResult(BaseModel):
    echo: str
    had_workspace: bool
    error: str


def build_app(s: str) -> Worker:
    app = Worker()
    app.task(f"ops_{s}", workspace=WorkspaceSpec())(apply_ops)
    app.task(f"ops_prefix_{s}", workspace=WorkspaceSpec(prefix="/audio/render"))(apply_ops)
    app.task(
        f"checked_{s}",
        workspace=WorkspaceSpec(),
        pre=[require_dir("in")],
        post=[
            require_file("out/result.txt"),
            require_glob("out/*.txt", min_count=1),
            forbid_glob("**/*.tmp"),
        ],
    )(apply_ops)

    def free(ctx: TaskContext, params: FreeParams) -> FreeResult:
        try:
            _ = ctx.workspace
            error = ""
        except NoWorkspaceError as exc:
            error = str(exc)
        if params.fail == "raise":
            raise RuntimeError("free task failed")
        if params.fail == "terminal":
            raise TerminalError("free task refuses")
        return FreeResult(echo=params.message, had_workspace=ctx.has_workspace, error=error)

    app.task(f"free_{s}")(free)
    return app
