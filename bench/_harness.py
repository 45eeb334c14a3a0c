"""Plumbing shared by the benchmark cases: data sets, the run context, lakectl, timing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
BENCH_DIR = Path(__file__).resolve().parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SEED_THREADS = 32
TIMES = "\u00d7"  # the multiplication sign, spelled so no linter mistakes it for an x
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def require_loopback(url: str) -> None:
    """The benchmarks talk to the local stack only; refuse anything else outright."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise SystemExit(f"refusing to benchmark against {url}: only loopback servers are used")


@dataclass(frozen=True)
class DataSet:
    """`count` random files of `size` bytes under `prefix`, spread over `dirs` folders."""

    name: str
    count: int
    size: int
    dirs: int

    @property
    def prefix(self) -> str:
        return f"bench/{self.name}/"

    @property
    def total(self) -> int:
        return self.count * self.size

    @property
    def label(self) -> str:
        return f"{self.count:,} {TIMES} {fmt_bytes(self.size)}"

    def rel_paths(self) -> list[str]:
        if self.dirs <= 1:
            return [f"f{i:05d}.bin" for i in range(self.count)]
        return [f"d{i % self.dirs:03d}/f{i:05d}.bin" for i in range(self.count)]


def data_sets(quick: bool) -> dict[str, DataSet]:
    """Full sizes, or --quick ones: counts and sizes divided by about 50."""
    if quick:
        sets = [
            DataSet("small", 100, 16 * KiB, 2),
            DataSet("medium", 10, MiB, 2),
            DataSet("large", 4, 5 * MiB, 1),
            DataSet("huge", 1, 20 * MiB, 1),
        ]
    else:
        sets = [
            DataSet("small", 5000, 16 * KiB, 50),
            DataSet("medium", 500, MiB, 10),
            DataSet("large", 4, 256 * MiB, 1),
            DataSet("huge", 1, GiB, 1),
        ]
    return {s.name: s for s in sets}


TRANSFER_SETS = ("small", "medium", "large")
TINY_FILES = {"tiny/a.txt": 1024, "tiny/b.txt": 1024, "tiny/sub/c.txt": 4096}


@dataclass
class Bench:
    """Everything a case needs; built once per run by run.py."""

    workdir: Path
    endpoints: Endpoints
    lakectl: Path
    lakefs: LakeFS
    conductor: Conductor
    repo: str
    sets: dict[str, DataSet]
    repeat: int
    parallelism: int
    quick: bool
    seed_commit: str = ""
    local: dict[str, Path] = field(default_factory=dict)  # set name -> local copy
    full_publish: dict[str, list[float]] = field(default_factory=dict)  # perago, per set
    # The server processes when the harness started them (for their CPU time), and s5cmd.
    lakefs_pid: int | None = None
    store_pid: int | None = None
    s5cmd: Path | None = None
    clients: dict[str, LakeFS] = field(default_factory=dict)  # data path -> client
    _counter: int = 0

    # -- folders ------------------------------------------------------------------------

    def fresh_dir(self, label: str) -> Path:
        """A new empty folder under the run's work dir (same disk as the servers' data)."""
        self._counter += 1
        path = self.workdir / "runs" / f"{self._counter:04d}-{label}"
        path.mkdir(parents=True)
        return path

    def unique(self, label: str) -> str:
        """A branch-safe name that is new in this run."""
        self._counter += 1
        return f"{label}-{self._counter:04d}"

    # -- lakectl ------------------------------------------------------------------------

    def lakectl_env(self) -> dict[str, str]:
        home = self.workdir / "lakectl-home"  # no ~/.lakectl.yaml of the user's is read
        home.mkdir(exist_ok=True)
        e = self.endpoints
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "LAKECTL_SERVER_ENDPOINT_URL": e.lakefs_url,
            "LAKECTL_CREDENTIALS_ACCESS_KEY_ID": e.lakefs_access_key_id,
            "LAKECTL_CREDENTIALS_SECRET_ACCESS_KEY": e.lakefs_secret_access_key,
        }

    def lakectl_run(self, args: Sequence[str], *, timeout: float) -> str:
        return run_tool(self.lakectl, args, env=self.lakectl_env(), timeout=timeout)

    # -- s5cmd (the s3 blockstore's bucket, no lakeFS in the path) -----------------------

    def s5cmd_env(self) -> dict[str, str]:
        store = self.endpoints.store
        if store is None:
            raise RuntimeError("s5cmd needs the s3 blockstore")
        home = self.workdir / "s5cmd-home"  # no ~/.aws of the user's is read
        home.mkdir(exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "AWS_ACCESS_KEY_ID": store.access_key_id,
            "AWS_SECRET_ACCESS_KEY": store.secret_access_key,
            "AWS_REGION": "us-east-1",
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
            "AWS_CONFIG_FILE": str(home / "none"),
        }

    def s5cmd_run(self, args: Sequence[str], *, timeout: float, quiet: bool = True) -> str:
        """`s5cmd --endpoint-url STORE --numworkers P [--log error] ARGS` (`ls` and `du`
        answer at the info level: not quiet)."""
        if self.s5cmd is None or self.endpoints.store is None:
            raise RuntimeError("s5cmd needs the s3 blockstore")
        base = ["--endpoint-url", self.endpoints.store.url, "--numworkers", str(self.parallelism)]
        level = ["--log", "error"] if quiet else []
        return run_tool(self.s5cmd, [*base, *level, *args], env=self.s5cmd_env(), timeout=timeout)

    def bucket_uri(self, path: str) -> str:
        store = self.endpoints.store
        if store is None:
            raise RuntimeError("no bucket on the local blockstore")
        return f"s3://{store.bucket}/{path}"

    # -- perago on a chosen data path ----------------------------------------------------

    def client(self, data_path: str) -> LakeFS:
        """A LakeFS client on `data_path` (api, presign or auto), made once per run."""
        if data_path not in self.clients:
            e = self.endpoints
            self.clients[data_path] = LakeFS(
                e.lakefs_url,
                e.lakefs_access_key_id,
                e.lakefs_secret_access_key,
                pool_size=self.parallelism,
                data_path=data_path,
            )
        return self.clients[data_path]

    def uri(self, ref: str, path: str = "") -> str:
        return f"lakefs://{self.repo}/{ref}/{path}" if path else f"lakefs://{self.repo}/{ref}"

    def timeout_for(self, nbytes: int) -> float:
        """A generous bound for moving `nbytes` through the local stack (>= 5 MiB/s)."""
        return 120 + nbytes / (5 * MiB)


