"""Handlers of the chaos soak (bench/chaos.py), served by real worker processes.

Every handler is a pure function of its params (and, for the flaky transform, of the retry
count), so the end each workflow must reach is known before it starts: the soak's verifier
predicts it from the inputs alone and compares. The task names carry
`PERAGO_CHAOS_SUFFIX`, so two soaks (or a soak and the test suite) on one Conductor never
share a queue.

* `chaos_ingest_*`   workspace task: writes `c/wf/<tag>/raw.txt` (`rows` lines).
* `chaos_transform_*` workspace task: counts those lines into `c/wf/<tag>/curated.txt`;
  `fail="terminal"` raises `TerminalError` (FAILED_WITH_TERMINAL_ERROR, nothing merged),
  `fail="flaky"` raises a plain error on its first scheduling only (Conductor's retry, a
  new task id in the same execution, completes it).
* `chaos_summarize_*` workspace-free: reduces the transform's count.
* `chaos_clash_*`    workspace task: writes `side` into `c/clash/<pair>/value.txt`. Two
  workflows of one pair start from the same commit with different sides: whichever merges
  second meets a merge conflict (terminal `merge_conflict`).

Paths are disjoint per workflow (per pair for the clash), so nothing but the clash pairs
can conflict on the shared target branch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from perago_worker import TaskContext, TerminalError, Worker, WorkspaceSpec

S = os.environ.get("PERAGO_CHAOS_SUFFIX", "local")
PREFIX = "/c"
# Short: a task held by a worker killed with -9 is timed out and retried within seconds. The
# lease keeper of a live worker renews at half of it, so only a missed renewal times it out.
RESPONSE_TIMEOUT_SECONDS = 8
# Generous: every response timeout of a killed worker's task spends one retry.
RETRIES = 25
app = Worker()

Fail = Literal["", "terminal", "flaky"]
F = TypeVar("F", bound=Callable[..., Any])


def task_names(suffix: str) -> dict[str, str]:
    """The Conductor task type of each role, for `suffix`."""
    return {
        role: f"chaos_{role}_{suffix}" for role in ("ingest", "transform", "summarize", "clash")
    }


NAMES = task_names(S)


def _task(role: str, *, workspace: bool = True) -> Callable[[F], F]:
    """`app.task` for `role` with the soak's timeouts and retry policy (FIXED, 1 s apart)."""
    return app.task(
        NAMES[role],
        workspace=WorkspaceSpec(prefix=PREFIX) if workspace else None,
        response_timeout_seconds=RESPONSE_TIMEOUT_SECONDS,
        retries=RETRIES,
        retry_logic="FIXED",
        retry_delay_seconds=1,
    )


class IngestParams(BaseModel):
    tag: str
    rows: int = 10
    sleep: float = 0.0  # seconds in the handler: widens the window a kill can land in


class IngestResult(BaseModel):
    rows: int


def _pause(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


@_task("ingest")
def ingest(ctx: TaskContext, params: IngestParams) -> IngestResult:
    """The head of the chain: one file in the workflow's own folder."""
    _pause(params.sleep)
    folder = ctx.workspace.root / "wf" / params.tag
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "raw.txt").write_text("".join(f"{params.tag}:{i}\n" for i in range(params.rows)))
    return IngestResult(rows=params.rows)


class TransformParams(BaseModel):
    tag: str
    fail: Fail = ""
    sleep: float = 0.0


class TransformResult(BaseModel):
    lines: int


@_task("transform")
def transform(ctx: TaskContext, params: TransformParams) -> TransformResult:
    """Reads what ingest merged (its output ref is this input): a chained workspace."""
    _pause(params.sleep)
    folder = ctx.workspace.root / "wf" / params.tag
    lines = (folder / "raw.txt").read_text().splitlines()
    if params.fail == "terminal":
        raise TerminalError(f"chaos: {params.tag} fails on purpose")
    if params.fail == "flaky" and ctx.retry_count == 0:
        raise RuntimeError(f"chaos: {params.tag} fails its first scheduling on purpose")
    (folder / "curated.txt").write_text(f"{len(lines)}\n")
    return TransformResult(lines=len(lines))


class SummarizeParams(BaseModel):
    tag: str
    lines: int


class SummarizeResult(BaseModel):
    total: int


@_task("summarize", workspace=False)
def summarize(ctx: TaskContext, params: SummarizeParams) -> SummarizeResult:
    """Workspace-free: no attempt folder, no lakeFS, still killed and re-delivered."""
    return SummarizeResult(total=params.lines * 2)


class ClashParams(BaseModel):
    pair: str
    side: str


class ClashResult(BaseModel):
    side: str


@_task("clash")
def clash(ctx: TaskContext, params: ClashParams) -> ClashResult:
    """The same path from the same base as the pair's other side, with other bytes."""
    folder = ctx.workspace.root / "clash" / params.pair
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "value.txt").write_text(f"{params.pair} written by side {params.side}\n")
    return ClashResult(side=params.side)


def workflows(suffix: str) -> dict[str, dict[str, object]]:
    """The two workflow definitions (name -> definition) for `suffix`."""
    names = task_names(suffix)
    chain = f"chaos_chain_{suffix}"
    pair = f"chaos_pair_{suffix}"
    return {
        chain: {
            "name": chain,
            "version": 1,
            "schemaVersion": 2,
            "ownerEmail": "chaos@localhost",
            "description": "ingest -> transform -> summarize, chained through output.workspace",
            "tasks": [
                {
                    "name": names["ingest"],
                    "taskReferenceName": "ingest",
                    "type": "SIMPLE",
                    "inputParameters": {
                        "workspace": "${workflow.input.workspace}",
                        "params": {
                            "tag": "${workflow.input.tag}",
                            "rows": "${workflow.input.rows}",
                            "sleep": "${workflow.input.sleep}",
                        },
                    },
                },
                {
                    "name": names["transform"],
                    "taskReferenceName": "transform",
                    "type": "SIMPLE",
                    "inputParameters": {
                        "workspace": "${ingest.output.workspace}",
                        "params": {
                            "tag": "${workflow.input.tag}",
                            "fail": "${workflow.input.fail}",
                            "sleep": "${workflow.input.sleep}",
                        },
                    },
                },
                {
                    "name": names["summarize"],
                    "taskReferenceName": "summarize",
                    "type": "SIMPLE",
                    "inputParameters": {
                        "params": {
                            "tag": "${workflow.input.tag}",
                            "lines": "${transform.output.result.lines}",
                        }
                    },
                },
            ],
            "outputParameters": {
                "workspace": "${transform.output.workspace}",
                "total": "${summarize.output.result.total}",
            },
        },
        pair: {
            "name": pair,
            "version": 1,
            "schemaVersion": 2,
            "ownerEmail": "chaos@localhost",
            "description": "one side of a clash pair: the same path from the same base",
            "tasks": [
                {
                    "name": names["clash"],
                    "taskReferenceName": "clash",
                    "type": "SIMPLE",
                    "inputParameters": {
                        "workspace": "${workflow.input.workspace}",
                        "params": {
                            "pair": "${workflow.input.pair}",
                            "side": "${workflow.input.side}",
                        },
                    },
                }
            ],
            "outputParameters": {"workspace": "${clash.output.workspace}"},
        },
    }
