"""One attempt of one task, end to end, composed from the pipeline's pieces.

    validate -> execution -> (published or claimed? adopt) -> materialize -> pre-check
             -> handler -> post-check -> stage -> attempt fence -> claim
             -> (history + attempt fence, before every merge request) merge -> outcome

Every failure becomes a `TaskFailure` of a known kind; the runner turns the outcome into a
Conductor update (or, for a zombie, into silence).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ValidationError

from perago_worker import faultpoints, fences, invocation, links, publish
from perago_worker._version import __version__
from perago_worker.ahead import Ahead
from perago_worker.app import TaskSpec
from perago_worker.cache import ObjectCache
from perago_worker.changes import ChangeSet, Manifest, Unpublishable, diff, scan
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
from perago_worker.execution import Execution, Superseded, published, resolve
from perago_worker.fences import Incarnation, LineageError, Target
from perago_worker.lakefs import Conflict, HookRejected, LakeFS, NotFound
from perago_worker.materialize import listing_ahead, materialize
from perago_worker.observability import metrics, tracing
from perago_worker.paths import UnsafeKey, distinct_names, relative_to_key
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


class _Stale(Exception):
    """Raised while resolving: the delivery is superseded before it did anything."""


def _zombie(reason: str) -> Outcome:
    """A superseded attempt's end: it must not report (its update could overwrite the live one)."""
    return Outcome(Status.FAILED, reason=reason, kind="zombie", report=False)


# -- the handler step, shared with `perago_worker.testing` ------------------------------------
# What happens between the materialized workspace and the publish is the same whether the
# files came from lakeFS (an attempt) or from a local folder (a handler's unit test).


def validate_params(spec: TaskSpec, raw: dict[str, Any]) -> BaseModel:
    """The task's params as its model; `bad_params` (terminal) naming each field otherwise."""
    try:
        return spec.params_model.model_validate(raw)
    except ValidationError as exc:
        raise TaskFailure(
            FailureKind.BAD_PARAMS, describe_validation_error(exc, "params")
        ) from None


def call_handler(
    spec: TaskSpec, ctx: TaskContext, params: BaseModel, settings: Settings, log: Any
) -> dict[str, Any]:
    """Run the handler where its task says (`invocation`); its result as the contract's JSON,
    or the `TaskFailure` what it did maps to (`Cancelled` is raised as it is)."""
    try:
        returned = invocation.run_handler(spec, ctx, params, settings)
    except TerminalError as exc:
        raise TaskFailure(FailureKind.HANDLER_TERMINAL, f"{exc}") from None
    except invocation.DeadlineExceeded as exc:
        timeout = invocation.timeout_for(spec, settings)
        raise TaskFailure(
            FailureKind.TIMED_OUT,
            f"the attempt passed its deadline of {timeout:g} s while the handler ran; "
            f"{exc}; nothing was published",
        ) from None
    except Cancelled:
        raise
    except TaskFailure:
        raise
    except Exception as exc:
        if log is not None:
            log.warning(
                "handler.raised", error=invocation.describe(exc), traceback=invocation.trace_of(exc)
            )
        raise TaskFailure(FailureKind.HANDLER_ERROR, invocation.describe(exc)) from None
    try:
        if isinstance(returned, spec.result_model):
            model = spec.result_model.model_validate(returned.model_dump())
        else:
            model = spec.result_model.model_validate(returned)
    except ValidationError as exc:
        raise TaskFailure(
            FailureKind.INVALID_RESULT,
            f"handler returned a value that fails {spec.result_model.__name__}: "
            + describe_validation_error(exc, "result"),
        ) from None
    return model.model_dump(mode="json")


def raise_check_failures(failures: list[Any], kind: FailureKind, side: str) -> None:
    if failures:
        raise TaskFailure(kind, f"{side} workspace failed: " + "; ".join(map(str, failures)))


def require_distinct_inputs(
    manifest: Manifest, prefix: str, settings: Settings, where: str
) -> None:
    """Refuse (`unsafe_key`) two input keys one workspace cannot hold as two files."""
    try:
        distinct_names(
            (relative_to_key(rel, prefix) for rel in manifest),
            case_insensitive=settings.portable_names,
        )
    except UnsafeKey as exc:
        raise TaskFailure(
            FailureKind.UNSAFE_KEY, f"{exc}; a workspace cannot hold both as two files ({where})"
        ) from None


