"""One attempt of one task, end to end, composed from the pipeline's pieces.

    validate -> (adopt?) -> materialize -> pre-check -> handler -> post-check
             -> stage -> attempt fence -> publish fence -> merge -> outcome

Every failure becomes a `TaskFailure` of a known kind; the runner turns the outcome into a
Conductor update (or, for a zombie, into silence).
"""

from __future__ import annotations

import contextlib
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from perago_worker import faultpoints, fences, publish
from perago_worker._version import __version__
from perago_worker.app import TaskSpec
from perago_worker.cache import ObjectCache
from perago_worker.changes import FileSignature, Manifest, Unpublishable, diff, scan
from perago_worker.checks import Check, run_checks
from perago_worker.conductor import Conductor
from perago_worker.context import AttemptWorkspace, Cancelled, TaskContext
from perago_worker.contract import (
    FailureKind,
    Status,
    TaskFailure,
    TaskOutput,
    TerminalError,
    WorkspaceRef,
    bound_reason,
    describe_validation_error,
    parse_input,
)
from perago_worker.lakefs import Conflict, LakeFS, NotFound
from perago_worker.materialize import materialize
from perago_worker.observability import metrics
from perago_worker.paths import relative_to_key
from perago_worker.settings import Settings
from perago_worker.workspace import AttemptDir, free_bytes


@dataclass
class Deps:
    settings: Settings
    lakefs: LakeFS
    conductor: Conductor
    cache: ObjectCache | None = None


@dataclass
class Outcome:
    status: Status
    output: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    kind: str = "ok"
    report: bool = True  # False for a zombie: it must not overwrite the live attempt's result
    verified_live: bool = False  # the attempt fence passed just now, with nothing after it


