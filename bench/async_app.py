"""I/O-bound handlers for bench/async_io.py: the same wait, as `async def` and as `def`."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

from perago_worker import TaskContext, Worker


class Wait(BaseModel):
    seconds: float = 1.0
    calls: int = 4  # the wait is this many sequential "network calls"


class Waited(BaseModel):
    calls: int


async def wait_async(ctx: TaskContext, params: Wait) -> Waited:
    for _ in range(params.calls):
        await asyncio.sleep(params.seconds / params.calls)
    return Waited(calls=params.calls)


def wait_sync(ctx: TaskContext, params: Wait) -> Waited:
    for _ in range(params.calls):
        time.sleep(params.seconds / params.calls)
    return Waited(calls=params.calls)


def build(suffix: str, *, timeout: float = 120) -> Worker:
    app = Worker()
    app.task(f"io_async_{suffix}", timeout=timeout)(wait_async)
    app.task(f"io_sync_{suffix}", timeout=timeout)(wait_sync)
    return app
