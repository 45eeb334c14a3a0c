"""Start real lakeFS and Conductor servers as local processes on free loopback ports.

The servers keep their state in a folder of the caller's choosing and write their logs to
files there, so a failing test can show the tail, and a fault test can stop and restart a
server on the same port and data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from perago_worker.devstack import tools

# Fixed dev credentials: these only ever guard a throwaway server bound to loopback.
DEV_ACCESS_KEY_ID = "AKIAPERAGODEVSTACK01"
DEV_SECRET_ACCESS_KEY = "perago-devstack-secret-not-for-production-0"  # noqa: S105
STORE_ACCESS_KEY_ID = "PERAGODEVSTORE000001"
STORE_SECRET_ACCESS_KEY = "perago-devstore-secret-not-for-production"  # noqa: S105
BUCKET = "perago-dev"
# `local`: lakeFS keeps objects in a folder (fastest to start, what the demo uses). `s3`: an
# S3-compatible store (VersityGW) under lakeFS, as in production, with presigned transfers.
BLOCKSTORES = ("local", "s3")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_answers(url: str, *, timeout: float = 2.0) -> bool:
    """True when anything answers HTTP at `url`, whatever the status (an S3 root says 403)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (loopback)
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def _http_ok(url: str, *, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


@dataclass
class ServerProcess:
    """One server child process with a log file and a readiness probe."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    workdir: Path
    ready: Callable[[], bool]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"

    def start(self) -> None:
        log = self.log_path.open("ab")
        # A new session: the server is not killed by a Ctrl-C aimed at the caller's group,
        # and stop() can signal its whole tree.
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, timeout: float) -> float:
        """Block until the probe answers; return the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready; "
                    f"log tail:\n{self.tail()}"
                )
            if self.ready():
                return time.monotonic() - started
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s; log tail:\n{self.tail()}")

    def stop(self, *, kill: bool = False, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def restart(self, timeout: float = 120.0) -> float:
        self.stop()
        self.start()
        return self.wait_ready(timeout)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class StoreEndpoint:
    """An S3-compatible store and the bucket lakeFS keeps its repositories in."""

    url: str
    access_key_id: str
    secret_access_key: str
    bucket: str = BUCKET


def object_store_server(workdir: Path, port: int, binary: Path) -> ServerProcess:
    """VersityGW serving `workdir/store-data` over S3; each top folder there is a bucket.

    `--keep-alive` (off by default) keeps client connections open between requests, and
    `--quiet` drops the per-request log line: both cost real time on small objects.
    """
    data = workdir / "store-data"
    (data / BUCKET).mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "ROOT_ACCESS_KEY": STORE_ACCESS_KEY_ID,
        "ROOT_SECRET_KEY": STORE_SECRET_ACCESS_KEY,
    }
    base = f"http://127.0.0.1:{port}"
    return ServerProcess(
        name="objectstore",
        cmd=[
            str(binary),
            "--port",
            f"127.0.0.1:{port}",
            "--keep-alive",
            "--quiet",
            "posix",
            str(data),
        ],
        env=env,
        workdir=workdir,
        ready=lambda: _http_answers(f"{base}/"),
    )


