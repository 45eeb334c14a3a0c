"""Validate before taking tasks: the order is the order an operator would debug in.

settings -> handlers import -> Conductor reachable and authorized -> Conductor version
supported -> lakeFS reachable and authorized -> object data path (`lakefs.data_path`: the
API or presigned) -> each allowed repository readable and writable (a probe branch created
and deleted; for presigned transfers, the store's origin answering) -> scratch root writable
with free disk -> task definitions present and compatible. Conductor and lakeFS are probed
at the same time but reported in that order. A check that cannot run because an earlier one
failed is reported as skipped; a check that passed with a reservation is reported as a
warning (it does not stop `run`).

The preflight answers fast when a server is down: its clients retry each call for at most
`PREFLIGHT_RETRY_SECONDS` (the worker's own clients retry for 30-60 s), Conductor and lakeFS
are probed at the same time, and a failure to connect is named as such (`cannot connect to
http://host:8000: connection refused`), never as a status 0 or a raw exception.

The fences rely on Conductor behaviours that only some releases have (docs/operations.md,
"Conductor version"), so the server's version is read (`GET {url}/admin/config`, the build
properties' `version`) and compared with `SUPPORTED_CONDUCTOR`. Outside the range the check
fails unless `conductor.allow_unsupported_version` is set; a version that cannot be read is
a warning.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import urllib3

from perago_worker.app import Worker
from perago_worker.conductor import Conductor, ConductorError
from perago_worker.devstack.tools import CONDUCTOR_VERSION as TESTED_CONDUCTOR
from perago_worker.lakefs import DataPathUnavailable, LakeFS, LakeFSError, NotFound, Unauthorized
from perago_worker.lakefs.presigned import PresignedTransfers
from perago_worker.register import COMPATIBILITY_FIELDS, drift, task_def_for
from perago_worker.settings import Settings
from perago_worker.workspace import free_bytes

Version = tuple[int, int, int]

# The Conductor releases the fences are proven on: [minimum, maximum) by (major, minor, patch).
# The fences and the contract rely on behaviours read from conductor-oss: rerun resets the
# task's pollCount (WorkflowExecutorOps, from 3.31.2) and dynamic forks put `__index` into each
# forked task's input (ForkJoinDynamicTaskMapper, from 3.16.0). Only the 3.32 line is proven
# by the suite (tested: devstack.tools.CONDUCTOR_VERSION); a new minor line is supported once
# the suite has run on it.
SUPPORTED_CONDUCTOR: tuple[Version, Version] = ((3, 32, 0), (3, 33, 0))
VERSION_CHECK = "Conductor version supported"
ADMIN_CONFIG_PATH = "/admin/config"
# Retries per preflight call: a server that is down is reported in seconds, not after the
# 30-60 s a running worker rides out.
PREFLIGHT_RETRY_SECONDS = 1.0

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)\.(\d+)(?:[-+.][0-9A-Za-z.+-]*)?\s*$")


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool | None  # None: skipped
    detail: str
    warning: bool = False  # passed with a reservation: shown, but does not stop `run`

    @property
    def mark(self) -> str:
        if self.ok and self.warning:
            return "warn"
        return {True: "ok", False: "FAIL", None: "skip"}[self.ok]


def parse_version(text: object) -> Version | None:
    """(major, minor, patch) of `3.32.3`, `v3.32.3` or `3.32.3-SNAPSHOT`; None otherwise."""
    if not isinstance(text, str):
        return None
    match = _VERSION.match(text)
    if match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def version_supported(
    version: Version, bounds: tuple[Version, Version] = SUPPORTED_CONDUCTOR
) -> bool:
    low, high = bounds
    return low <= version < high


def describe_supported(bounds: tuple[Version, Version] = SUPPORTED_CONDUCTOR) -> str:
    """`>= 3.32.0, < 3.33.0 (tested: 3.32.3)`."""
    low, high = (".".join(str(p) for p in b) for b in bounds)
    return f">= {low}, < {high} (tested: {TESTED_CONDUCTOR})"


def read_server_config(conductor: Conductor, *, retry_seconds: float = 5.0) -> dict[str, Any]:
    """`GET {url}/admin/config`: Conductor's configuration plus its build properties.

    Raises what the call raises (`ConductorError` with the HTTP status, 0 when unreachable)
    and `ValueError` when the answer is not a JSON object: whatever answered is not Conductor.
    """
    api = conductor.metadata.api_client
    data = conductor.call(
        api.call_api,
        ADMIN_CONFIG_PATH,
        "GET",
        header_params={"Accept": "application/json"},
        response_type="object",
        _return_http_data_only=True,
        retry_seconds=retry_seconds,
    )
    if not isinstance(data, dict):
        raise ValueError(f"{conductor.url}{ADMIN_CONFIG_PATH} did not answer a JSON object")
    return data


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# How a connection failed, read from the text of the exception (urllib3 wraps the socket
# error in two layers, each repeating it): the first match names it.
_CONNECTION_FAILURES = (
    ("connection refused", "connection refused"),
    ("name or service not known", "host name not found"),
    ("nodename nor servname", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("connection reset", "connection reset"),
    ("timed out", "no answer (timed out)"),
)


def describe(exc: BaseException, url: str) -> str:
    """One line naming why a probe failed; a failed connection says where and how, in the
    same words for both servers (Conductor's client reports a failed connection as a
    `ConductorError` with status 0, carrying the resolver's or the socket's own words)."""
    if isinstance(exc, ConductorError) and exc.status == 0:
        text = str(exc).lower()
        for needle, what in _CONNECTION_FAILURES:
            if needle in text:
                return f"cannot connect to {url}: {what}"
        return _short(exc)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        text = str(exc).lower()
        for needle, what in _CONNECTION_FAILURES:
            if needle in text:
                return f"cannot connect to {url}: {what}"
        if isinstance(exc, urllib3.exceptions.MaxRetryError | OSError):
            return f"cannot connect to {url}: {_short(exc)}"
    return _short(exc)


def preflight_clients(settings: Settings) -> tuple[LakeFS, Conductor]:
    """The worker's clients (same endpoints, credentials, request timeouts), but retrying
    each call for at most `PREFLIGHT_RETRY_SECONDS`."""
    from perago_worker.compose import clients

    lakefs, conductor = clients(settings)
    lakefs.retry_seconds = PREFLIGHT_RETRY_SECONDS
    conductor.retry_seconds = PREFLIGHT_RETRY_SECONDS
    return lakefs, conductor


def run_preflight(
    settings: Settings,
    app: Worker | None,
    lakefs: LakeFS,
    conductor: Conductor,
    *,
    app_error: str | None = None,
) -> list[Result]:
    """Every check, in the order the module docstring lists (and operations.md's table).

    One result per check and per allowed repository, whatever fails: settings, handlers
    import, Conductor reachable and authorized, Conductor version supported, lakeFS
    reachable and authorized, object data path, repository R readable and writable (each
    R), scratch root writable with free disk, task definitions present and compatible.
    """
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

    # The two servers are probed at once: with both down, the answer takes one budget.
    with ThreadPoolExecutor(2, thread_name_prefix="preflight") as pool:
        conductor_probe = pool.submit(
            _probe,
            "Conductor reachable and authorized",
            lambda: f"{len(conductor.get_task_defs())} task definition(s) at {conductor.url}",
            conductor.url,
            "check PERAGO_CONDUCTOR__URL and the auth key/secret",
        )
        lakefs_probe = pool.submit(
            _probe,
            "lakeFS reachable and authorized",
            lambda: _lakefs_probe(lakefs),
            lakefs.endpoint,
            "check PERAGO_LAKEFS__ENDPOINT and the access key/secret",
        )
        conductor_result, lakefs_result = conductor_probe.result(), lakefs_probe.result()
    results.append(conductor_result)
    conductor_ok = bool(conductor_result.ok)
    if conductor_ok:
        results.append(
            version_check(conductor, allow_unsupported=settings.conductor.allow_unsupported_version)
        )
    else:
        results.append(Result(VERSION_CHECK, None, "skipped: Conductor unavailable"))
    results.append(lakefs_result)
    lakefs_ok = bool(lakefs_result.ok)
    if lakefs_ok:
        _step(results, DATA_PATH_CHECK, lambda: _data_path_mode(lakefs, settings))
    else:
        results.append(Result(DATA_PATH_CHECK, None, "skipped: lakeFS unavailable"))

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


def version_check(conductor: Conductor, *, allow_unsupported: bool) -> Result:
    """The server's version against `SUPPORTED_CONDUCTOR` (unreadable: a warning)."""
    supported = describe_supported()
    try:
        raw = read_server_config(conductor, retry_seconds=PREFLIGHT_RETRY_SECONDS).get("version")
    except Exception as exc:
        return Result(
            VERSION_CHECK,
            True,
            f"cannot read the server version ({_short(exc)}); supported: {supported}",
            warning=True,
        )
    version = parse_version(raw)
    if version is None:
        return Result(
            VERSION_CHECK,
            True,
            f"the server reports no usable version ({raw!r:.80}); supported: {supported}",
            warning=True,
        )
    if version_supported(version):
        return Result(VERSION_CHECK, True, f"Conductor {raw}, in the supported range {supported}")
    detail = f"Conductor {raw} is outside the supported range {supported}"
    if allow_unsupported:
        return Result(
            VERSION_CHECK,
            True,
            f"{detail}; running anyway (conductor.allow_unsupported_version): the fences are "
            "not proven on this version",
            warning=True,
        )
    return Result(
        VERSION_CHECK,
        False,
        f"{detail}: upgrade Conductor, or set PERAGO_CONDUCTOR__ALLOW_UNSUPPORTED_VERSION=true "
        "to run unproven",
    )


def _probe(name: str, probe: Callable[[], str], url: str = "", hint: str = "") -> Result:
    try:
        detail = probe()
    except Exception as exc:
        suffix = f" ({hint})" if hint else ""
        return Result(name, False, (describe(exc, url) if url else _short(exc)) + suffix)
    return Result(name, True, detail)


def _step(results: list[Result], name: str, probe: Callable[[], str], hint: str = "") -> bool:
    result = _probe(name, probe, hint=hint)
    results.append(result)
    return bool(result.ok)


def _lakefs_probe(lakefs: LakeFS) -> str:
    try:
        user = lakefs.call(lakefs.auth.get_current_user)
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
    try:
        data_path = _data_path_probe(lakefs, repository, probe)
    finally:
        lakefs.delete_branch(repository, probe)
    return f"default branch {repo.default_branch}; branch create/delete ok; {data_path}"


DATA_PATH_CHECK = "object data path"


def _data_path_mode(lakefs: LakeFS, settings: Settings) -> str:
    try:
        transfers = lakefs.transfers
    except DataPathUnavailable as exc:
        raise RuntimeError(exc.message) from None
    how = (
        "presigned, straight to the object store"
        if transfers.mode == "presign"
        else "the lakeFS API"
    )
    return f"lakefs.data_path {settings.lakefs.data_path}: object bodies travel by {how}"


def _data_path_probe(lakefs: LakeFS, repository: str, branch: str) -> str:
    """Which data path bodies take, and for presign, that the store's origin answers: a
    worker that reaches lakeFS but not the store it presigns for (a `pre_signed_endpoint`
    only reachable from elsewhere) would fail every transfer."""
    try:
        transfers = lakefs.transfers
    except DataPathUnavailable as exc:
        raise RuntimeError(exc.message) from None
    if not isinstance(transfers, PresignedTransfers):
        return "object bodies through the lakeFS API"
    try:
        origin = transfers.probe(repository, branch)
    except LakeFSError as exc:
        raise RuntimeError(f"presigned transfers unusable: {exc}") from None
    multipart = "with" if transfers.multipart else "without"
    return f"object bodies presigned, straight to the store at {origin} ({multipart} multipart)"


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
