"""`python -m perago_worker.devstack prepare|up|demo`.

prepare  obtain (build or download, cached) lakeFS, lakectl, Conductor, Java and VersityGW
up       start the servers on free loopback ports and keep them running until Ctrl-C
         (`--blockstore s3` puts lakeFS on a VersityGW S3 store, as in production;
         `--conductor postgres` runs PostgreSQL under two Conductors and two lakeFS, on s3)
demo     the main job: stack + demo definitions + workflow + worker, one run end to end
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from perago_worker.devstack import tools
from perago_worker.devstack.servers import BLOCKSTORES, CONDUCTOR_PERSISTENCES


def prepare() -> int:
    for label, fn in (
        ("lakeFS + lakectl " + tools.LAKEFS_VERSION, tools.lakefs_binaries),
        ("Conductor " + tools.CONDUCTOR_VERSION, tools.conductor_jar),
        ("Java >= 21", tools.java_runtime),
        ("VersityGW " + tools.VERSITYGW_VERSION, tools.versitygw_binary),
    ):
        started = time.monotonic()
        result = fn()
        print(f"[devstack] {label}: {time.monotonic() - started:.1f}s ({result})", flush=True)
    return 0


def _stop_on_signals() -> None:
    """SIGTERM, and SIGINT even where it was ignored, end `up` through its cleanup.

    The servers run in sessions of their own (a Ctrl-C aimed at the terminal must not kill
    them half-way), so only `up` can stop them. A shell script's background job starts with
    SIGINT ignored, and Python's default SIGTERM ends the process without any cleanup: both
    would leave the servers running.
    """

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def up(workdir: Path, blockstore: str | None, conductor: str = "sqlite") -> int:
    from perago_worker.devstack.servers import running_stack

    _stop_on_signals()
    with running_stack(workdir, blockstore=blockstore, conductor=conductor) as stack:
        print("# the stack is up; export these to point a worker or tests at it:")
        for key, value in stack.endpoints.as_env().items():
            print(f"export {key}={value}")
        for key, value in stack.endpoints.as_test_env().items():
            print(f"export {key}={value}")
        print("# Ctrl-C (or SIGTERM) stops the servers", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m perago_worker.devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare")
    up_p = sub.add_parser("up")
    up_p.add_argument("--dir", type=Path, default=None)
    up_p.add_argument(
        "--blockstore", choices=BLOCKSTORES, default=None, help="local (sqlite) or s3 (postgres)"
    )
    up_p.add_argument("--conductor", choices=CONDUCTOR_PERSISTENCES, default="sqlite")
    demo_p = sub.add_parser("demo")
    demo_p.add_argument("--dir", type=Path, default=None)
    demo_p.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "prepare":
        return prepare()
    # Absolute: the servers run with the folder as their working directory, so a relative
    # path handed to them (a database file, a data folder) would nest inside it.
    workdir = (args.dir or Path(tempfile.mkdtemp(prefix=f"perago-{args.command}-"))).resolve()
    if args.command == "up":
        return up(workdir, args.blockstore, args.conductor)
    from perago_worker.devstack.demo import run_demo

    return run_demo(workdir, rows=args.rows)


if __name__ == "__main__":
    sys.exit(main())
