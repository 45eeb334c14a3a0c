"""Handlers for the deadline tests: light to import, since each handler process imports them.

They ignore cancellation on purpose (a plain `time.sleep`): a deadline must stop the
attempt without the handler's help.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from perago_worker import TaskContext


class Nap(BaseModel):
    seconds: float = 0.0
    write: str = ""
    pid_file: str = ""


class Napped(BaseModel):
    slept: float


def nap(ctx: TaskContext, params: Nap) -> Napped:
    """Writes a file, then sleeps without ever looking at its cancellation."""
    if params.pid_file:
        Path(params.pid_file).write_text(str(os.getpid()))
    if params.write:
        (ctx.workspace.root / params.write).write_text("written before the deadline")
    time.sleep(params.seconds)
    return Napped(slept=params.seconds)
