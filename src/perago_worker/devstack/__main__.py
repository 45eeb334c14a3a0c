"""`python -m perago_worker.devstack prepare|up|demo`.

prepare  obtain (build or download, cached) lakeFS, lakectl, Conductor, Java and VersityGW
up       start the servers on free loopback ports and keep them running until Ctrl-C
         (`--blockstore s3` puts lakeFS on a VersityGW S3 store, as in production)
demo     the main job: stack + demo definitions + workflow + worker, one run end to end
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from perago_worker.devstack import tools
from perago_worker.devstack.servers import BLOCKSTORES


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


def up(workdir: Path, blockstore: str) -> int:
    from perago_worker.devstack.servers import running_stack

    with running_stack(workdir, blockstore=blockstore) as stack:
        print("# the stack is up; export these to point a worker or tests at it:")
        for key, value in stack.endpoints.as_env().items():
            print(f"export {key}={value}")
        e = stack.endpoints
        print(
            f"export PERAGO_TEST_LAKEFS_URL={e.lakefs_url} PERAGO_TEST_CONDUCTOR_URL={e.conductor_url}"
        )
        print(f"export PERAGO_TEST_LAKEFS_ACCESS_KEY_ID={e.lakefs_access_key_id}")
        print(f"export PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY={e.lakefs_secret_access_key}")
        if e.store is not None:
            print(
                f"export PERAGO_TEST_STORE_URL={e.store.url} PERAGO_TEST_STORE_BUCKET={e.store.bucket}"
            )
            print(f"export PERAGO_TEST_STORE_ACCESS_KEY_ID={e.store.access_key_id}")
            print(f"export PERAGO_TEST_STORE_SECRET_ACCESS_KEY={e.store.secret_access_key}")
        print("# Ctrl-C stops both servers", flush=True)
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
    up_p.add_argument("--blockstore", choices=BLOCKSTORES, default="local")
    demo_p = sub.add_parser("demo")
    demo_p.add_argument("--dir", type=Path, default=None)
    demo_p.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    if args.command == "prepare":
        return prepare()
    workdir = args.dir or Path(tempfile.mkdtemp(prefix=f"perago-{args.command}-"))
    if args.command == "up":
        return up(workdir, args.blockstore)
    from perago_worker.devstack.demo import run_demo

    return run_demo(workdir, rows=args.rows)


if __name__ == "__main__":
    sys.exit(main())
