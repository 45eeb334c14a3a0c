"""The main job: a local stack, the demo definitions and workflow, a worker, one run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from perago_worker.app import Worker
from perago_worker.conductor import Conductor
from perago_worker.lakefs import LakeFS
from perago_worker.register import task_def_for

DEMO_APP = "perago_worker.devstack.demo_app:app"


def register_app(conductor: Conductor, app: Worker, *, retries: int = 3) -> None:
    """Create or update the definitions of every handler (what `perago-worker register` does)."""
    existing = {d.name for d in conductor.get_task_defs()}
    for spec in app.tasks.values():
        definition = task_def_for(spec, retries=retries)
        if spec.name in existing:
            conductor.update_task_def(definition)
        else:
            conductor.register_task_defs([definition])


def seed_repository(lakefs: LakeFS, name: str, workdir: Path) -> str:
    """A repository with one commit on `main`; returns that commit id."""
    lakefs.create_repository(name)
    readme = workdir / "README.txt"
    readme.write_text("perago demo repository\n")
    lakefs.upload(name, "main", "README.txt", readme)
    return lakefs.commit(name, "main", "seed", {"perago.demo": "seed"}).id


def wait_for_workflow(conductor: Conductor, workflow_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        run = conductor.get_workflow(workflow_id)
        if run.status not in ("RUNNING", "PAUSED") or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def run_demo(workdir: Path, *, rows: int = 1000) -> int:
    from perago_worker.devstack.demo_app import WORKFLOW, app
    from perago_worker.devstack.servers import running_stack
    from perago_worker.devstack.worker_process import start_worker

    started = time.monotonic()
    with running_stack(workdir) as stack:
        e = stack.endpoints
        lakefs = LakeFS(e.lakefs_url, e.lakefs_access_key_id, e.lakefs_secret_access_key)
        conductor = Conductor(e.conductor_url)
        repository = "demo-repo"
        seed = seed_repository(lakefs, repository, workdir)
        print(f"[demo] repository {repository}: main at {seed}")
        register_app(conductor, app)
        conductor.register_workflow(WORKFLOW)
        print(
            f"[demo] registered {len(app.tasks)} task definitions and workflow {WORKFLOW['name']}"
        )
        worker = start_worker(DEMO_APP, e, workdir, name="demo-worker")
        print(f"[demo] worker ready (health on {worker.url}, log {worker.log_path})")
        try:
            workspace = {
                "repository": repository,
                "branch": "main",
                "ref_type": "commit",
                "ref": seed,
            }
            workflow_id = conductor.start_workflow(
                str(WORKFLOW["name"]), {"workspace": workspace, "rows": rows}
            )
            print(f"[demo] started workflow {workflow_id}")
            run = wait_for_workflow(conductor, workflow_id)
        finally:
            code = worker.stop()
            print(f"[demo] worker drained and exited with {code}")
        print(f"[demo] workflow status: {run.status}")
        if run.status != "COMPLETED":
            for task in run.tasks:
                print(
                    f"  {task.reference_task_name}: {task.status} {task.reason_for_incompletion or ''}"
                )
            print(worker.tail())
            return 1
        print("[demo] final output:")
        print(json.dumps(run.output, indent=2, sort_keys=True))
        print(f"[demo] log of {repository}/main with the provenance of each merge:")
        for commit in lakefs.log(repository, "main", amount=10):
            provenance = {
                k.removeprefix("perago."): v
                for k, v in commit.metadata.items()
                if k.startswith("perago.") and k not in ("perago.execution", "perago.slot")
            }
            print(f"  {commit.id[:12]}  {commit.message}")
            for key in sorted(provenance):
                print(f"      {key}: {provenance[key]}")
        final = run.output["workspace"]["ref"]
        meta = lakefs.get_commit(repository, final).metadata
        assert meta.get("perago.task_type") == "demo_transform", meta
        print(
            f"[demo] final ref {final} carries provenance "
            f"(task {meta['perago.task_id']}, worker {meta['perago.worker_id']})"
        )
        print(f"[demo] done in {time.monotonic() - started:.1f}s")
    return 0
