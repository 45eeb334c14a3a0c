"""The demo handlers: ingest -> transform (on a prefix) -> summarize (workspace-free).

Also a compact example of writing handlers; see docs/handlers.md for the long version.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from pydantic import BaseModel, Field

from perago_worker import TaskContext, Worker, WorkspaceSpec
from perago_worker.checks import forbid_glob, require_dir, require_file

app = Worker()
KINDS = ("click", "view", "purchase")


class IngestParams(BaseModel):
    rows: int = Field(100, ge=1, le=1_000_000)
    seed: int = 7


class IngestResult(BaseModel):
    rows: int
    path: str


@app.task(
    "demo_ingest",
    workspace=WorkspaceSpec(prefix="/data"),
    post=[require_file("raw/events.jsonl"), forbid_glob("**/*.tmp")],
)
def ingest(ctx: TaskContext, params: IngestParams) -> IngestResult:
    """Write a batch of synthetic events to raw/events.jsonl."""
    rng = random.Random(params.seed)
    raw = ctx.workspace.root / "raw"
    raw.mkdir(exist_ok=True)
    with (raw / "events.jsonl").open("w") as out:
        for i in range(params.rows):
            out.write(json.dumps({"id": i, "kind": rng.choice(KINDS)}) + "\n")
    return IngestResult(rows=params.rows, path="data/raw/events.jsonl")


class TransformParams(BaseModel):
    pass


class TransformResult(BaseModel):
    counts: dict[str, int]


@app.task(
    "demo_transform",
    workspace=WorkspaceSpec(prefix="/data"),
    pre=[require_dir("raw"), require_file("raw/events.jsonl")],
    post=[require_file("curated/by_kind.json"), forbid_glob("**/*.tmp")],
)
def transform(ctx: TaskContext, params: TransformParams) -> TransformResult:
    """Count events by kind into curated/by_kind.json."""
    root = ctx.workspace.root
    lines = (root / "raw" / "events.jsonl").read_text().splitlines()
    counts = Counter(json.loads(line)["kind"] for line in lines)
    (root / "curated").mkdir(exist_ok=True)
    (root / "curated" / "by_kind.json").write_text(json.dumps(dict(sorted(counts.items()))))
    return TransformResult(counts=dict(counts))


class SummarizeParams(BaseModel):
    counts: dict[str, int]


class SummarizeResult(BaseModel):
    total: int
    top_kind: str


@app.task("demo_summarize")
def summarize(ctx: TaskContext, params: SummarizeParams) -> SummarizeResult:
    """Workspace-free: reduce the counts to a one-line summary."""
    top = max(params.counts, key=lambda k: params.counts[k])
    return SummarizeResult(total=sum(params.counts.values()), top_kind=top)


WORKFLOW = {
    "name": "perago_demo",
    "version": 1,
    "schemaVersion": 2,
    "ownerEmail": "perago-worker@localhost",
    "description": "ingest -> transform -> summarize, chained through output.workspace",
    "tasks": [
        {
            "name": "demo_ingest",
            "taskReferenceName": "ingest",
            "type": "SIMPLE",
            "inputParameters": {
                "workspace": "${workflow.input.workspace}",
                "params": {"rows": "${workflow.input.rows}"},
            },
        },
        {
            "name": "demo_transform",
            "taskReferenceName": "transform",
            "type": "SIMPLE",
            "inputParameters": {"workspace": "${ingest.output.workspace}", "params": {}},
        },
        {
            "name": "demo_summarize",
            "taskReferenceName": "summarize",
            "type": "SIMPLE",
            "inputParameters": {"params": {"counts": "${transform.output.result.counts}"}},
        },
    ],
    "outputParameters": {
        "workspace": "${transform.output.workspace}",
        "counts": "${transform.output.result.counts}",
        "summary": "${summarize.output.result}",
    },
}
