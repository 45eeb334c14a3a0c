"""A no-op handler, for bench/isolation.py: the same function served in both isolation modes."""

from __future__ import annotations

from pydantic import BaseModel

from perago_worker import TaskContext, Worker


class Empty(BaseModel):
    pass


class Done(BaseModel):
    ok: bool = True


def noop(ctx: TaskContext, params: Empty) -> Done:
    return Done()


def build(suffix: str) -> Worker:
    app = Worker()
    app.task(f"iso_thread_{suffix}", isolation="thread")(noop)
    app.task(f"iso_process_{suffix}", isolation="process")(noop)
    return app


app = build("bench")
