"""One memory measurement in a fresh process; prints one JSON line with the figures.

Peak RSS is the kernel's high-water mark (`VmHWM` in /proc/self/status), so nothing a
sampler could miss. Modes:

perago   materialize the big object into an empty root, move a big new file (prepared by
         the harness) into the root, then publish it: scan, diff, stage (upload), commit,
         merge. Reports the high-water mark after imports, after materializing and at the end.
sdk      the reference: `ObjectsApi.get_object` (the generated SDK returns the whole body as
         a bytearray) and write it to a file.
lakectl  the reference CLI: `lakectl fs download` as a child; its peak RSS comes from
         getrusage(RUSAGE_CHILDREN), which covers only that child in this fresh process.

The lakeFS endpoint and credentials come from BENCH_LAKEFS_URL, BENCH_LAKEFS_KEY,
BENCH_LAKEFS_SECRET (never on the command line).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def run_perago(args: argparse.Namespace, url: str, key: str, secret: str) -> dict[str, Any]:
    from perago_worker.changes import diff, scan
    from perago_worker.lakefs import LakeFS
    from perago_worker.materialize import materialize
    from perago_worker.publish import commit_staged, stage

    lakefs = LakeFS(url, key, secret, pool_size=args.concurrency)
    lakefs.get_commit(args.repo, args.ref)  # connections and SDK models warmed up
    out: dict[str, Any] = {"baseline_hwm_mib": mib(vm_kib("VmHWM"))}
    root: Path = args.root
    started = time.perf_counter()
    manifest, stats = materialize(
        lakefs, args.repo, args.ref, args.prefix, root, concurrency=args.concurrency
    )
    out["materialize_s"] = time.perf_counter() - started
    out["materialized_bytes"] = stats.bytes
    out["after_materialize_hwm_mib"] = mib(vm_kib("VmHWM"))

    new_file: Path = args.new_file
    inside = root / "new.bin"
    new_file.rename(inside)  # a rename, not a copy: no extra GiB written, one link only
    try:
        started = time.perf_counter()
        scanned = scan(root)
        changes = diff(manifest, scanned, root=root)
        assert [f.rel.name for f in changes.added] == ["new.bin"], changes.summary()
        lakefs.create_branch(args.repo, args.target, args.ref, hidden=False)
        staging = args.target + "-staging"
        stage(
            lakefs,
            args.repo,
            args.ref,
            staging,
            args.prefix,
            root,
            changes,
            scanned=scanned,
            concurrency=args.concurrency,
        )
        commit_staged(lakefs, args.repo, staging, "bench: memory probe", {"bench": "memory"})
        lakefs.merge(args.repo, staging, args.target, "bench: memory probe", {"bench": "memory"})
        out["publish_s"] = time.perf_counter() - started
        out["published_bytes"] = changes.upload_bytes
    finally:
        inside.rename(new_file)
    out["peak_hwm_mib"] = mib(vm_kib("VmHWM"))
    return out


def run_sdk(args: argparse.Namespace, url: str, key: str, secret: str) -> dict[str, Any]:
    from perago_worker.lakefs import LakeFS

    lakefs = LakeFS(url, key, secret, pool_size=args.concurrency)
    page = lakefs.objects.list_objects(args.repo, args.ref, prefix=args.prefix, amount=1000)
    out: dict[str, Any] = {"baseline_hwm_mib": mib(vm_kib("VmHWM"))}
    started = time.perf_counter()
    total = 0
    for obj in page.results:
        body = lakefs.objects.get_object(args.repo, args.ref, obj.path)
        dest = args.root / obj.path.removeprefix(args.prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(body)
        total += len(body)
        del body
    out["materialize_s"] = time.perf_counter() - started
    out["materialized_bytes"] = total
    out["peak_hwm_mib"] = mib(vm_kib("VmHWM"))
    return out


def run_lakectl(args: argparse.Namespace, url: str, key: str, secret: str) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(args.root),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "LAKECTL_SERVER_ENDPOINT_URL": url,
        "LAKECTL_CREDENTIALS_ACCESS_KEY_ID": key,
        "LAKECTL_CREDENTIALS_SECRET_ACCESS_KEY": secret,
    }
    dest = args.root / "out"
    started = time.perf_counter()
    subprocess.run(
        [
            str(args.lakectl),
            "fs",
            "download",
            "--recursive",
            "--no-progress",
            "--parallelism",
            str(args.concurrency),
            f"lakefs://{args.repo}/{args.ref}/{args.prefix}",
            str(dest) + "/",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=args.timeout,
    )
    seconds = time.perf_counter() - started
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"materialize_s": seconds, "materialized_bytes": total, "peak_hwm_mib": mib(peak_kib)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["perago", "sdk", "lakectl"])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--ref", required=True, help="the commit holding the big object")
    parser.add_argument("--prefix", required=True, help="key prefix, e.g. bench/huge/")
    parser.add_argument("--root", type=Path, required=True, help="an empty folder")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-file", type=Path, help="perago: the file to publish (moved back)")
    parser.add_argument("--target", help="perago: the branch to create and merge into")
    parser.add_argument("--lakectl", type=Path, help="lakectl: the binary")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    url = os.environ["BENCH_LAKEFS_URL"]
    key = os.environ["BENCH_LAKEFS_KEY"]
    secret = os.environ["BENCH_LAKEFS_SECRET"]
    runner = {"perago": run_perago, "sdk": run_sdk, "lakectl": run_lakectl}[args.mode]
    print(json.dumps(runner(args, url, key, secret)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