def lakefs_server(
    workdir: Path,
    port: int,
    binary: Path,
    *,
    store: StoreEndpoint | None = None,
    name: str = "lakefs",
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    """lakeFS on its local blockstore, or on `store` (the `s3` blockstore, path style).

    The default namespace prefix lets clients make a repository's storage namespace without
    knowing the blockstore (`LakeFS.create_repository` reads it from the storage config).
    """
    data = workdir / f"{name}-data"
    blockstore = (
        {
            "LAKEFS_BLOCKSTORE_TYPE": "local",
            "LAKEFS_BLOCKSTORE_LOCAL_PATH": str(data / "blocks"),
            "LAKEFS_BLOCKSTORE_DEFAULT_NAMESPACE_PREFIX": "local://",
        }
        if store is None
        else {
            "LAKEFS_BLOCKSTORE_TYPE": "s3",
            "LAKEFS_BLOCKSTORE_S3_ENDPOINT": store.url,
            "LAKEFS_BLOCKSTORE_S3_FORCE_PATH_STYLE": "true",
            "LAKEFS_BLOCKSTORE_S3_REGION": "us-east-1",
            "LAKEFS_BLOCKSTORE_S3_CREDENTIALS_ACCESS_KEY_ID": store.access_key_id,
            "LAKEFS_BLOCKSTORE_S3_CREDENTIALS_SECRET_ACCESS_KEY": store.secret_access_key,
            "LAKEFS_BLOCKSTORE_DEFAULT_NAMESPACE_PREFIX": f"s3://{store.bucket}/",
        }
    )
    env = {
        **os.environ,
        "LAKEFS_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "LAKEFS_DATABASE_TYPE": "local",
        "LAKEFS_DATABASE_LOCAL_PATH": str(data / "metadata"),
        **blockstore,
        "LAKEFS_COMMITTED_LOCAL_CACHE_DIR": str(data / "cache"),
        "LAKEFS_AUTH_ENCRYPT_SECRET_KEY": "perago-devstack-encrypt-key",
        "LAKEFS_INSTALLATION_USER_NAME": "perago-admin",
        "LAKEFS_INSTALLATION_ACCESS_KEY_ID": DEV_ACCESS_KEY_ID,
        "LAKEFS_INSTALLATION_SECRET_ACCESS_KEY": DEV_SECRET_ACCESS_KEY,
        "LAKEFS_STATS_ENABLED": "false",
        "LAKEFS_USAGE_REPORT_ENABLED": "false",
        "LAKEFS_LOGGING_LEVEL": "WARN",
        "LAKEFS_LOGGING_FORMAT": "text",
        **(extra_env or {}),
    }
    base = f"http://127.0.0.1:{port}"
    return ServerProcess(
        name=name,
        cmd=[str(binary), "run", "--local-settings"],
        env=env,
        workdir=workdir,
        ready=lambda: _http_ok(f"{base}/api/v1/healthcheck"),
    )


def _conductor_ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:  # noqa: S310
            if not json.load(resp).get("healthy"):
                return False
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return False
    return _http_ok(f"{base}/api/metadata/taskdefs")


def conductor_server(workdir: Path, port: int, jar: Path, java: Path) -> ServerProcess:
    db = workdir / "conductor.db"
    # A class-data-sharing archive next to the jar, written by the first start, takes
    # about a third off every later JVM start.
    cds = jar.with_suffix(f".{java.parent.parent.name}.jsa")
    cmd = [
        str(java),
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Xss512k",
        "-Djava.awt.headless=true",
        "-XX:+AutoCreateSharedArchive",
        f"-XX:SharedArchiveFile={cds}",
        "-Xlog:cds=off",
        "-jar",
        str(jar),
        f"--server.port={port}",
        "--server.address=127.0.0.1",
        f"--spring.datasource.url=jdbc:sqlite:{db}?busy_timeout=15000&journal_mode=WAL",
        "--conductor.integrations.ai.enabled=false",
        "--conductor.scheduler.enabled=false",
        # Sweep running workflows every few seconds (default 30 s) so that response
        # timeouts and retries happen promptly in tests and the demo.
        "--conductor.app.workflow-offset-timeout=3s",
        "--logging.level.root=WARN",
        "--logging.level.com.netflix.conductor=WARN",
    ]
    base = f"http://127.0.0.1:{port}"
    return ServerProcess(
        name="conductor",
        cmd=cmd,
        env=dict(os.environ),
        workdir=workdir,
        ready=lambda: _conductor_ready(base),
    )


@dataclass(frozen=True)
class Endpoints:
    """How to reach the servers: what tests, the demo and the worker's settings need."""

    lakefs_url: str
    lakefs_access_key_id: str
    lakefs_secret_access_key: str
    conductor_url: str  # the API root, ending in /api
    store: StoreEndpoint | None = None  # set when lakeFS runs on the S3-compatible store

    @property
    def blockstore(self) -> str:
        return "local" if self.store is None else "s3"

    def as_env(self) -> dict[str, str]:
        """The worker's settings for this stack (see `perago_worker.settings`)."""
        return {
            "PERAGO_LAKEFS__ENDPOINT": self.lakefs_url,
            "PERAGO_LAKEFS__ACCESS_KEY_ID": self.lakefs_access_key_id,
            "PERAGO_LAKEFS__SECRET_ACCESS_KEY": self.lakefs_secret_access_key,
            "PERAGO_CONDUCTOR__URL": self.conductor_url,
        }


def endpoints_from_env(environ: Mapping[str, str]) -> Endpoints | None:
    """The stack `python -m perago_worker.devstack up` printed (its `PERAGO_TEST_*` exports),
    or None when `PERAGO_TEST_LAKEFS_URL` / `PERAGO_TEST_CONDUCTOR_URL` are unset.

    Tests, benchmarks and bench scripts reuse a running stack through it; a variable the
    exports always hold (a key) raises `KeyError` when missing.
    """
    lakefs_url = environ.get("PERAGO_TEST_LAKEFS_URL")
    conductor_url = environ.get("PERAGO_TEST_CONDUCTOR_URL")
    if not (lakefs_url and conductor_url):
        return None
    store_url = environ.get("PERAGO_TEST_STORE_URL")
    return Endpoints(
        lakefs_url=lakefs_url.rstrip("/"),
        lakefs_access_key_id=environ["PERAGO_TEST_LAKEFS_ACCESS_KEY_ID"],
        lakefs_secret_access_key=environ["PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY"],
        conductor_url=conductor_url.rstrip("/"),
        store=StoreEndpoint(
            store_url,
            environ["PERAGO_TEST_STORE_ACCESS_KEY_ID"],
            environ["PERAGO_TEST_STORE_SECRET_ACCESS_KEY"],
            environ.get("PERAGO_TEST_STORE_BUCKET") or BUCKET,
        )
        if store_url
        else None,
    )


@dataclass
class Stack:
    """A running lakeFS + Conductor pair, and the object store under lakeFS on `s3`."""

    workdir: Path
    lakefs: ServerProcess
    conductor: ServerProcess
    endpoints: Endpoints
    lakectl: Path
    timings: dict[str, float]
    store: ServerProcess | None = None

    @property
    def servers(self) -> tuple[ServerProcess, ...]:
        return (self.lakefs, self.conductor) + ((self.store,) if self.store else ())

    def stop(self) -> None:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda s: s.stop(), self.servers))

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"----- {s.name} log ({s.log_path}) -----\n{s.tail(lines)}" for s in self.servers
        )


