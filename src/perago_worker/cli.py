"""`perago-worker`: run, check, register, gc, config show.

Errors are one clear line on stderr and a non-zero exit, not a traceback (unless --debug).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perago_worker._version import __version__
from perago_worker.app import Worker
from perago_worker.cache import ObjectCache
from perago_worker.compose import CliError, clients, load_settings, load_worker, setup_tracing

if TYPE_CHECKING:
    from perago_worker.conductor import Conductor
    from perago_worker.gc import PeriodicGc
    from perago_worker.lakefs import LakeFS
    from perago_worker.settings import Settings

# Lifecycle states in which the daemon's gc schedule stops: no round starts during a drain.
SHUTTING_DOWN = frozenset({"draining", "stopped", "failed"})


def cmd_run(args: argparse.Namespace) -> int:
    if args.processes > 1:
        from perago_worker.supervisor import supervise

        settings = load_settings(args.config)
        return supervise(
            args.app,
            settings,
            processes=args.processes,
            skip_preflight=args.skip_preflight,
            config=args.config,
            gc_every=gc_interval(args, settings),
        )
    return _run_single(args)


def gc_interval(args: argparse.Namespace, settings: Settings) -> float:
    """Seconds between the daemon's gc rounds (`--gc-every`, else `gc_every_seconds`); 0: off.

    A supervised child never collects: with `--processes N` the supervisor alone does.
    """
    if getattr(args, "child", False):
        return 0.0
    every = getattr(args, "gc_every", None)
    return float(settings.gc_every_seconds if every is None else every)


def start_periodic_gc(
    args: argparse.Namespace,
    settings: Settings,
    lakefs: LakeFS,
    conductor: Conductor,
    log: Any,
    stop_when: Callable[[], bool],
) -> PeriodicGc | None:
    """The daemon's gc schedule (`perago_worker.gc.PeriodicGc`), or None when it is off."""
    from perago_worker.gc import schedule

    every = gc_interval(args, settings)
    if every <= 0:
        return None
    return schedule(settings, lakefs, conductor, every=every, log=log, stop_when=stop_when)


def _run_single(args: argparse.Namespace) -> int:
    from perago_worker.app import RegistrationError
    from perago_worker.attempt import Deps
    from perago_worker.observability import logging as plog
    from perago_worker.observability import tracing
    from perago_worker.observability.health import HealthServer
    from perago_worker.preflight import preflight_clients, run_preflight
    from perago_worker.register import coverage
    from perago_worker.runner import Lifecycle, Runner

    settings = load_settings(args.config)
    plog.configure(settings.log_level, settings.log_format, plog.secret_values(settings))
    log = plog.get_logger(worker_id=settings.worker_id)
    if setup_tracing(settings):
        log.info(
            "tracing.enabled",
            endpoint=tracing.safe_endpoint(
                tracing.traces_endpoint(settings.tracing.otlp_endpoint or "")
            ),
            service_name=settings.tracing.service_name,
            sample_ratio=settings.tracing.sample_ratio,
        )
    lifecycle = Lifecycle()
    app = load_worker(args.app)
    lakefs, conductor = clients(settings)
    cache = (
        ObjectCache(settings.scratch_root / ".cache", settings.cache_max_bytes, settings.cache_mode)
        if settings.cache_max_bytes > 0
        else None
    )
    try:
        runner = Runner(app, Deps(settings, lakefs, conductor, cache), lifecycle)
    except RegistrationError as exc:  # e.g. a process-isolated handler a child cannot import
        raise CliError(str(exc)) from None

    def status() -> dict[str, Any]:
        try:
            cov = coverage(app, conductor.get_task_defs())
            view: dict[str, Any] = {
                "handlers_without_definitions": cov.missing_definitions,
                "definitions_without_handlers": cov.unserved_definitions,
            }
        except Exception as exc:
            view = {"definitions": f"unavailable: {exc}"}
        return {
            "worker_id": settings.worker_id,
            "environment": settings.environment,
            "in_flight": runner.in_flight(),
            "handlers": sorted(app.tasks),
            **runner.health(),
            **view,
        }

    health = None
    if not args.child:  # a supervised child: the supervisor serves health and metrics
        health = HealthServer(settings.http_host, settings.http_port, lifecycle, status)
        health.start()
    log.info(
        "worker.starting",
        version=__version__,
        app=args.app,
        http_port=health.port if health else None,
    )
    lifecycle.set("validating")
    if args.skip_preflight:
        lifecycle.preflight = "skipped"  # reported as such: /status says "skipped", not ok
    else:
        results = run_preflight(settings, app, *preflight_clients(settings))
        for r in results:
            log.info("preflight", check=r.name, result=r.mark, detail=r.detail)
        if any(r.ok is False for r in results):
            lifecycle.preflight = "failed"
            failed = next(r for r in results if r.ok is False)
            lifecycle.fail(f"preflight failed: {failed.name}: {failed.detail}")
            raise CliError(f"preflight failed: {failed.name}: {failed.detail}")
        lifecycle.preflight = "passed"
    periodic_gc = start_periodic_gc(
        args, settings, lakefs, conductor, log, lambda: lifecycle.state in SHUTTING_DOWN
    )
    try:
        return runner.run_forever()
    finally:
        if periodic_gc is not None:
            periodic_gc.stop()
        if health is not None:
            health.stop()
        tracing.shutdown()  # exports the spans still buffered


