"""Test handlers without servers: a registered handler, run on local files as a worker would.

The counterpart of Temporal's `ActivityEnvironment`. `HandlerEnvironment(app).run(task,
params, files=...)` builds a private workspace from a dict of files (or a copy of a folder),
runs the task's pre checks, its handler (in its own isolation: a thread, the event loop for
`async def`, or a child process), its post checks, and computes the change set a publish
would upload and delete. It returns what the worker would have reported: the status, the
result as the task output carries it, or the failure kind and reason, and the change set. No
lakeFS, no Conductor: what happens after the change set (staging, fences, the merge) is the
worker's, proven on real servers by the project's own suites.

    from perago_worker.testing import HandlerEnvironment
    from mypkg.handlers import app

    def test_clean_drops_empty_rows():
        run = HandlerEnvironment(app).run(
            "clean_sales", {"min_rows": 1}, files={"raw/sales.csv": "id,amount\\n1,5\\n\\n"}
        )
        assert run.status == "COMPLETED" and run.result == {"rows": 1}
        assert run.added == ["clean/sales.csv"]

The same code decides as in a worker: params are validated by the params model (`bad_params`),
a handler's exception maps to `handler_error`, `TerminalError` to `handler_terminal`, a
result that fails the result model to `invalid_result`, checks to `pre_check`/`post_check`,
a symlink or a file the workspace cannot publish to `unpublishable`, the deadline (the
task's `timeout=`, or `timeout` here) to `timed_out`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from perago_worker import invocation
from perago_worker.app import TaskSpec, Worker
from perago_worker.attempt import (
    call_handler,
    publishable_changes,
    raise_check_failures,
    require_distinct_inputs,
    validate_params,
)
from perago_worker.changes import ChangeSet, FileSignature, Manifest, ManifestEntry, digest_fd
from perago_worker.checks import run_checks
from perago_worker.context import AttemptWorkspace, Cancelled, TaskContext
from perago_worker.contract import FailureKind, Status, TaskFailure, WorkspaceRef, bound_reason
from perago_worker.materialize import settle
from perago_worker.observability import logging as plog
from perago_worker.paths import TreeShape, UnsafeKey, key_to_relative
from perago_worker.settings import Settings

__all__ = ["FileChange", "HandlerEnvironment", "HandlerRun", "Materializer"]

# Makes a workspace: (root, the task's key prefix) -> the manifest of the files it wrote.
Materializer = Callable[[Path, str], Manifest]


@dataclass(frozen=True)
class FileChange:
    """One file a publish would upload: its key (relative to the workspace prefix) and size."""

    path: str
    size: int


@dataclass
class HandlerRun:
    """What a worker would have reported for this run, and what it would have published."""

    status: Status
    result: dict[str, Any] | None = None  # as the task output's `result` carries it
    kind: str = "ok"  # the failure kind (`FailureKind`), "ok" when it completed
    reason: str = ""  # the reasonForIncompletion the worker would send
    changes: ChangeSet | None = None  # None for a workspace-free task, or before the handler
    root: Path | None = None  # the workspace folder, when kept (`keep=True`)

    @property
    def ok(self) -> bool:
        return self.status == Status.COMPLETED

    @property
    def added(self) -> list[str]:
        return sorted(f.rel.as_posix() for f in self.changes.added) if self.changes else []

    @property
    def modified(self) -> list[str]:
        return sorted(f.rel.as_posix() for f in self.changes.modified) if self.changes else []

    @property
    def deleted(self) -> list[str]:
        return sorted(r.as_posix() for r in self.changes.deleted) if self.changes else []

    @property
    def uploads(self) -> list[FileChange]:
        """Added and modified files, with their sizes, in path order."""
        if self.changes is None:
            return []
        return sorted(
            (FileChange(f.rel.as_posix(), f.size) for f in self.changes.uploads),
            key=lambda f: f.path,
        )

    def read(self, path: str) -> bytes:
        """A file the handler left (needs `keep=True`)."""
        if self.root is None:
            raise ValueError("the workspace was not kept: run(..., keep=True)")
        return (self.root / key_to_relative(path, "")).read_bytes()


class HandlerEnvironment:
    """Runs an app's handlers on local files, with the settings a worker would give them.

    `config` and `secrets` are what `ctx.config(...)` answers (`handler_config`,
    `handler_secrets`); `settings` replaces the whole `Settings` (isolation and timeout
    defaults, `portable_names`). Workspaces live under `scratch` (a temporary folder by
    default) and are removed after each run unless it is kept.
    """

    def __init__(
        self,
        app: Worker,
        *,
        config: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        scratch: Path | None = None,
    ) -> None:
        self.app = app
        base = settings or Settings()
        self.settings = base.model_copy(
            update={
                "handler_config": {**base.handler_config, **(config or {})},
                "handler_secrets": {
                    **base.handler_secrets,
                    **{k: _secret(v) for k, v in (secrets or {}).items()},
                },
            }
        )
        self.scratch = scratch
        invocation.prepare(app.tasks.values(), self.settings)

    def run(
        self,
        task: str,
        params: Mapping[str, Any] | BaseModel | None = None,
        *,
        files: Mapping[str, bytes | str] | None = None,
        folder: Path | None = None,
        keep: bool = False,
        timeout: float | None = None,
        cancel_after: float | None = None,
        retry_count: int = 0,
    ) -> HandlerRun:
        """Run `task` once. `files` (path → bytes or text) or a copy of `folder` is the
        workspace, as the task's prefix would materialize it; `timeout` is the attempt's
        deadline (default: the task's `timeout=`, else none); `cancel_after` cancels the
        attempt that many seconds in, as a lost lease would."""
        spec = self._spec(task)
        if spec.workspace is None and (files or folder is not None):
            raise ValueError(f"task {task!r} is workspace-free: it takes no files")
        return self.run_with(
            task,
            params,
            lambda root, _prefix: _materialize(root, files, folder),
            where="the test's files",
            keep=keep,
            timeout=timeout,
            cancel_after=cancel_after,
            retry_count=retry_count,
        )

    def run_with(
        self,
        task: str,
        params: Mapping[str, Any] | BaseModel | None,
        materializer: Materializer,
        *,
        where: str,
        source: WorkspaceRef | None = None,
        keep: bool = False,
        timeout: float | None = None,
        cancel_after: float | None = None,
        retry_count: int = 0,
    ) -> HandlerRun:
        """`run` with the workspace made by `materializer(root, key_prefix)` (which returns
        the manifest of what it wrote): `perago-worker exec` materializes from lakeFS.
        `source` names the repository, branch and input ref the handler sees (`where` says
        it in a refusal)."""
        spec = self._spec(task)
        raw = (
            params.model_dump(mode="json") if isinstance(params, BaseModel) else dict(params or {})
        )
        ctx = self._context(spec, retry_count, timeout)
        timer = None
        if cancel_after is not None:
            timer = threading.Timer(cancel_after, ctx.cancel, args=("cancelled by the test",))
            timer.daemon = True
            timer.start()
        try:
            with invocation.serving_loop(spec, self.settings):
                return self._run(spec, raw, ctx, materializer, where, source, keep)
        finally:
            if timer is not None:
                timer.cancel()

    # -- the pipeline, without servers ------------------------------------------------------

    def _run(
        self,
        spec: TaskSpec,
        raw: dict[str, Any],
        ctx: TaskContext,
        materializer: Materializer,
        where: str,
        source: WorkspaceRef | None,
        keep: bool,
    ) -> HandlerRun:
        root: Path | None = None
        run = HandlerRun(Status.COMPLETED)
        try:
            params = validate_params(spec, raw)
            if spec.workspace is None:
                run.result = call_handler(spec, ctx, params, self.settings, ctx.log)
                return run
            root = self._new_root()
            prefix = spec.workspace.key_prefix
            manifest = materializer(root, prefix)
            require_distinct_inputs(manifest, prefix, self.settings, where)
            repository, branch, ref = (
                (source.repository, source.branch, source.ref)
                if source is not None
                else ("local", "test", "local")
            )
            ctx.bind_workspace(AttemptWorkspace(root, repository, branch, ref, prefix))
            raise_check_failures(run_checks(spec.pre, root), FailureKind.PRE_CHECK, "input")
            ctx.check_cancelled()
            run.result = call_handler(spec, ctx, params, self.settings, ctx.log)
            ctx.check_cancelled()
            raise_check_failures(run_checks(spec.post, root), FailureKind.POST_CHECK, "output")
            _, run.changes = publishable_changes(spec, manifest, root, self.settings)
            return run
        except TaskFailure as failure:
            return _failed(run, failure.status, failure.kind.value, failure.reason)
        except Cancelled as exc:
            return _failed(run, Status.FAILED, "aborted", bound_reason(f"aborted: {exc}"))
        finally:
            ctx.bind_workspace(None)
            if root is not None:
                if keep:
                    run.root = root
                else:
                    shutil.rmtree(root, ignore_errors=True)

    def _spec(self, task: str) -> TaskSpec:
        try:
            return self.app.tasks[task]
        except KeyError:
            known = ", ".join(sorted(self.app.tasks)) or "none"
            raise KeyError(f"no task {task!r} in this app (registered: {known})") from None

    def _context(self, spec: TaskSpec, retry_count: int, timeout: float | None) -> TaskContext:
        seconds = timeout if timeout is not None else spec.timeout_seconds
        task_id = f"test-{uuid.uuid4().hex[:12]}"
        return TaskContext(
            task_id=task_id,
            workflow_id="test-workflow",
            task_type=spec.name,
            reference_name=spec.name,
            retry_count=retry_count,
            poll_count=1,
            worker_id="test-worker",
            environment=self.settings.environment,
            delivery_token="test-worker#000000000000",  # noqa: S106 (a fence token, not a secret)
            _config=self.settings.handler_value,
            log=plog.get_logger(task_id=task_id, task_type=spec.name),
            deadline=None if seconds is None else time.monotonic() + seconds,
        )

    def _new_root(self) -> Path:
        parent = self.scratch or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="perago-test-", dir=parent))


def _secret(value: str) -> SecretStr:
    return SecretStr(value)


def _failed(run: HandlerRun, status: Status, kind: str, reason: str) -> HandlerRun:
    run.status, run.kind, run.reason, run.result = status, kind, reason, None
    return run


def _materialize(
    root: Path, files: Mapping[str, bytes | str] | None, folder: Path | None
) -> Manifest:
    """Write the workspace and its manifest as the materializer would (signature, SHA-256)."""
    items: dict[str, bytes] = {}
    if folder is not None:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
            if path.is_symlink():
                raise ValueError(f"{path}: a symbolic link cannot be an input file")
            items[path.relative_to(folder).as_posix()] = path.read_bytes()
    for key, data in (files or {}).items():
        items[key] = data.encode() if isinstance(data, str) else data
    shape = TreeShape()
    manifest: Manifest = {}
    for key, data in items.items():
        try:
            rel = key_to_relative(key, "")
            shape.add(rel)
        except UnsafeKey as exc:
            raise TaskFailure(FailureKind.UNSAFE_KEY, f"{exc}; it cannot be materialized") from None
        dest = root.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            entry = ManifestEntry(FileSignature.of(os.fstat(fd)), "", digest_fd(fd))
        finally:
            os.close(fd)
        manifest[rel] = entry
    return settle(root, manifest)
