"""Validate before taking tasks: the order is the order an operator would debug in.

settings -> handlers import -> Conductor -> lakeFS -> each allowed repository (read and
write) -> scratch root (writable, free disk) -> task definitions present and compatible.
A check that cannot run because an earlier one failed is reported as skipped.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from perago_worker.app import Worker
from perago_worker.conductor import Conductor
from perago_worker.lakefs import LakeFS, LakeFSError, NotFound, Unauthorized
from perago_worker.register import COMPATIBILITY_FIELDS, drift, task_def_for
from perago_worker.settings import Settings
from perago_worker.workspace import free_bytes


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool | None  # None: skipped
    detail: str

    @property
    def mark(self) -> str:
        return {True: "ok", False: "FAIL", None: "skip"}[self.ok]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def run_preflight(
    settings: Settings,
    app: Worker | None,
    lakefs: LakeFS,
    conductor: Conductor,
    *,
    app_error: str | None = None,
) -> list[Result]:
    results: list[Result] = [Result("settings", True, f"environment {settings.environment}")]

    if app is not None:
        results.append(
            Result(
                "handlers import",
                True,
                f"{len(app.tasks)} handler(s): " + ", ".join(sorted(app.tasks)),
            )
        )
    else:
        results.append(Result("handlers import", False, app_error or "no APP given"))

    conductor_ok = _step(
        results,
        "Conductor reachable and authorized",
        lambda: f"{len(conductor.get_task_defs())} task definition(s) at {conductor.url}",
        hint="check PERAGO_CONDUCTOR__URL and the auth key/secret",
    )
    lakefs_ok = _step(
        results,
        "lakeFS reachable and authorized",
        lambda: _lakefs_probe(lakefs),
        hint="check PERAGO_LAKEFS__ENDPOINT and the access key/secret",
    )

    for repository in settings.allowed_repositories:
        name = f"repository {repository} readable and writable"
        if not lakefs_ok:
            results.append(Result(name, None, "skipped: lakeFS unavailable"))
            continue
        _step(results, name, lambda r=repository: _repository_probe(lakefs, r))  # type: ignore[misc]

    _step(results, "scratch root writable with free disk", lambda: _scratch_probe(settings))

    name = "task definitions present and compatible"
    if app is None or not conductor_ok:
        results.append(Result(name, None, "skipped: needs the handlers and Conductor"))
    else:
        _step(results, name, lambda: _definitions_probe(app, conductor))
    return results


def _step(results: list[Result], name: str, probe: Callable[[], str], hint: str = "") -> bool:
    try:
        detail = probe()
    except Exception as exc:
        suffix = f" ({hint})" if hint else ""
        results.append(Result(name, False, _short(exc) + suffix))
        return False
    results.append(Result(name, True, detail))
    return True


def _lakefs_probe(lakefs: LakeFS) -> str:
    try:
        user = lakefs.call(lakefs._auth_api().get_current_user)
    except Unauthorized as exc:
        raise RuntimeError(f"lakeFS rejected the credentials ({exc.status})") from None
    return f"signed in as {user.user.id} at {lakefs.endpoint}"


def _repository_probe(lakefs: LakeFS, repository: str) -> str:
    try:
        repo = lakefs.call(lakefs.repos.get_repository, repository)
    except NotFound:
        raise RuntimeError(f"repository {repository!r} does not exist") from None
    except LakeFSError as exc:
        raise RuntimeError(f"cannot read repository {repository!r}: {exc.message}") from None
    probe = f"perago-preflight-{uuid.uuid4().hex[:10]}"
    try:
        lakefs.create_branch(repository, probe, repo.default_branch, hidden=True)
    except LakeFSError as exc:
        raise RuntimeError(f"cannot create a branch in {repository!r}: {exc.message}") from None
    lakefs.delete_branch(repository, probe)
    return f"default branch {repo.default_branch}; branch create/delete ok"


def _scratch_probe(settings: Settings) -> str:
    root = settings.scratch_root
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".preflight-") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise RuntimeError(f"scratch root {root} is not writable: {exc.strerror or exc}") from None
    free_mb = free_bytes(root) // (1024 * 1024)
    if free_mb < settings.min_free_disk_mb:
        raise RuntimeError(
            f"scratch root {root} has {free_mb} MiB free, below the floor of "
            f"{settings.min_free_disk_mb} MiB"
        )
    return f"{root}: {free_mb} MiB free"


def _definitions_probe(app: Worker, conductor: Conductor) -> str:
    current = {d.name: d for d in conductor.get_task_defs()}
    problems = []
    for spec in app.tasks.values():
        d = drift(task_def_for(spec), current.get(spec.name), COMPATIBILITY_FIELDS)
        if d.action == "create":
            problems.append(f"{spec.name} has no task definition")
        elif d.action == "update":
            problems.append(f"{spec.name} differs ({', '.join(d.fields)})")
    if problems:
        raise RuntimeError("; ".join(problems) + " (run `perago-worker register APP`)")
    return f"{len(app.tasks)} definition(s) match the code"
