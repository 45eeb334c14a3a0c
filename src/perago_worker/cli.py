"""`perago-worker`: run, check, register, gc, config show.

Errors are one clear line on stderr and a non-zero exit, not a traceback (unless --debug).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from perago_worker._version import __version__
from perago_worker.app import RegistrationError, Worker, load_app
from perago_worker.cache import ObjectCache
from perago_worker.conductor import Conductor
from perago_worker.lakefs import LakeFS
from perago_worker.settings import Settings


class CliError(Exception):
    """A user-facing failure: printed as one line."""


def load_settings(config: str | None) -> Settings:
    import os

    if config:
        os.environ["PERAGO_CONFIG"] = config
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise CliError(f"invalid settings: {problems}") from None
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None


def clients(settings: Settings) -> tuple[LakeFS, Conductor]:
    lakefs = LakeFS(
        settings.lakefs.endpoint,
        settings.lakefs.access_key_id,
        settings.lakefs.secret_access_key.get_secret_value(),
        pool_size=settings.transfer_concurrency,
        timeout=settings.lakefs.request_timeout_seconds,
    )
    conductor = Conductor(
        settings.conductor.url,
        auth_key=settings.conductor.auth_key,
        auth_secret=(
            settings.conductor.auth_secret.get_secret_value()
            if settings.conductor.auth_secret
            else None
        ),
        request_timeout=settings.conductor.request_timeout_seconds,
    )
    return lakefs, conductor


def _app(target: str) -> Worker:
    try:
        return load_app(target)
    except RegistrationError as exc:
        raise CliError(str(exc)) from None
    except ImportError as exc:
        raise CliError(f"cannot import {target}: {exc}") from None


def _secrets(settings: Settings) -> list[str]:
    values = [settings.lakefs.secret_access_key.get_secret_value()]
    if settings.conductor.auth_secret:
        values.append(settings.conductor.auth_secret.get_secret_value())
    values += [s.get_secret_value() for s in settings.handler_secrets.values()]
    return values


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
        )
    return _run_single(args)


def _run_single(args: argparse.Namespace) -> int:
    from perago_worker.attempt import Deps
    from perago_worker.observability import logging as plog
    from perago_worker.observability.health import HealthServer
    from perago_worker.preflight import run_preflight
    from perago_worker.register import coverage
    from perago_worker.runner import Lifecycle, Runner

    settings = load_settings(args.config)
    plog.configure(settings.log_level, settings.log_format, _secrets(settings))
    log = plog.get_logger(worker_id=settings.worker_id)
    lifecycle = Lifecycle()
    app = _app(args.app)
    lakefs, conductor = clients(settings)
    cache = (
        ObjectCache(settings.scratch_root / ".cache", settings.cache_max_bytes, settings.cache_mode)
        if settings.cache_max_bytes > 0
        else None
    )
    runner = Runner(app, Deps(settings, lakefs, conductor, cache), lifecycle)

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
    if not args.skip_preflight:
        results = run_preflight(settings, app, lakefs, conductor)
        for r in results:
            log.info("preflight", check=r.name, result=r.mark, detail=r.detail)
        if any(r.ok is False for r in results):
            lifecycle.set("failed")
            failed = next(r for r in results if r.ok is False)
            raise CliError(f"preflight failed: {failed.name}: {failed.detail}")
    lifecycle.preflight_ok = True
    try:
        return runner.run_forever()
    finally:
        if health is not None:
            health.stop()


def cmd_check(args: argparse.Namespace) -> int:
    from perago_worker.preflight import run_preflight

    settings = load_settings(args.config)
    app: Worker | None = None
    app_error = None
    try:
        app = _app(args.app)
    except CliError as exc:
        app_error = str(exc)
    lakefs, conductor = clients(settings)
    results = run_preflight(settings, app, lakefs, conductor, app_error=app_error)
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{r.mark:<5} {r.name:<{width}}  {r.detail}")
    return 1 if any(r.ok is False for r in results) else 0


def cmd_register(args: argparse.Namespace) -> int:
    from perago_worker.register import drift, task_def_for

    settings = load_settings(args.config)
    app = _app(args.app)
    _, conductor = clients(settings)
    current = {d.name: d for d in conductor.get_task_defs()}
    plans = [(task_def_for(spec, retries=args.retries), spec) for spec in app.tasks.values()]
    for desired, _spec in plans:
        d = drift(desired, current.get(desired.name))
        print(d.describe())
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
    from perago_worker.gc import collect

    settings = load_settings(args.config)
    lakefs, conductor = clients(settings)
    repositories = args.repository or settings.allowed_repositories
    report = collect(
        settings.scratch_root,
        lakefs,
        conductor,
        repositories,
        older_than=args.older_than,
        intent_older_than=args.intent_older_than,
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    for label, items in (
        ("attempt folder", report.attempt_dirs),
        ("staging branch", report.staging_branches),
        ("intent branch", report.intent_branches),
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
        f"{len(report.intent_branches)} intent branch(es); "
        f"kept {len(report.kept_live)} live, {len(report.unverifiable)} unverifiable"
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(json.dumps(settings.masked(), indent=2, sort_keys=True, default=str))
    return 0


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
    gc.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS")
    gc.add_argument("--intent-older-than", type=float, default=7 * 86400.0, metavar="SECONDS")
    gc.add_argument(
        "--repository", action="append", help="repeatable; default: allowed_repositories"
    )
    gc.add_argument("--dry-run", action="store_true")
    gc.set_defaults(fn=cmd_gc)

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
