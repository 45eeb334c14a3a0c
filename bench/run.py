"""Benchmarks of perago-worker against lakectl, the raw lakeFS SDK and a bare Conductor worker.

    .venv/bin/python bench/run.py [--quick] [--repeat N] [--only CASE] [--out FILE]
                                  [--blockstore local|s3]

Starts a real local stack (lakeFS + Conductor on loopback ports, data in a temporary folder),
seeds the data sets once (not measured), runs the cases and prints, for each, perago's
figure, the reference figure measured in the same run and their ratio (> 1.0: perago is
better), medians over the repeats. `--out FILE` also writes a Markdown report with the
machine, the command line and the tables. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType

from _datapath import case_datapath
from _harness import (
    TRANSFER_SETS,
    Bench,
    GiB,
    data_sets,
    discard,
    fmt_bytes,
    log,
    require_loopback,
    seed,
)
from _report import Section, machine, render_report, render_section, targets_summary
from _tasks import CONCURRENCIES, case_calls, case_tasks
from _transfer import case_cache, case_incremental, case_materialize, case_memory, case_publish
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import (
    BLOCKSTORES,
    Endpoints,
    Stack,
    endpoints_from_env,
    start_stack,
)
from perago_worker.lakefs import LakeFS

CASES = (
    "materialize",
    "publish",
    "incremental",
    "tasks",
    "calls",
    "memory",
    "cache",
    "datapath",
)
# Which seeded sets each case reads, and which local copies it needs besides.
READS = {
    "materialize": set(TRANSFER_SETS),
    "publish": set(),
    "incremental": {"small", "medium"},
    "tasks": set(),
    "calls": set(),
    "memory": {"huge"},
    "cache": {"small"},
    "datapath": set(TRANSFER_SETS),
}
LOCAL = {
    "materialize": set(),
    "publish": set(TRANSFER_SETS),
    "incremental": {"small", "medium"},
    "tasks": set(),
    "calls": set(),
    "memory": {"huge"},
    "cache": set(),
    "datapath": set(TRANSFER_SETS),
}


class Deadline(Exception):
    """The whole run took longer than --deadline-minutes."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (about 1/50), one repeat by default"
    )
    parser.add_argument("--repeat", type=int, help="repeats per case (default 3; quick: 1)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        help=f"run only these cases (repeatable or comma-separated): {', '.join(CASES)}",
    )
    parser.add_argument("--out", type=Path, help="write the Markdown report to this file")
    parser.add_argument(
        "--parallelism",
        type=int,
        default=32,
        help="transfer concurrency for perago and --parallelism for lakectl (default 32, the "
        "worker's default transfer_concurrency)",
    )
    parser.add_argument("--sequential", type=int, help="latency samples per repeat (50; quick 10)")
    parser.add_argument("--burst", type=int, help="workflows per throughput run (200; quick 20)")
    parser.add_argument(
        "--concurrency",
        help="worker concurrencies of the throughput runs, comma-separated (default "
        f"{','.join(map(str, CONCURRENCIES))}); latency is measured only when 4 is among them",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="parent of the run's temporary folder (default: the system temp dir); it holds "
        "the servers' data and every local copy, so it decides the disk measured",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--blockstore",
        choices=BLOCKSTORES,
        help="lakeFS's blockstore for the stack the harness starts: local (default) or s3 (an "
        "S3-compatible VersityGW store, presigned transfers); with --stack-from-env it comes "
        "from the environment (PERAGO_TEST_STORE_URL set means s3)",
    )
    parser.add_argument(
        "--deadline-minutes",
        type=float,
        help="abort (stopping everything) after this long (default 30; full run 360)",
    )
    parser.add_argument(
        "--stack-from-env",
        action="store_true",
        help="development: use already running loopback servers named by PERAGO_TEST_LAKEFS_URL,"
        " PERAGO_TEST_LAKEFS_ACCESS_KEY_ID, PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY and "
        "PERAGO_TEST_CONDUCTOR_URL (as printed by `python -m perago_worker.devstack up`)",
    )
    args = parser.parse_args(argv)
    only = [c.strip() for item in (args.only or []) for c in item.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.cases = [c for c in CASES if c in only] if only else list(CASES)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.sequential = args.sequential or (10 if args.quick else 50)
    args.burst = args.burst or (20 if args.quick else 200)
    args.deadline_minutes = args.deadline_minutes or (30 if args.quick else 360)
    try:
        args.concurrencies = (
            tuple(int(c) for c in args.concurrency.split(",") if c.strip())
            if args.concurrency
            else CONCURRENCIES
        )
    except ValueError:
        parser.error(f"--concurrency: not a list of integers: {args.concurrency!r}")
    if not args.concurrencies or min(args.concurrencies) < 1:
        parser.error("--concurrency needs integers >= 1")
    if args.repeat < 1 or args.parallelism < 1 or args.sequential < 2 or args.burst < 1:
        parser.error("--repeat, --parallelism, --burst must be >= 1 and --sequential >= 2")
    return args


def disk_estimate(args: argparse.Namespace) -> int:
    """Bytes the run writes at most: lakeFS keeps every uploaded object until the end."""
    sets = data_sets(args.quick)

    def total(names: Iterable[str]) -> int:
        return sum(sets[n].total for n in names)

    reads = set().union(*(READS[c] for c in args.cases), *(LOCAL[c] for c in args.cases))
    need = 2 * total(reads)  # seeded in lakeFS + local copies
    if "publish" in args.cases:
        need += 2 * args.repeat * total(TRANSFER_SETS)
    if "incremental" in args.cases and "publish" not in args.cases:
        need += args.repeat * total(("small", "medium"))
    if "datapath" in args.cases:  # every lakeFS tool's publish stays; s5cmd's is removed
        tools = 3 if args.blockstore == "s3" else 2
        need += tools * args.repeat * total(TRANSFER_SETS) + total(TRANSFER_SETS)
    if "memory" in args.cases:
        need += args.repeat * sets["huge"].total + 2 * sets["huge"].total
    need += max(sets[n].total for n in TRANSFER_SETS)  # one materialized copy at a time
    return need


def stack_from_env() -> tuple[Endpoints, Path]:
    from perago_worker.devstack import tools

    try:
        endpoints = endpoints_from_env(os.environ)
    except KeyError as exc:
        raise SystemExit(f"--stack-from-env: {exc.args[0]} is not set") from None
    if endpoints is None:
        raise SystemExit(
            "--stack-from-env: PERAGO_TEST_LAKEFS_URL and PERAGO_TEST_CONDUCTOR_URL are not set"
        )
    return endpoints, tools.lakefs_binaries().lakectl


def install_signals(deadline_minutes: float) -> None:
    """SIGTERM and the deadline raise in the main thread, so every `finally` stops its child."""

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Deadline(f"the run exceeded --deadline-minutes={deadline_minutes:g}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(deadline_minutes * 60)))


def run_cases(b: Bench, args: argparse.Namespace) -> list[Section]:
    runners: dict[str, Callable[[], Section]] = {
        "materialize": lambda: case_materialize(b),
        "publish": lambda: case_publish(b),
        "incremental": lambda: case_incremental(b),
        "tasks": lambda: case_tasks(
            b, sequential=args.sequential, burst=args.burst, concurrencies=args.concurrencies
        ),
        "calls": lambda: case_calls(b, samples=args.sequential),
        "memory": lambda: case_memory(b),
        "cache": lambda: case_cache(b),
        "datapath": lambda: case_datapath(b),
    }
    sections = []
    for case in args.cases:
        started = time.monotonic()
        log(f"case {case}: start")
        section = runners[case]()
        log(f"case {case}: {time.monotonic() - started:.1f}s")
        print(render_section(section, runs=False), flush=True)
        sections.append(section)
    return sections


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.stack_from_env:
        from_env = "s3" if os.environ.get("PERAGO_TEST_STORE_URL") else "local"
        if args.blockstore not in (None, from_env):
            raise SystemExit(
                f"--blockstore {args.blockstore}, but the stack in the environment is {from_env}"
            )
        args.blockstore = from_env
    args.blockstore = args.blockstore or "local"
    command = shlex.join([os.path.relpath(sys.executable), sys.argv[0], *argv])
    for var in ("NO_PROXY", "no_proxy"):  # every client here talks to loopback, never a proxy
        os.environ[var] = "127.0.0.1,localhost"
    install_signals(args.deadline_minutes)
    workdir = Path(tempfile.mkdtemp(prefix="perago-bench-", dir=args.workdir))
    sets = data_sets(args.quick)
    need = disk_estimate(args)
    free = shutil.disk_usage(workdir).free
    log(f"work dir {workdir}: {fmt_bytes(free)} free, this run writes up to {fmt_bytes(need)}")
    if free < need + 2 * GiB:
        discard(workdir)
        raise SystemExit(f"not enough disk at {workdir}: need {fmt_bytes(need)} + 2 GiB margin")
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    started = time.monotonic()
    stack: Stack | None = None
    try:
        if args.stack_from_env:
            endpoints, lakectl = stack_from_env()
            repo = f"bench-{uuid.uuid4().hex[:8]}"
        else:
            stack = start_stack(
                workdir / "stack",
                blockstore=args.blockstore,
                log=lambda m: log(m.removeprefix("[devstack] ")),
            )
            endpoints, lakectl, repo = stack.endpoints, stack.lakectl, "bench"
        require_loopback(endpoints.lakefs_url)
        require_loopback(endpoints.conductor_url)
        if endpoints.store is not None:
            require_loopback(endpoints.store.url)
        lakefs = LakeFS(
            endpoints.lakefs_url,
            endpoints.lakefs_access_key_id,
            endpoints.lakefs_secret_access_key,
            pool_size=args.parallelism,
        )
        b = Bench(
            workdir=workdir,
            endpoints=endpoints,
            lakectl=lakectl,
            lakefs=lakefs,
            conductor=Conductor(endpoints.conductor_url),
            repo=repo,
            sets=sets,
            repeat=args.repeat,
            parallelism=args.parallelism,
            quick=args.quick,
        )
        if stack is not None:
            b.lakefs_pid = stack.lakefs.proc.pid if stack.lakefs.proc else None
            b.store_pid = stack.store.proc.pid if stack.store and stack.store.proc else None
        if endpoints.store is not None and "datapath" in args.cases:
            from perago_worker.devstack import tools

            b.s5cmd = tools.s5cmd_binary()
        machine_rows = machine(b)
        lakefs.create_repository(repo)
        reads = set().union(*(READS[c] for c in args.cases), *(LOCAL[c] for c in args.cases))
        keep = set().union(*(LOCAL[c] for c in args.cases))
        seed(b, [n for n in sets if n in reads], keep_local=sorted(keep))
        if args.quick:
            print(
                "> --quick: counts and sizes divided by about 50, one repeat; fixed costs "
                "dominate, so the targets are indicative only.\n",
                flush=True,
            )
        sections = run_cases(b, args)
        seconds = time.monotonic() - started
        print("### Targets\n\n" + targets_summary(sections), flush=True)
        if args.out:
            settings = [
                ("cases", ", ".join(args.cases)),
                ("blockstore", args.blockstore),
                ("repeats", str(args.repeat)),
                ("transfer parallelism", f"{args.parallelism} (perago concurrency = lakectl -p)"),
                ("data sets", "; ".join(f"{s.name}: {s.label}" for s in sets.values())),
                ("latency samples per repeat", str(args.sequential)),
                ("workflows per throughput run", str(args.burst)),
                ("work dir", str(workdir)),
                (
                    "servers",
                    "already running (--stack-from-env)"
                    if stack is None
                    else "started by the harness on loopback ports, data in the work dir",
                ),
            ]
            report = render_report(
                command=command,
                machine_rows=machine_rows,
                settings=settings,
                sections=sections,
                started=started_at,
                seconds=seconds,
                quick=args.quick,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report)
            log(f"report written to {args.out}")
        log(f"done in {seconds / 60:.1f} min")
        return 0
    except BaseException as exc:
        log(f"aborted: {type(exc).__name__}: {exc}")
        raise
    finally:
        signal.alarm(0)
        if stack is not None:
            log("stopping the stack")
            stack.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            discard(workdir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