def publishable_changes(
    spec: TaskSpec, manifest: Manifest, root: Path, settings: Settings
) -> tuple[dict[PurePosixPath, os.stat_result], ChangeSet]:
    """What the handler left, as the scan saw it, and the change set a publish would upload
    and delete; `unpublishable` when the folder holds what cannot be published."""
    assert spec.workspace is not None
    try:
        scanned = scan(root)
        distinct_names(
            (rel.as_posix() for rel in scanned),
            case_insensitive=settings.portable_names,
            what="files",
        )
        return scanned, diff(manifest, scanned, root, verify=spec.workspace.verify)
    except (Unpublishable, UnsafeKey) as exc:
        raise TaskFailure(FailureKind.UNPUBLISHABLE, f"{exc}; nothing was published") from None


class Attempt:
    def __init__(
        self,
        spec: TaskSpec,
        raw_input: dict[str, Any],
        ctx: TaskContext,
        deps: Deps,
        still_live: Callable[[], bool] = lambda: True,
        incarnation: Incarnation | None = None,
        defer_cleanup: bool = False,
    ) -> None:
        self.spec = spec
        # Which scheduling of the task this delivery is (see `fences`); without a poll
        # (tests driving an attempt directly) the task id alone stands for it.
        self.incarnation = incarnation or Incarnation(ctx.task_id, ctx.retry_count, 0, 0)
        self.still_live = still_live  # the attempt fence, asked just before merging
        self.raw_input = raw_input
        self.ctx = ctx
        self.deps = deps
        self.log = ctx.log
        self.uid = uuid.uuid4().hex[:8]
        # With `defer_cleanup`, server-side tidying left after the outcome is known (the
        # staging branch's deletion) is not done here but collected in `cleanups`, for the
        # caller to run while it waits on something else (the runner: the report's fence).
        self.defer_cleanup = defer_cleanup
        self.cleanups: list[Callable[[], object]] = []
        # What the handler changed, once computed (the change set a publish stages): kept
        # for callers that report it, such as `perago-worker exec --publish`.
        self.changes: ChangeSet | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a phase; its single closing log event carries the figures the phase adds."""
        figures: dict[str, Any] = {}
        started = time.monotonic()
        span = tracing.phase(name)  # a child of the attempt's span; a no-op unless tracing
        error: BaseException | None = None
        try:
            yield figures
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.monotonic() - started
            metrics.PHASE_SECONDS.labels(task_type=self.spec.name, phase=name).observe(seconds)
            self.log.info(f"{name}.done", seconds=round(seconds, 4), **figures)
            span.end(figures, error)

    # -- the pipeline -------------------------------------------------------------------

    def run(self) -> Outcome:
        try:
            return self._run()
        except TaskFailure as failure:
            return Outcome(failure.status, reason=failure.reason, kind=failure.kind.value)
        except _Stale as exc:
            return _zombie(f"superseded: {exc}")
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
        return self._run_workspace(workspace, params)

    def _check_repository(self, ws: WorkspaceRef) -> None:
        settings = self.deps.settings
        if not settings.repository_allowed(ws.repository):
            raise TaskFailure(
                FailureKind.FORBIDDEN_REPOSITORY,
                f"workspace.repository: {ws.repository!r} is not a target root of environment "
                f"{settings.environment!r} (allowed: {', '.join(settings.allowed_repositories)})",
            )
        # The two reads overlap: neither depends on the other (their errors are still told
        # in this order, the commit's first).
        lakefs = self.deps.lakefs
        branch = Ahead(lambda: lakefs.branch_head(ws.repository, ws.branch), name="read-branch")
        try:
            commit = lakefs.get_commit(ws.repository, ws.ref)
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
            branch.result()
        except NotFound:
            raise TaskFailure(
                FailureKind.UNKNOWN_REF,
                f"workspace.branch: branch {ws.branch!r} not found in repository {ws.repository!r}",
            ) from None

    def _params(self, raw: dict[str, Any]) -> BaseModel:
        return validate_params(self.spec, raw)

    def _handle(self, params: BaseModel) -> dict[str, Any]:
        """Run the handler where its task says (`invocation`) and check what it returned."""
        with self.phase("handler"):
            return call_handler(self.spec, self.ctx, params, self.deps.settings, self.log)

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
            fences.META_TOKEN: ctx.delivery_token,
            "perago.input_ref": ws.ref,
            "perago.environment": ctx.environment,
            "perago.version": __version__,
            **self._workflow_link(),
        }

    def _workflow_link(self) -> dict[str, str]:
        """The Conductor workflow's UI page, for the commit's metadata (`conductor.ui_url`);
        a manual execution (`exec --publish`) has no workflow: it is marked as one instead."""
        if fences.is_manual(self.ctx.workflow_id):
            return {fences.META_MANUAL: "true"}
        url = links.workflow_url(self.deps.settings, self.ctx.workflow_id)
        return {links.META_WORKFLOW_URL: url} if url else {}

    def _commit_link(self, repository: str, ref: str) -> dict[str, str]:
        """The lakeFS commit's UI page, for a log event (`lakefs.ui_url`)."""
        url = links.commit_url(self.deps.settings, repository, ref)
        return {"commit_url": url} if url else {}

    def _output(self, ws: WorkspaceRef, ref: str, result: dict[str, Any]) -> Outcome:
        out_ws = WorkspaceRef(
            repository=ws.repository, branch=ws.branch, ref_type="commit", ref=ref
        )
        return Outcome(Status.COMPLETED, TaskOutput(workspace=out_ws, result=result).to_conductor())

    def _run_workspace(self, ws: WorkspaceRef, params: BaseModel) -> Outcome:
        deps, ctx, spec = self.deps, self.ctx, self.spec
        assert spec.workspace is not None
        prefix = spec.workspace.key_prefix
        provenance = self._provenance(ws)
        message = f"perago: {spec.name} ({ctx.reference_name}) in workflow {ctx.workflow_id}"

        # Asked for now, read by materialize: the listing overlaps the ledger's round trips.
        listing = listing_ahead(deps.lakefs, ws.repository, ws.ref, prefix)
        with self.phase("fence") as figures:
            execution = self._execution(ws, prefix)
            figures["execution"] = execution.key[:16]
            # A retry after a crash between merge and report, or a re-delivery, finds the
            # execution's merge (or its claimed, unmerged commit): finish it, don't rerun.
            # A fresh execution (no attempt ever resolved it) has nothing to find: skip the
            # two reads. The merge still checks the history and the claim before it is sent.
            record = None if execution.fresh else published(deps.lakefs, execution)
            claimed = (
                None
                if execution.fresh or record is not None
                else publish.existing_intent(deps.lakefs, execution)
            )
            figures["adopted"] = record is not None or claimed is not None
        if record is not None:
            self._adopted("published_before_run", record.commit_id, merged=False, ws=ws)
            result = publish.result_of(deps.lakefs, ws.repository, record.staged_commit)
            return self._output(ws, record.commit_id, result)
        if claimed is not None:
            faultpoints.hit("adopt.merging")
            return self._publish(execution, ws, claimed, message, provenance, adopted=True)

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
        succeeded = False
        staged_branch_made = False
        manifest: Manifest = {}
        delete_staging = functools.partial(deps.lakefs.delete_branch, ws.repository, staging)
        deleting: list[Ahead[bool]] = []

        def staging_done() -> None:
            """Once the intent holds the staged commit (or another attempt's), the staging
            branch has served: delete it beside the fence read and the merge."""
            deleting.append(Ahead(delete_staging, name="delete-staging"))

        try:
            # Inside the try: a folder whose record fails is still released (and its lock).
            attempt_dir.record(staging_branch=staging)
            root = attempt_dir.root
            ctx.bind_workspace(AttemptWorkspace(root, ws.repository, ws.branch, ws.ref, prefix))
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
                    listing=listing,
                )
                figures.update(files=mstats.files, bytes=mstats.bytes, cached=mstats.cached_files)
            metrics.FILES.labels(task_type=spec.name, direction="down").inc(mstats.files)
            metrics.BYTES.labels(task_type=spec.name, direction="down").inc(mstats.bytes)
            metrics.CACHE_HITS.labels(task_type=spec.name).inc(mstats.cached_files)
            require_distinct_inputs(
                manifest, prefix, settings, f"repository {ws.repository!r} at {ws.ref[:12]}"
            )

            self._checks("pre_check", spec.pre, FailureKind.PRE_CHECK, "input")
            ctx.check_cancelled()
            faultpoints.hit("handler.start")
            result = self._handle(params)
            ctx.check_cancelled()
            self._checks("post_check", spec.post, FailureKind.POST_CHECK, "output")
            staged: str | None = None
            with self.phase("stage") as figures:
                scanned, changes = publishable_changes(spec, manifest, root, settings)
                self.changes = changes
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
                        scanned=scanned,
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
                            fences.META_EXECUTION: execution.key,
                            fences.META_RESULT: publish.result_metadata(result),
                        },
                    )
                    figures.update(
                        files=sstats.files,
                        bytes=sstats.bytes,
                        deleted=sstats.deleted,
                        staged_commit=staged or "none (no changes)",
                    )
                    faultpoints.hit("stage.committed")
                    metrics.FILES.labels(task_type=spec.name, direction="up").inc(sstats.files)
                    metrics.BYTES.labels(task_type=spec.name, direction="up").inc(sstats.bytes)
            if changes.empty or staged is None:
                # Nothing to publish: no commit, no merge; the output ref is the input ref.
                # (A staged commit lakeFS finds empty is the same: the handler rewrote files
                # with the bytes they had.)
                if not self.still_live():
                    return _zombie("attempt lost its lease")
                succeeded = True
                outcome = self._output(ws, ws.ref, result)
                outcome.verified_live = True
                return outcome

            with self.phase("fence") as figures:
                if not self._fence():
                    figures["verdict"] = "zombie"
                    return _zombie("attempt lost its lease before merging")
            faultpoints.hit("fence.passed")
            ours = [relative_to_key(f.rel, prefix) for f in changes.uploads] + [
                relative_to_key(r, prefix) for r in changes.deleted
            ]
            outcome = self._publish(
                execution,
                ws,
                staged,
                message,
                provenance,
                adopted=False,
                ours=ours,
                result=result,
                on_claim=staging_done,
            )
            succeeded = outcome.status == Status.COMPLETED
            return outcome
        finally:
            ctx.bind_workspace(None)
            release = functools.partial(
                self._release_folder,
                attempt_dir,
                manifest,
                remove=succeeded or not settings.keep_failed_workspaces,
            )
            if staged_branch_made:
                # A publish: the report's fence read follows, which the tidying overlaps
                # (the local tidying first, then the wait for the deletion it overlaps).
                self._tidy(release)
            else:
                # No publish: a no-change completion was verified live already and reads
                # no fence before its report, so there is nothing to overlap.
                release()
            if deleting:
                self._tidy(deleting[0].result)
            elif staged_branch_made:
                self._tidy(delete_staging)

    def _tidy(self, step: Callable[[], object]) -> None:
        """Tidying left once the outcome is known: collected in `cleanups` for the runner to
        run beside the report's fence read (`defer_cleanup`), else done now. A failure is
        left to gc and the folder sweep, as it always was: it never changes the outcome."""
        if self.defer_cleanup:
            self.cleanups.append(step)
        else:
            with contextlib.suppress(Exception):
                step()

    def _release_folder(self, attempt_dir: AttemptDir, manifest: Manifest, *, remove: bool) -> None:
        """Feed the cache from the attempt's untouched files, then remove the folder."""
        if self.deps.cache is not None and manifest:
            self._feed_cache(manifest, attempt_dir.root)
        attempt_dir.release(remove=remove)

    def _execution(self, ws: WorkspaceRef, prefix: str) -> Execution:
        ctx, deps = self.ctx, self.deps
        try:
            return resolve(
                deps.conductor,
                deps.lakefs,
                workflow_id=ctx.workflow_id,
                reference_name=ctx.reference_name,
                task_type=self.spec.name,
                target=Target(ws.repository, ws.branch, prefix),
                incarnation=self.incarnation,
                input_ref=ws.ref,
                clock_skew_seconds=deps.settings.clock_skew_seconds,
            )
        except LineageError as exc:
            raise TaskFailure(
                FailureKind.INFRASTRUCTURE, f"cannot tell which execution this is: {exc}"
            ) from None
        except Superseded as exc:
            raise _Stale(str(exc)) from None

    def _fence(self) -> bool:
        """Cancellation, the attempt fence (a Conductor read-back), and cancellation again.

        The read-back can take up to its retry budget; a cancellation that lands meanwhile (the
        lease keeper finding the attempt superseded, or, before the claim, the deadline or the
        drain) must stop the request it precedes, so it is read after the fence's answer too,
        immediately before the caller sends the claim or the merge."""
        return not self.ctx.cancelled and self.still_live() and not self.ctx.cancelled

    def _adopted(self, kind: str, ref: str, *, merged: bool, ws: WorkspaceRef) -> None:
        metrics.FENCE_REJECTIONS.labels(task_type=self.spec.name, fence="publish", kind=kind).inc()
        self.log.info(
            "publish.adopted",
            ref=ref,
            merged_now=merged,
            kind=kind,
            **self._commit_link(ws.repository, ref),
        )

    def _publish(
        self,
        execution: Execution,
        ws: WorkspaceRef,
        staged: str,
        message: str,
        provenance: dict[str, str],
        *,
        adopted: bool,
        ours: list[str] | None = None,
        result: dict[str, Any] | None = None,
        on_claim: Callable[[], None] | None = None,
    ) -> Outcome:
        """Claim the execution's publish (unless adopting one) and merge it exactly once.

        `result` is the handler's own result, which the staged commit carries: when the
        claim holds that commit it is the answer, so it is not read back from lakeFS.
        `on_claim` is called once the intent branch holds the commit to merge.
        """
        deps, ctx = self.deps, self.ctx
        if not ctx.begin_publish():
            return _zombie(ctx.cancel_reason or "attempt cancelled before publishing")
        meta = {
            **provenance,
            fences.META_SLOT: execution.slot,
            fences.META_ROOT_TASK: execution.root.task_id,
            fences.META_ROOT_RETRY: str(execution.root.retry_count),
        }
        with self.phase("claim") as figures:
            if not adopted:
                claimed = publish.claim(deps.lakefs, execution, staged)
                adopted = claimed != staged
                staged = claimed
            figures["adopted"] = adopted
        if adopted:
            ours = None  # not our change set: conflicts are reported from the claimed commit
        faultpoints.hit("claim.done")
        if on_claim is not None:
            on_claim()
        merge_figures = publish.MergeFigures()
        with self.phase("merge") as figures:
            try:
                ref, merged = publish.merge_once(
                    deps.lakefs,
                    execution,
                    staged,
                    message,
                    meta,
                    fence=self._fence,
                    retry_seconds=deps.settings.merge_retry_seconds,
                    figures=merge_figures,
                    # Our own claim of a fresh execution: no merge of it can exist yet.
                    unpublished=execution.fresh and not adopted,
                )
            except publish.NotLive:
                figures["verdict"] = "zombie"
                return _zombie("attempt lost its lease immediately before merging")
            except Conflict as exc:
                publish.release_intent(deps.lakefs, execution)
                raise TaskFailure(
                    FailureKind.MERGE_CONFLICT, self._conflict(ws, exc, ours, adopted)
                ) from None
            except HookRejected as exc:
                publish.release_intent(deps.lakefs, execution)
                raise TaskFailure(
                    FailureKind.MERGE_REJECTED,
                    f"a lakeFS hook on branch {ws.branch!r} refused the merge: {exc.message}; "
                    "nothing was published",
                ) from None
            figures.update(
                ref=ref,
                merged=merged,
                tries=merge_figures.tries,
                fence_to_merge_ms=round(merge_figures.fence_to_merge_ms, 2),
                **self._commit_link(ws.repository, ref),
            )
        if merged:
            metrics.FENCE_WINDOW.labels(task_type=self.spec.name).observe(
                merge_figures.fence_to_merge_ms / 1000
            )
        if adopted or not merged:
            self._adopted(
                "adopted_claim" if adopted else "published_meanwhile", ref, merged=merged, ws=ws
            )
        faultpoints.hit("merge.done")
        if adopted or result is None:  # another attempt's commit: its result is stored there
            result = publish.result_of(deps.lakefs, ws.repository, staged)
        return self._output(ws, ref, result)

    def _conflict(
        self, ws: WorkspaceRef, exc: Conflict, ours: list[str] | None, adopted: bool
    ) -> str:
        who = "the publish claimed by an earlier attempt" if adopted else "merging"
        paths = (
            publish.conflicting_paths(self.deps.lakefs, ws.repository, ws.ref, ws.branch, ours)
            if ours
            else []
        )
        where = f" on {', '.join(paths)}" if paths else ""
        return (
            f"{who} into branch {ws.branch!r} conflicts{where} (lakeFS: {exc.message}); "
            "nothing was published"
        )

    def _checks(self, phase: str, checks: tuple[Check, ...], kind: FailureKind, side: str) -> None:
        """Run every check (all failures named in one reason); checks never touch the result."""
        with self.phase(phase) as figures:
            failures = run_checks(checks, self.ctx.workspace.root)
            figures["failed"] = len(failures)
        raise_check_failures(failures, kind, side)

    def _feed_cache(self, manifest: Manifest, root: Path) -> None:
        """Materialized files nobody touched become cache entries (hard-linked, not copied).

        Untouched is proved by the whole stat signature, ctime included (see `changes`), and
        every entry is hashed again whenever it is served, so a file changed even after this
        check can never be served. This runs while the attempt ends: a cache problem (a full
        disk, a vanished folder) is logged and must not change the attempt's outcome.
        """
        assert self.deps.cache is not None
        try:
            adopted = self.deps.cache.adopt(manifest, root)
        except Exception as exc:
            self.log.warning("cache.adopt_failed", error=repr(exc))
        else:
            self.log.debug("cache.adopted", files=adopted)
