"""Handlers for the health tests, served by real worker processes."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from perago_worker import TaskContext, Worker

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")
app = Worker()


class Nap(BaseModel):
    seconds: float = 0.0


class Napped(BaseModel):
    slept: float


@app.task(f"healthnap_{S}")
def nap(ctx: TaskContext, params: Nap) -> Napped:
    time.sleep(params.seconds)
    return Napped(slept=params.seconds)
