"""Handlers for the fault suite, served by real worker processes (PERAGO_TEST_SUFFIX names them)."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")
app = Worker()


class FaultParams(BaseModel):
    tag: str
    first_attempt_sleep: float = 0.0  # seconds, only when retry_count == 0 and poll_count == 1
    sleep: float = 0.0  # seconds, every attempt
    files: int = 1
    size: int = 64
    # Conductor fills this from `${CPEWF_TASK_ID}` in tests whose input must drift per retry.
    nonce: str = ""
    # Also write `marks/<tag>/<random>.txt` naming this attempt: proof the handler ran.
    marker: bool = False
    # Also write `big/<tag>.bin`: this many bytes of `big_chunks(tag, big)` (0: none).
    big: int = 0


def big_chunks(tag: str, size: int) -> Iterator[bytes]:
    """`size` pseudo-random bytes seeded by `tag`, in 1 MiB pieces: no two parts alike."""
    rng = random.Random(tag)
    for start in range(0, size, 1 << 20):
        yield rng.randbytes(min(1 << 20, size - start))


class FaultResult(BaseModel):
    inputs: int
    written: int


def work(ctx: TaskContext, params: FaultParams) -> FaultResult:
    root = ctx.workspace.root
    inputs = sum(1 for p in root.rglob("*") if p.is_file())
    pause = params.sleep + (
        params.first_attempt_sleep if ctx.retry_count == 0 and ctx.poll_count == 1 else 0
    )
    deadline = time.monotonic() + pause
    while time.monotonic() < deadline:  # deliberately ignores cancellation: a zombie
        time.sleep(0.05)
    out = root / "out" / params.tag
    out.mkdir(parents=True, exist_ok=True)
    for i in range(params.files):
        (out / f"part-{i:04d}.txt").write_text(f"{params.tag}:{i}:".ljust(params.size, "x"))
    if params.big:
        (root / "big").mkdir(exist_ok=True)
        with (root / "big" / f"{params.tag}.bin").open("wb") as big:
            for chunk in big_chunks(params.tag, params.big):
                big.write(chunk)
    if params.marker:
        marks = root / "marks" / params.tag
        marks.mkdir(parents=True, exist_ok=True)
        (marks / f"{uuid.uuid4().hex}.txt").write_text(
            f"{ctx.task_id} {ctx.worker_id} {ctx.retry_count} {ctx.poll_count}\n"
        )
    return FaultResult(inputs=inputs, written=params.files)


app.task(f"fault_ws_{S}", workspace=WorkspaceSpec(prefix="/f"), response_timeout_seconds=6)(work)
app.task(f"fault_slow_{S}", workspace=WorkspaceSpec(prefix="/f"), response_timeout_seconds=120)(
    work
)
