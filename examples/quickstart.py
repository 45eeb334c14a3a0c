# quickstart.py
"""The quick start's handlers: ingest raw sales, clean them on a prefix, summarize the total.

    export PYTHONPATH=examples        # from the repository's root, or your own package
    perago-worker register quickstart:app
    perago-worker run quickstart:app

`ingest` and `clean` are workspace tasks (they see the repository folder `sales/` as their
root and publish what they change by a merge); `total` is workspace-free (params in, result
out). The workflow that chains them is examples/quickstart.workflow.json.
"""

from __future__ import annotations

import csv
import io

from pydantic import BaseModel, Field

from perago_worker import TaskContext, TerminalError, Worker, WorkspaceSpec
from perago_worker.checks import require_file

app = Worker()
SALES = WorkspaceSpec(prefix="/sales")


class IngestParams(BaseModel):
    rows: int = Field(10, ge=1, le=100_000)


class Ingested(BaseModel):
    rows: int


@app.task("qs_ingest", workspace=SALES, post=[require_file("raw/sales.csv")])
def ingest(ctx: TaskContext, params: IngestParams) -> Ingested:
    """Write `rows` synthetic sales to raw/sales.csv (every third one has no amount)."""
    raw = ctx.workspace.root / "raw"
    raw.mkdir(exist_ok=True)
    with (raw / "sales.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "amount"])
        for i in range(params.rows):
            writer.writerow([i, "" if i % 3 == 2 else 10 + i])
    return Ingested(rows=params.rows)


class CleanParams(BaseModel):
    min_amount: int = 0


class Cleaned(BaseModel):
    kept: int
    total: int


@app.task(
    "qs_clean",
    workspace=SALES,
    pre=[require_file("raw/sales.csv")],
    post=[require_file("clean/sales.csv")],
)
def clean(ctx: TaskContext, params: CleanParams) -> Cleaned:
    """Keep the rows with an amount of at least `min_amount` in clean/sales.csv."""
    root = ctx.workspace.root
    rows = list(csv.DictReader(io.StringIO((root / "raw" / "sales.csv").read_text())))
    if rows and "amount" not in rows[0]:
        raise TerminalError("raw/sales.csv has no amount column")
    kept = [r for r in rows if r["amount"] and int(r["amount"]) >= params.min_amount]
    (root / "clean").mkdir(exist_ok=True)
    with (root / "clean" / "sales.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["id", "amount"])
        writer.writeheader()
        writer.writerows(kept)
    return Cleaned(kept=len(kept), total=sum(int(r["amount"]) for r in kept))


class TotalParams(BaseModel):
    kept: int
    total: int


class Total(BaseModel):
    average: float


@app.task("qs_total")
def total(ctx: TaskContext, params: TotalParams) -> Total:
    """Workspace-free: the average amount of the kept rows."""
    return Total(average=params.total / params.kept if params.kept else 0.0)
