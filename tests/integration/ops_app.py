"""Handlers for the operations tests, served by a real worker process."""

from __future__ import annotations

import hashlib
import os

from pydantic import BaseModel

from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.checks import require_glob

S = os.environ.get("PERAGO_TEST_SUFFIX", "local")
app = Worker()


class Touch(BaseModel):
    name: str


class Touched(BaseModel):
    files: int


@app.task(
    f"opsws_{S}", workspace=WorkspaceSpec(prefix="/ops"), post=[require_glob("touched/*.txt")]
)
def touch(ctx: TaskContext, params: Touch) -> Touched:
    (ctx.workspace.root / "touched").mkdir(exist_ok=True)
    (ctx.workspace.root / "touched" / f"{params.name}.txt").write_text(params.name)
    return Touched(files=sum(1 for p in ctx.workspace.root.rglob("*") if p.is_file()))


class ConfigParams(BaseModel):
    key: str


class ConfigResult(BaseModel):
    sha256: str


@app.task(f"opscfg_{S}")
def read_config(ctx: TaskContext, params: ConfigParams) -> ConfigResult:
    value = ctx.config(params.key)
    ctx.log.info("handler.read_config", key=params.key, value=value)  # masked if a secret
    return ConfigResult(sha256=hashlib.sha256(value.encode()).hexdigest())


class Options(BaseModel):
    pass


class Optioned(BaseModel):
    ok: bool


@app.task(
    f"opsopts_{S}",
    concurrency=2,
    retries=5,
    retry_logic="FIXED",
    retry_delay_seconds=7,
    total_timeout_seconds=4000,
    rate_limit=(10, 60),
)
def optioned(ctx: TaskContext, params: Options) -> Optioned:
    """Declares every per-task option its definition gets."""
    return Optioned(ok=True)