def cmd_check(args: argparse.Namespace) -> int:
    from perago_worker.preflight import preflight_clients, run_preflight

    settings = load_settings(args.config)
    app: Worker | None = None
    app_error = None
    try:
        app = load_worker(args.app)
    except CliError as exc:
        app_error = str(exc)
    lakefs, conductor = preflight_clients(settings)  # small retry budgets: answers in seconds
    results = run_preflight(settings, app, lakefs, conductor, app_error=app_error)
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.mark:<5} {r.name:<{width}}  {r.detail}")
    return 1 if any(r.ok is False for r in results) else 0


def cmd_register(args: argparse.Namespace) -> int:
    from perago_worker.register import describe_options, drift, task_def_for

    settings = load_settings(args.config)
    app = load_worker(args.app)
    _, conductor = clients(settings)
    current = {d.name: d for d in conductor.get_task_defs()}
    plans = [
        (task_def_for(spec, retries=args.retries, settings=settings), spec)
        for spec in app.tasks.values()
    ]
    for desired, spec in plans:
        d = drift(desired, current.get(desired.name))
        print(d.describe())
        if args.dry_run:
            print("    " + describe_options(spec, settings, desired))
        if args.dry_run or d.action == "ok":
            continue
        if d.action == "create":
            conductor.register_task_defs([desired])
        else:
            conductor.update_task_def(desired)
    if args.dry_run:
        print("(dry run: nothing changed)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from perago_worker.gc import collect_configured

    settings = load_settings(args.config)
    lakefs, conductor = clients(settings)
    report = collect_configured(
        settings,
        lakefs,
        conductor,
        repositories=args.repository,
        older_than=args.older_than,
        intent_older_than=args.intent_older_than,
        ledger_older_than=args.ledger_older_than,
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    for label, items in (
        ("attempt folder", report.attempt_dirs),
        ("staging branch", report.staging_branches),
        ("intent branch", report.intent_branches),
        ("ledger entry", report.ledger_entries),
    ):
        for item in items:
            print(f"{verb} {label} {item}")
    for item in report.kept_live:
        print(f"kept (live) {item}")
    for item in report.unverifiable:
        reason = report.unverifiable_reasons.get(item, "")
        print(f"kept (unverifiable) {item}" + (f": {reason}" if reason else ""))
    print(
        f"{verb}: {len(report.attempt_dirs)} attempt folder(s), "
        f"{len(report.staging_branches)} staging branch(es), "
        f"{len(report.intent_branches)} intent branch(es), "
        f"{len(report.ledger_entries)} ledger entries; "
        f"kept {len(report.kept_live)} live, {len(report.unverifiable)} unverifiable"
    )
    return 0


def _params_arg(text: str) -> dict[str, Any]:
    """`--params '{"rows": 10}'` or `--params @params.json`."""
    raw = text
    if text.startswith("@"):
        try:
            raw = Path(text[1:]).read_text()
        except OSError as exc:
            raise CliError(f"--params {text}: cannot read the file: {exc.strerror}") from None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"--params: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CliError(f"--params must be a JSON object, got {type(value).__name__}")
    return value


def cmd_ref(args: argparse.Namespace) -> int:
    from perago_worker.launch import LaunchError, branch_workspace

    settings = load_settings(args.config)
    lakefs, _ = clients(settings)
    try:
        workspace = branch_workspace(lakefs, args.repository, args.branch)
    except LaunchError as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(workspace.model_dump()))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from perago_worker.launch import LaunchError, branch_workspace, merges, start, wait

    settings = load_settings(args.config)
    lakefs, conductor = clients(settings)
    params = _params_arg(args.params) if args.params else {}
    try:
        workspace = branch_workspace(lakefs, args.repository, args.branch)
        workflow_id = start(conductor, args.workflow, workspace, params, version=args.version)
        # The note on stderr: `id=$(perago-worker start ...)` captures the id alone.
        print(
            f"started {args.workflow} as {workflow_id} at {args.repository}/{args.branch} "
            f"({workspace.ref[:12]})",
            file=sys.stderr,
            flush=True,
        )
        if not args.wait:
            print(workflow_id)
            return 0
    except LaunchError as exc:
        raise CliError(str(exc)) from None
    try:
        run = wait(conductor, workflow_id, args.timeout)
    except LaunchError as exc:  # it started: not a usage error (2), the run did not finish
        print(f"perago-worker: {exc}", file=sys.stderr)
        return 1
    print(f"workflow {workflow_id}: {run.status}")
    if run.status != "COMPLETED":
        failed = [t for t in run.tasks or [] if t.status not in ("COMPLETED", "SCHEDULED")]
        for task in failed:
            print(f"  {task.reference_task_name}: {task.status}: {task.reason_for_incompletion}")
    print(json.dumps(run.output or {}, indent=2, sort_keys=True))
    for merge in merges(lakefs, run):
        print(f"merge by {merge.task}: {merge.commit}")
        for key, value in sorted(merge.metadata.items()):
            print(f"  {key}: {value}")
    return 0 if run.status == "COMPLETED" else 1


def cmd_exec(args: argparse.Namespace) -> int:
    """One task, once, without Conductor: materialize from lakeFS, checks, handler, checks,
    and the change set a publish would make; with `--publish`, the whole attempt pipeline
    through the same fences as a task (`perago_worker.manual`)."""
    from perago_worker.launch import LaunchError, branch_workspace, commit_workspace
    from perago_worker.observability import logging as plog

    settings = load_settings(args.config)
    # Logs (masked) to stderr, as the worker's: stdout is the report, JSON for scripts.
    plog.configure(settings.log_level, settings.log_format, plog.secret_values(settings))
    if args.publish and args.keep:
        raise CliError(
            "--keep inspects a dry run's folder; a published run's record is its merge "
            "commit (drop --keep, or run without --publish to keep the folder)"
        )
    if args.execution_id and not args.publish:
        raise CliError("--execution-id continues a published run: it needs --publish")
    app = load_worker(args.app)
    if args.task not in app.tasks:
        known = ", ".join(sorted(app.tasks)) or "none"
        raise CliError(f"{args.app} has no task {args.task!r} (registered: {known})")
    spec = app.tasks[args.task]
    params = _params_arg(args.params) if args.params else {}
    lakefs, conductor = clients(settings)
    try:
        if spec.workspace is None:
            source = None
        elif not (args.ref or args.branch):
            raise CliError(f"task {args.task!r} has a workspace: give --ref COMMIT or --branch B")
        elif args.ref and args.publish and not args.branch:
            raise CliError("--publish merges into a branch: give --branch B with --ref COMMIT")
        elif args.ref:
            source = commit_workspace(lakefs, args.repository, args.ref, args.branch or "main")
        else:
            source = branch_workspace(lakefs, args.repository, args.branch)
    except LaunchError as exc:
        raise CliError(str(exc)) from None
    if source is not None and not settings.repository_allowed(source.repository):
        raise CliError(f"repository {source.repository!r} is not in allowed_repositories")
    if args.publish:
        return _exec_publish(args, spec, source, params, settings, lakefs, conductor)
    return _exec_dry_run(args, app, source, params, settings, lakefs)


def _exec_dry_run(
    args: argparse.Namespace,
    app: Worker,
    source: Any,
    params: dict[str, Any],
    settings: Settings,
    lakefs: LakeFS,
) -> int:
    from perago_worker.materialize import materialize
    from perago_worker.testing import HandlerEnvironment

    def from_lakefs(root: Path, prefix: str) -> Any:
        assert source is not None
        manifest, _ = materialize(
            lakefs,
            source.repository,
            source.ref,
            prefix,
            root,
            concurrency=settings.transfer_concurrency,
        )
        return manifest

    env = HandlerEnvironment(app, settings=settings, scratch=settings.scratch_root / "exec")
    where = f"repository {args.repository!r} at {source.ref[:12]}" if source else "none"
    run = env.run_with(args.task, params, from_lakefs, where=where, source=source, keep=args.keep)
    report: dict[str, Any] = {"status": str(run.status), "result": run.result}
    if not run.ok:
        report.update(kind=run.kind, reason=run.reason)
    if source is not None:
        report["input"] = source.model_dump()
    if run.changes is not None:
        report["changes"] = change_report(run.changes)
    if run.root is not None:
        report["workspace"] = str(run.root)
    print(json.dumps(report, indent=2))
    return 0 if run.ok else 1


def _exec_publish(
    args: argparse.Namespace,
    spec: Any,
    source: Any,
    params: dict[str, Any],
    settings: Settings,
    lakefs: LakeFS,
    conductor: Conductor,
) -> int:
    from perago_worker import manual
    from perago_worker.attempt import Deps
    from perago_worker.contract import Status

    try:
        if args.execution_id:
            # Refuse a malformed id before any work.
            manual.incarnation_of(args.execution_id, clock_skew_seconds=settings.clock_skew_seconds)
    except manual.BadExecutionId as exc:
        raise CliError(str(exc)) from None
    execution_id = args.execution_id or manual.new_execution_id()
    print(
        f"perago-worker: execution {execution_id} (re-run with --execution-id "
        f"{execution_id} to finish it after a crash; it never merges twice)",
        file=sys.stderr,
    )
    run = manual.publish_once(
        spec, source, params, Deps(settings, lakefs, conductor), execution_id=execution_id
    )
    outcome = run.outcome
    report: dict[str, Any] = {
        "status": outcome.status.value,
        "execution_id": run.execution_id,
        "result": outcome.output.get("result"),
    }
    if outcome.status != Status.COMPLETED:
        report.update(kind=outcome.kind, reason=outcome.reason)
    if source is not None:
        report["input"] = source.model_dump()
        output = outcome.output.get("workspace")
        if output is not None:
            report["output"] = output
            if output["ref"] != source.ref:
                report["merge"] = {
                    "commit": output["ref"],
                    "provenance": dict(
                        sorted(lakefs.get_commit(source.repository, output["ref"]).metadata.items())
                    ),
                }
    if run.changes is not None:
        report["changes"] = change_report(run.changes)
    print(json.dumps(report, indent=2))
    return 0 if outcome.status == Status.COMPLETED else 1


def change_report(changes: Any) -> dict[str, Any]:
    """A change set as the exec report shows it: added and modified with sizes, deleted."""
    return {
        "added": [{"path": f.rel.as_posix(), "size": f.size} for f in changes.added],
        "modified": [{"path": f.rel.as_posix(), "size": f.size} for f in changes.modified],
        "deleted": [r.as_posix() for r in changes.deleted],
    }


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(json.dumps(settings.masked(), indent=2, sort_keys=True, default=str))
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perago-worker", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"perago-worker {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--config", help="YAML settings file (same as PERAGO_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the handlers of APP (module:attribute)")
    run.add_argument("app")
    run.add_argument(
        "--skip-preflight",
        action="store_true",
        help="take tasks without validating first (not for production)",
    )
    run.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes under one supervisor (CPU-bound handlers)",
    )
    run.add_argument(
        "--gc-every",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="also collect garbage (as `gc` does, same thresholds) every SECONDS on one thread; "
        "0 turns it off (default: the gc_every_seconds setting)",
    )
    run.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(fn=cmd_run)

    check = sub.add_parser("check", help="preflight: validate settings, servers, disk, definitions")
    check.add_argument("app")
    check.set_defaults(fn=cmd_check)

    register = sub.add_parser("register", help="create or update Conductor task definitions")
    register.add_argument("app")
    register.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    register.add_argument("--retries", type=int, default=3, help="retryCount of new definitions")
    register.set_defaults(fn=cmd_register)

    gc = sub.add_parser("gc", help="remove leftovers of crashed attempts")
    gc.add_argument(
        "--older-than",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="attempt folders and staging branches (default: the gc_older_than_seconds setting)",
    )
    gc.add_argument(
        "--intent-older-than",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="intent branches of terminal workflows "
        "(default: the gc_intent_older_than_seconds setting)",
    )
    gc.add_argument(
        "--ledger-older-than",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="execution ledger entries of terminal workflows "
        "(default: the gc_ledger_older_than_seconds setting)",
    )
    gc.add_argument(
        "--repository", action="append", help="repeatable; default: allowed_repositories"
    )
    gc.add_argument("--dry-run", action="store_true")
    gc.set_defaults(fn=cmd_gc)

    ref = sub.add_parser(
        "ref", help="print the `workspace` input object for a branch's head (for scripts)"
    )
    ref.add_argument("repository")
    ref.add_argument("branch")
    ref.set_defaults(fn=cmd_ref)

    start = sub.add_parser(
        "start", help="start a workflow at a branch's head (the flat `workspace` input)"
    )
    start.add_argument("workflow", help="the workflow definition's name")
    start.add_argument("--repository", required=True)
    start.add_argument("--branch", required=True, help="its head is the input; the merge target")
    start.add_argument("--params", default=None, help="a JSON object, or @file")
    start.add_argument("--version", type=int, default=None, help="default: the latest")
    start.add_argument(
        "--wait", action="store_true", help="wait for the end; print the output and each merge"
    )
    start.add_argument(
        "--timeout", type=_seconds, default=600.0, metavar="SECONDS", help="of --wait (600)"
    )
    start.set_defaults(fn=cmd_start)

    exec_ = sub.add_parser(
        "exec",
        help="run one task once on real lakeFS data, without Conductor; print the result and "
        "the change set a publish would make (nothing is published unless --publish)",
    )
    exec_.add_argument("app")
    exec_.add_argument("task")
    exec_.add_argument("--repository", required=True)
    exec_.add_argument("--ref", default=None, help="a full commit id")
    exec_.add_argument("--branch", default=None, help="its head is the input, unless --ref")
    exec_.add_argument("--params", default=None, help="a JSON object, or @file")
    exec_.add_argument("--keep", action="store_true", help="leave the workspace folder")
    exec_.add_argument(
        "--publish",
        action="store_true",
        help="stage, commit and merge into --branch through the same fences as a task",
    )
    exec_.add_argument(
        "--execution-id",
        default=None,
        help="with --publish: continue that manual execution (after a crash) instead of "
        "starting a new one; it never merges twice",
    )
    exec_.set_defaults(fn=cmd_exec)

    config = sub.add_parser("config", help="inspect settings")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="effective settings, secrets masked")
    show.set_defaults(fn=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except CliError as exc:
        if args.debug:
            raise
        print(f"perago-worker: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"perago-worker: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            " (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