def _timed(timings: dict[str, float], key: str, fn: Callable[[], object]) -> object:
    started = time.monotonic()
    try:
        return fn()
    finally:
        timings[key] = time.monotonic() - started


def start_stack(
    workdir: Path, *, blockstore: str = "local", log: Callable[[str], None] = print
) -> Stack:
    """Obtain (cached), start and wait for the servers, printing how long each step took.

    The servers start concurrently: Conductor's JVM start dominates, and lakeFS (and the
    object store it sits on with `blockstore="s3"`) are ready long before it.
    """
    if blockstore not in BLOCKSTORES:
        raise ValueError(f"blockstore must be one of {', '.join(BLOCKSTORES)}, not {blockstore!r}")
    timings: dict[str, float] = {}
    lock = threading.Lock()

    def step(key: str, fn: Callable[[], object]) -> object:
        result = _timed(timings, key, fn)
        with lock:
            log(f"[devstack] {key}: {timings[key]:.1f}s")
        return result

    total = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        f_bins = pool.submit(step, "obtain lakeFS + lakectl", tools.lakefs_binaries)
        f_jar = pool.submit(step, "obtain Conductor jar", tools.conductor_jar)
        f_java = pool.submit(step, "find Java >= 21", tools.java_runtime)
        f_gw = (
            pool.submit(step, "obtain VersityGW", tools.versitygw_binary)
            if blockstore == "s3"
            else None
        )
        bins = f_bins.result()
        jar = f_jar.result()
        java = f_java.result()
        gateway = f_gw.result() if f_gw is not None else None
    assert isinstance(bins, tools.LakeFSBinaries)
    assert isinstance(jar, Path) and isinstance(java, Path)
    workdir.mkdir(parents=True, exist_ok=True)
    conductor = conductor_server(workdir, free_port(), jar, java)
    conductor.start()
    store: ServerProcess | None = None
    store_endpoint: StoreEndpoint | None = None
    lakefs: ServerProcess | None = None
    try:
        if isinstance(gateway, Path):
            store_port = free_port()
            store = object_store_server(workdir, store_port, gateway)
            store.start()
            step("object store ready", lambda: store.wait_ready(60) if store else 0)
            store_endpoint = StoreEndpoint(
                f"http://127.0.0.1:{store_port}", STORE_ACCESS_KEY_ID, STORE_SECRET_ACCESS_KEY
            )
        lakefs = lakefs_server(workdir, free_port(), bins.lakefs, store=store_endpoint)
        lakefs.start()
        with ThreadPoolExecutor(2) as pool:
            f_l = pool.submit(step, "lakeFS ready", lambda: lakefs.wait_ready(60) if lakefs else 0)
            f_c = pool.submit(step, "Conductor ready", lambda: conductor.wait_ready(240))
            f_l.result()
            f_c.result()
    except BaseException:
        for server in (lakefs, conductor, store):
            if server is not None:
                server.stop(kill=True)
        raise
    timings["total"] = time.monotonic() - total
    log(f"[devstack] servers ready ({blockstore} blockstore): {timings['total']:.1f}s total")
    lakefs_url = lakefs.env["LAKEFS_LISTEN_ADDRESS"]
    conductor_port = next(a for a in conductor.cmd if a.startswith("--server.port=")).split("=")[1]
    endpoints = Endpoints(
        lakefs_url=f"http://{lakefs_url}",
        lakefs_access_key_id=DEV_ACCESS_KEY_ID,
        lakefs_secret_access_key=DEV_SECRET_ACCESS_KEY,
        conductor_url=f"http://127.0.0.1:{conductor_port}/api",
        store=store_endpoint,
    )
    return Stack(workdir, lakefs, conductor, endpoints, bins.lakectl, timings, store)


@contextlib.contextmanager
def running_stack(
    workdir: Path, *, blockstore: str = "local", log: Callable[[str], None] = print
) -> Iterator[Stack]:
    stack = start_stack(workdir, blockstore=blockstore, log=log)
    try:
        yield stack
    finally:
        stack.stop()