class Attempt:
    def __init__(
        self,
        spec: TaskSpec,
        raw_input: dict[str, Any],
        ctx: TaskContext,
        deps: Deps,
        still_live: Callable[[], bool] = lambda: True,
    ) -> None:
        self.spec = spec
        self.still_live = still_live  # the attempt fence, asked just before merging
        self.raw_input = raw_input
        self.ctx = ctx
        self.deps = deps
        self.log = ctx.log
        self.uid = uuid.uuid4().hex[:8]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a phase; its single closing log event carries the figures the phase adds."""
        figures: dict[str, Any] = {}
        started = time.monotonic()
        try:
            yield figures
        finally:
            seconds = time.monotonic() - started
            metrics.PHASE_SECONDS.labels(task_type=self.spec.name, phase=name).observe(seconds)
            self.log.info(f"{name}.done", seconds=round(seconds, 4), **figures)

    # -- the pipeline -------------------------------------------------------------------

    def run(self) -> Outcome:
        try:
            return self._run()
        except TaskFailure as failure:
            return Outcome(failure.status, reason=failure.reason, kind=failure.kind.value)
        except Cancelled as exc:
            return Outcome(Status.FAILED, reason=bound_reason(f"aborted: {exc}"), kind="aborted")
        except Exception as exc:
            # Handler exceptions were mapped in _handle; anything reaching here is a server,
            # disk or worker fault after the retries: retryable, and logged with its trace.
            self.log.error(
                "attempt.error", error=repr(exc), traceback=traceback.format_exc(limit=8)
            )
            wrapped = TaskFailure(FailureKind.INFRASTRUCTURE, f"{type(exc).__name__}: {exc}")
            return Outcome(Status.FAILED, reason=wrapped.reason, kind=wrapped.kind.value)

    def _run(self) -> Outcome:
        spec = self.spec
        with self.phase("validate"):
            parsed = parse_input(self.raw_input, wants_workspace=spec.workspace is not None)
            workspace = parsed.workspace
            if workspace is not None:
                self._check_repository(workspace)
            params = self._params(parsed.params)
        if workspace is None:
            result = self._handle(params)
            return Outcome(Status.COMPLETED, TaskOutput(result=result).to_conductor())
        return self._run_workspace(workspace, params, parsed.params)

    def _check_repository(self, ws: WorkspaceRef) -> None:
        settings = self.deps.settings
        if not settings.repository_allowed(ws.repository):
            raise TaskFailure(
                FailureKind.FORBIDDEN_REPOSITORY,
                f"workspace.repository: {ws.repository!r} is not a target root of environment "
                f"{settings.environment!r} (allowed: {', '.join(settings.allowed_repositories)})",
            )
        try:
            commit = self.deps.lakefs.get_commit(ws.repository, ws.ref)
        except NotFound as exc:
            what = "repository" if "repository" in exc.message.lower() else "commit"
            raise TaskFailure(
                FailureKind.UNKNOWN_REF,
                f"workspace.ref: {what} not found: repository {ws.repository!r}, ref {ws.ref!r} "
                f"({exc.message})",
            ) from None
        if commit.id != ws.ref:
            raise TaskFailure(
                FailureKind.INVALID_INPUT,
                f"workspace.ref: {ws.ref!r} is a branch, tag or abbreviation (it resolves to "
                f"commit {commit.id}); the input must be an immutable full commit id",
            )
        try:
            self.deps.lakefs.branch_head(ws.repository, ws.branch)
        except NotFound:
            raise TaskFailure(
                FailureKind.UNKNOWN_REF,
                f"workspace.branch: branch {ws.branch!r} not found in repository {ws.repository!r}",
            ) from None

    def _params(self, raw: dict[str, Any]) -> BaseModel:
        try:
            return self.spec.params_model.model_validate(raw)
        except ValidationError as exc:
            raise TaskFailure(
                FailureKind.BAD_PARAMS, describe_validation_error(exc, "params")
            ) from None

    def _handle(self, params: BaseModel) -> dict[str, Any]:
        with self.phase("handler"):
            try:
                returned = self.spec.fn(self.ctx, params)
            except TerminalError as exc:
                raise TaskFailure(FailureKind.HANDLER_TERMINAL, f"{exc}") from None
            except Cancelled:
                raise
            except TaskFailure:
                raise
            except Exception as exc:
                self.log.warning(
                    "handler.raised", error=repr(exc), traceback=traceback.format_exc(limit=8)
                )
                raise TaskFailure(
                    FailureKind.HANDLER_ERROR, f"{type(exc).__name__}: {exc}"
                ) from None
        try:
            if isinstance(returned, self.spec.result_model):
                model = self.spec.result_model.model_validate(returned.model_dump())
            else:
                model = self.spec.result_model.model_validate(returned)
        except ValidationError as exc:
            raise TaskFailure(
                FailureKind.INVALID_RESULT,
                f"handler returned a value that fails {self.spec.result_model.__name__}: "
                + describe_validation_error(exc, "result"),
            ) from None
        return model.model_dump(mode="json")

    # -- workspace tasks ----------------------------------------------------------------

    def _provenance(self, ws: WorkspaceRef) -> dict[str, str]:
        ctx = self.ctx
        return {
            "perago.workflow_id": ctx.workflow_id,
            "perago.task_id": ctx.task_id,
            "perago.task_type": ctx.task_type,
            "perago.reference_name": ctx.reference_name,
            "perago.retry_count": str(ctx.retry_count),
            "perago.attempt": str(ctx.poll_count),
            "perago.worker_id": ctx.worker_id,
            "perago.input_ref": ws.ref,
            "perago.environment": ctx.environment,
            "perago.version": __version__,
        }

    def _output(self, ws: WorkspaceRef, ref: str, result: dict[str, Any]) -> Outcome:
        out_ws = WorkspaceRef(
            repository=ws.repository, branch=ws.branch, ref_type="commit", ref=ref
        )
        return Outcome(Status.COMPLETED, TaskOutput(workspace=out_ws, result=result).to_conductor())

    def _run_workspace(
        self, ws: WorkspaceRef, params: BaseModel, raw_params: dict[str, Any]
    ) -> Outcome:
        deps, ctx, spec = self.deps, self.ctx, self.spec
        assert spec.workspace is not None
        prefix = spec.workspace.key_prefix
        key = fences.publish_key(ctx.workflow_id, ctx.reference_name, spec.name, ws.ref, raw_params)
        provenance = self._provenance(ws)
        message = f"perago: {spec.name} ({ctx.reference_name}) in workflow {ctx.workflow_id}"

        # A retry after a crash between merge and report, or a re-delivery, finds the intent
        # of the earlier attempt: finish it rather than run the handler again.
        with self.phase("fence") as figures:
            adopted = publish.adopt(deps.lakefs, ws.repository, ws.branch, key, message, provenance)
            figures["adopted"] = adopted is not None
        if adopted is not None:
            metrics.FENCE_REJECTIONS.labels(
                task_type=spec.name, fence="publish", kind="adopted_before_run"
            ).inc()
            self.log.info("publish.adopted", ref=adopted.ref, merged_now=adopted.merged)
            return self._output(ws, adopted.ref, adopted.result)

        settings = deps.settings
        if free_bytes(settings.scratch_root) < settings.min_free_disk_mb * 1024 * 1024:
            raise TaskFailure(
                FailureKind.DISK_FULL,
                f"scratch root {settings.scratch_root} has less than {settings.min_free_disk_mb} MiB free",
            )
        attempt_dir = AttemptDir.create(
            settings.scratch_root,
            ctx.task_id,
            {
                "worker_id": ctx.worker_id,
                "task_id": ctx.task_id,
                "workflow_id": ctx.workflow_id,
                "repository": ws.repository,
            },
        )
        staging = fences.staging_branch(ctx.task_id, self.uid, time.time())
        attempt_dir.record(staging_branch=staging)
        succeeded = False
        staged_branch_made = False
        manifest: Manifest = {}
        try:
            root = attempt_dir.root
            ctx._workspace = AttemptWorkspace(root, ws.repository, ws.branch, ws.ref, prefix)
            with self.phase("materialize") as figures:
                manifest, mstats = materialize(
                    deps.lakefs,
                    ws.repository,
                    ws.ref,
                    prefix,
                    root,
                    concurrency=settings.transfer_concurrency,
                    cache=deps.cache,
                    cancelled=lambda: ctx.cancelled,
                )
                figures.update(files=mstats.files, bytes=mstats.bytes, cached=mstats.cached_files)
            metrics.FILES.labels(task_type=spec.name, direction="down").inc(mstats.files)
            metrics.BYTES.labels(task_type=spec.name, direction="down").inc(mstats.bytes)
            metrics.CACHE_HITS.labels(task_type=spec.name).inc(mstats.cached_files)

            self._checks("pre_check", spec.pre, FailureKind.PRE_CHECK, "input")
            ctx.check_cancelled()
            faultpoints.hit("handler.start")
            result = self._handle(params)
            ctx.check_cancelled()
            self._checks("post_check", spec.post, FailureKind.POST_CHECK, "output")
            with self.phase("stage") as figures:
                try:
                    changes = diff(manifest, scan(root))
                except Unpublishable as exc:
                    raise TaskFailure(
                        FailureKind.UNPUBLISHABLE, f"{exc}; nothing was published"
                    ) from None
                figures["changes"] = changes.summary()
                if not changes.empty:
                    staged_branch_made = True
                    sstats = publish.stage(
                        deps.lakefs,
                        ws.repository,
                        ws.ref,
                        staging,
                        prefix,
                        root,
                        changes,
                        concurrency=settings.transfer_concurrency,
                        cancelled=lambda: ctx.cancelled,
                    )
                    staged = publish.commit_staged(
                        deps.lakefs,
                        ws.repository,
                        staging,
                        message,
                        {
                            **provenance,
                            fences.META_KEY: key,
                            fences.META_RESULT: publish.result_metadata(result),
                        },
                    )
                    figures.update(
                        files=sstats.files,
                        bytes=sstats.bytes,
                        deleted=sstats.deleted,
                        staged_commit=staged,
                    )
                    faultpoints.hit("stage.committed")
                    metrics.FILES.labels(task_type=spec.name, direction="up").inc(sstats.files)
                    metrics.BYTES.labels(task_type=spec.name, direction="up").inc(sstats.bytes)
            if changes.empty:
                # Nothing to publish: no commit, no merge; the output ref is the input ref.
                if not self.still_live():
                    return Outcome(
                        Status.FAILED, reason="attempt lost its lease", kind="zombie", report=False
                    )
                succeeded = True
                outcome = self._output(ws, ws.ref, result)
                outcome.verified_live = True
                return outcome

            with self.phase("fence") as figures:
                if ctx.cancelled or not self.still_live():
                    figures["verdict"] = "zombie"
                    return Outcome(
                        Status.FAILED,
                        reason="attempt lost its lease before merging",
                        kind="zombie",
                        report=False,
                    )
                owner = publish.claim(deps.lakefs, ws.repository, key, staged)
                figures["claimed"] = owner
            with self.phase("merge") as figures:
                if not owner:
                    metrics.FENCE_REJECTIONS.labels(
                        task_type=spec.name, fence="publish", kind="adopted_race"
                    ).inc()
                    adopted = publish.adopt(
                        deps.lakefs, ws.repository, ws.branch, key, message, provenance
                    )
                    assert adopted is not None
                    figures.update(adopted=True, ref=adopted.ref)
                    succeeded = True
                    return self._output(ws, adopted.ref, adopted.result)
                try:
                    ref, _ = publish.merge_intent(
                        deps.lakefs, ws.repository, ws.branch, key, staged, message, provenance
                    )
                except Conflict as exc:
                    deps.lakefs.delete_branch(ws.repository, fences.intent_branch(key))
                    ours = [relative_to_key(f.rel, prefix) for f in changes.uploads] + [
                        relative_to_key(r, prefix) for r in changes.deleted
                    ]
                    paths = publish.conflicting_paths(
                        deps.lakefs, ws.repository, ws.ref, ws.branch, ours
                    )
                    raise TaskFailure(
                        FailureKind.MERGE_CONFLICT,
                        f"merging into branch {ws.branch!r} conflicts on "
                        f"{', '.join(paths) or '(paths not reported)'} ({exc.message}); nothing was published",
                    ) from None
                figures["ref"] = ref
            faultpoints.hit("merge.done")
            succeeded = True
            return self._output(ws, ref, result)
        finally:
            if staged_branch_made:
                with contextlib.suppress(Exception):
                    deps.lakefs.delete_branch(ws.repository, staging)
            if deps.cache is not None and manifest:
                self._feed_cache(manifest, attempt_dir.root)
            attempt_dir.release(remove=succeeded or not settings.keep_failed_workspaces)
            ctx._workspace = None

    def _checks(self, phase: str, checks: tuple[Check, ...], kind: FailureKind, side: str) -> None:
        """Run every check (all failures named in one reason); checks never touch the result."""
        with self.phase(phase) as figures:
            failures = run_checks(checks, self.ctx.workspace.root)
            figures["failed"] = len(failures)
        if failures:
            raise TaskFailure(kind, f"{side} workspace failed: " + "; ".join(map(str, failures)))

    def _feed_cache(self, manifest: Manifest, root: Path) -> None:
        """Untouched materialized files become cache entries (linked, not copied)."""
        assert self.deps.cache is not None
        for rel, entry in manifest.items():
            path = root.joinpath(*rel.parts)
            try:
                if FileSignature.of(path.stat(follow_symlinks=False)) == entry.signature:
                    self.deps.cache.adopt(entry.checksum, entry.signature.size, path)
            except OSError:
                continue
