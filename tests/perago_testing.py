"""Test helpers shared by the integration and fault suites (importable: tests/ is on sys.path)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perago_worker.app import Worker
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import wait_for_workflow
from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS
from perago_worker.runner import Runner
from perago_worker.settings import ConductorSettings, LakeFSSettings, Settings


def make_settings(endpoints: Endpoints, scratch: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "lakefs": LakeFSSettings(
            endpoint=endpoints.lakefs_url,
            access_key_id=endpoints.lakefs_access_key_id,
            secret_access_key=endpoints.lakefs_secret_access_key,
        ),
        "conductor": ConductorSettings(url=endpoints.conductor_url),
        "scratch_root": scratch,
        "poll_timeout_ms": 500,
        "drain_grace_seconds": 10,
        "http_port": 0,
        "cache_max_bytes": 0,
        "min_free_disk_mb": 1,
        **overrides,
    }
    return Settings(**values)


@dataclass
class InProcessWorker:
    runner: Runner
    settings: Settings
    conductor: Conductor
    app: Worker

    def run(self, task_type: str, task_input: dict[str, Any], *, timeout: float = 120) -> Any:
        """Start a one-task workflow whose task gets exactly `task_input`; wait for its end."""
        name = one_task_workflow(self.conductor, task_type, sorted(task_input))
        workflow_id = self.conductor.start_workflow(name, task_input)
        return wait_for_workflow(self.conductor, workflow_id, timeout)


_WORKFLOWS: set[str] = set()


def one_task_workflow(
    conductor: Conductor,
    task_type: str,
    keys: list[str],
    *,
    input_parameters: dict[str, Any] | None = None,
    name: str | None = None,
) -> str:
    """A one-task workflow (reference name `only`) passing the workflow input keys through,
    or `input_parameters` as given (under `name`)."""
    name = name or f"wf_{task_type}_{'_'.join(keys) or 'none'}"
    if name not in _WORKFLOWS:
        conductor.register_workflow(
            {
                "name": name,
                "version": 1,
                "schemaVersion": 2,
                "ownerEmail": "tests@localhost",
                "tasks": [
                    {
                        "name": task_type,
                        "taskReferenceName": "only",
                        "type": "SIMPLE",
                        "inputParameters": input_parameters
                        if input_parameters is not None
                        else {k: f"${{workflow.input.{k}}}" for k in keys},
                    }
                ],
                "outputParameters": {"output": "${only.output}"},
            }
        )
        _WORKFLOWS.add(name)
    return name


def suffix() -> str:
    return uuid.uuid4().hex[:6]


def task_of(run: Any) -> Any:
    [task] = [t for t in run.tasks if t.reference_task_name == "only"]
    return task


def seed(
    lakefs: LakeFS, repo: str, files: dict[str, bytes], tmp: Path, branch: str = "main"
) -> str:
    """Commit `files` (key -> content) on `branch`; return the commit id."""
    for i, (key, content) in enumerate(files.items()):
        src = tmp / f"seed-{i}"
        src.write_bytes(content)
        lakefs.upload(repo, branch, key, src)
    return lakefs.commit(repo, branch, "seed", {}).id


def workspace(repo: str, ref: str, branch: str = "main") -> dict[str, str]:
    return {"repository": repo, "branch": branch, "ref_type": "commit", "ref": ref}


def read(lakefs: LakeFS, repo: str, ref: str, key: str, tmp: Path) -> bytes:
    dest = tmp / f"read-{uuid.uuid4().hex[:6]}"
    objs = {o.key: o for page in lakefs.list_objects(repo, ref, key) for o in page}
    lakefs.download(repo, ref, key, dest, objs[key].size)
    return dest.read_bytes()


def keys_at(lakefs: LakeFS, repo: str, ref: str, prefix: str = "") -> set[str]:
    return {o.key for page in lakefs.list_objects(repo, ref, prefix) for o in page}


def wait_until(predicate: Callable[[], bool], timeout: float = 30, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def new_repository(lakefs: LakeFS, hint: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[:40] or "repo"
    name = f"{base}-{uuid.uuid4().hex[:8]}"
    lakefs.create_repository(name)
    return name


def cli_env(endpoints: Endpoints, **extra: str) -> dict[str, str]:
    """The environment of a `perago-worker` command on the stack: this process's, without any
    `PERAGO_*` of its own, plus the stack's settings and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERAGO_")}
    env.update(endpoints.as_env())
    env.update(extra)
    return env


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`perago-worker ARGS...` as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "perago_worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def lakefs_client(endpoints: Endpoints) -> Iterator[LakeFS]:
    """The body of every session `lakefs` fixture: a client of the stack, closed after."""
    client = LakeFS(
        endpoints.lakefs_url, endpoints.lakefs_access_key_id, endpoints.lakefs_secret_access_key
    )
    yield client
    client.close()