def run_tool(binary: Path, args: Sequence[str], *, env: dict[str, str], timeout: float) -> str:
    """Run a CLI (lakectl, s5cmd) to completion; its stdout, or RuntimeError with the tails."""
    proc = subprocess.run(
        [str(binary), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{binary.name} {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc.stdout


# -- data ---------------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left:
            chunk = min(left, MiB)
            out.write(os.urandom(chunk))
            left -= chunk


def build_local(ds: DataSet, root: Path) -> None:
    """A local copy of the set with random contents (what gets seeded and published)."""
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda rel: write_random(root / rel, ds.size), ds.rel_paths()))


def seed(b: Bench, names: Sequence[str], *, keep_local: Sequence[str]) -> None:
    """Upload the sets (and the tiny task prefix) with 32 threads and commit them once.

    Not measured. The local copies of `keep_local` stay for the publish and memory cases.
    """
    started = time.monotonic()
    uploads: list[tuple[str, Path]] = []
    for name in names:
        ds = b.sets[name]
        root = b.workdir / "local" / name
        build_local(ds, root)
        b.local[name] = root
        uploads.extend((ds.prefix + rel, root / rel) for rel in ds.rel_paths())
    tiny = b.workdir / "local" / "tiny"
    for key, size in TINY_FILES.items():
        write_random(tiny / key, size)
        uploads.append((key, tiny / key))
    total = sum(p.stat().st_size for _, p in uploads)
    log(f"seeding {len(uploads):,} objects, {fmt_bytes(total)} (not measured)")
    with ThreadPoolExecutor(SEED_THREADS) as pool:
        list(pool.map(lambda kp: b.lakefs.upload(b.repo, "main", kp[0], kp[1]), uploads))
    b.seed_commit = b.lakefs.commit(b.repo, "main", "bench: seed", {"bench": "seed"}).id
    for name in names:
        if name not in keep_local:
            discard(b.local.pop(name))
    discard(tiny)
    log(f"seeded commit {b.seed_commit[:12]} in {time.monotonic() - started:.1f}s")


def tree_stats(root: Path) -> tuple[int, int]:
    """(files, bytes) under root."""
    files = size = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return files, size


def check_tree(root: Path, ds: DataSet, what: str) -> None:
    files, size = tree_stats(root)
    if (files, size) != (ds.count, ds.total):
        raise RuntimeError(
            f"{what}: {files} files / {size} bytes in {root}, expected {ds.count} / {ds.total}"
        )


def discard(path: Path) -> None:
    """Remove a local copy between runs (read-only cache entries included)."""
    shutil.rmtree(path, ignore_errors=True)


def settle() -> None:
    """Flush dirty pages of the previous run so its writeback does not bill the next one."""
    os.sync()


# -- timing -------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def rotated(items: Sequence[T], shift: int) -> Iterator[T]:
    """The tools in a different order each repeat, so none always runs first or last."""
    n = len(items)
    for i in range(n):
        yield items[(i + shift) % n]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
