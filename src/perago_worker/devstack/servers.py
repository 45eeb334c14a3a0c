"""Start real lakeFS and Conductor servers as local processes on free loopback ports.

The servers keep their state in a folder of the caller's choosing and write their logs to
files there, so a failing test can show the tail, and a fault test can stop and restart a
server on the same port and data.

Two persistences (`conductor=`): `sqlite` (the default: one Conductor on a SQLite file, one
lakeFS on its local KV, what the demo and most tests use) and `postgres` (a PostgreSQL
process, `devstack.postgres`, under TWO Conductors and TWO lakeFS servers on the S3 store: a
scaled-out deployment, where a task scheduled through one Conductor is polled through the
other and merges into one branch race across lakeFS servers).
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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from perago_worker.devstack import tools
from perago_worker.devstack.postgres import SUPERUSER, PostgresServer

# Fixed dev credentials: these only ever guard a throwaway server bound to loopback.
DEV_ACCESS_KEY_ID = "AKIAPERAGODEVSTACK01"
DEV_SECRET_ACCESS_KEY = "perago-devstack-secret-not-for-production-0"  # noqa: S105
STORE_ACCESS_KEY_ID = "PERAGODEVSTORE000001"
STORE_SECRET_ACCESS_KEY = "perago-devstore-secret-not-for-production"  # noqa: S105
BUCKET = "perago-dev"
# `local`: lakeFS keeps objects in a folder (fastest to start, what the demo uses). `s3`: an
# S3-compatible store (VersityGW) under lakeFS, as in production, with presigned transfers.
BLOCKSTORES = ("local", "s3")
# Where Conductor keeps everything (and, with it, lakeFS its KV): see the module docstring.
CONDUCTOR_PERSISTENCES = ("sqlite", "postgres")
# How many Conductor and lakeFS servers the `postgres` stack runs on its one database.
CLUSTER_SIZE = 2
# lakeFS opens up to 25 database connections by default; two of them and two Conductors
# stay well under `postgres.MAX_CONNECTIONS` with 10 each.
LAKEFS_DB_CONNECTIONS = 10
# How long one Conductor may take to answer after its JVM starts (see start_stack).
CONDUCTOR_READY_SECONDS = 480.0


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
        return tools.log_tail(self.log_path, lines)


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
    postgres: PostgresServer | None = None,
) -> ServerProcess:
    """lakeFS on its local blockstore, or on `store` (the `s3` blockstore, path style); its
    KV in a local folder, or in `postgres`'s `lakefs` database.

    The default namespace prefix lets clients make a repository's storage namespace without
    knowing the blockstore (`LakeFS.create_repository` reads it from the storage config).
    Servers sharing one KV must share the auth encryption key (it encrypts the stored
    credentials) and are set up once, by `lakefs_setup`: lakeFS 1.86 applies the
    `installation.*` settings only on a local KV (`cmd/lakefs/cmd/run.go`).
    """
    data = workdir / f"{name}-data"
    database = (
        {"LAKEFS_DATABASE_TYPE": "local", "LAKEFS_DATABASE_LOCAL_PATH": str(data / "metadata")}
        if postgres is None
        else {
            "LAKEFS_DATABASE_TYPE": "postgres",
            "LAKEFS_DATABASE_POSTGRES_CONNECTION_STRING": postgres.url("lakefs"),
            "LAKEFS_DATABASE_POSTGRES_MAX_OPEN_CONNECTIONS": str(LAKEFS_DB_CONNECTIONS),
            "LAKEFS_DATABASE_POSTGRES_MAX_IDLE_CONNECTIONS": str(LAKEFS_DB_CONNECTIONS),
        }
    )
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
        **database,
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


def lakefs_setup(server: ServerProcess) -> None:
    """`lakefs setup` with `server`'s settings: the admin user and the dev key pair, written
    once into a shared KV before any server of it starts (a second run says "already
    complete", which is fine: a restarted stack keeps its KV)."""
    binary = server.cmd[0]
    proc = subprocess.run(
        [
            binary,
            "setup",
            "--local-settings",
            "--user-name",
            server.env["LAKEFS_INSTALLATION_USER_NAME"],
            "--access-key-id",
            server.env["LAKEFS_INSTALLATION_ACCESS_KEY_ID"],
            "--secret-access-key",
            server.env["LAKEFS_INSTALLATION_SECRET_ACCESS_KEY"],
        ],
        env=server.env,
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0 and "already complete" not in proc.stdout:
        raise RuntimeError(f"lakefs setup failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


def _conductor_ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:  # noqa: S310
            if not json.load(resp).get("healthy"):
                return False
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return False
    return _http_ok(f"{base}/api/metadata/taskdefs")


def _persistence_args(workdir: Path, postgres: PostgresServer | None) -> list[str]:
    """Conductor's Spring properties for SQLite (its defaults, a file in `workdir`) or for
    PostgreSQL: metadata and executions (`conductor.db.type`), the task and decider queues
    (`conductor.queue.type`), the search index (`conductor.indexing.*`; version 0 keeps it
    off Elasticsearch) and the workflow execution lock (`conductor.workflow-execution-lock.
    type`: a `locks` table, where SQLite's is an in-process lock), as read from Conductor
    3.32's `PostgresConfiguration`, `ConductorProperties` and docs/.../postgresql.md."""
    if postgres is None:
        db = workdir / "conductor.db"
        return [f"--spring.datasource.url=jdbc:sqlite:{db}?busy_timeout=15000&journal_mode=WAL"]
    return [
        f"--spring.datasource.url={postgres.jdbc_url('conductor')}",
        f"--spring.datasource.username={SUPERUSER}",
        "--spring.datasource.password=",
        "--conductor.db.type=postgres",
        "--conductor.queue.type=postgres",
        "--conductor.indexing.enabled=true",
        "--conductor.indexing.type=postgres",
        "--conductor.elasticsearch.version=0",
        "--conductor.app.workflowExecutionLockEnabled=true",
        "--conductor.workflow-execution-lock.type=postgres",
    ]


def conductor_server(
    workdir: Path,
    port: int,
    jar: Path,
    java: Path,
    *,
    postgres: PostgresServer | None = None,
    name: str = "conductor",
) -> ServerProcess:
    """Conductor on SQLite (a file in `workdir`) or on `postgres`'s `conductor` database;
    any number of them can share one PostgreSQL."""
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
        *_persistence_args(workdir, postgres),
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
        name=name,
        cmd=cmd,
        env=dict(os.environ),
        workdir=workdir,
        ready=lambda: _conductor_ready(base),
    )


@dataclass(frozen=True)
class Endpoints:
    """How to reach the servers: what tests, the demo and the worker's settings need.

    `lakefs_url` and `conductor_url` are the first server of each; `lakefs_urls` and
    `conductor_urls` list every one (a single-server stack's tuples hold just those two).
    """

    lakefs_url: str
    lakefs_access_key_id: str
    lakefs_secret_access_key: str
    conductor_url: str  # the API root, ending in /api
    store: StoreEndpoint | None = None  # set when lakeFS runs on the S3-compatible store
    lakefs_urls: tuple[str, ...] = ()
    conductor_urls: tuple[str, ...] = ()
    conductor_persistence: str = "sqlite"

    def __post_init__(self) -> None:
        # Frozen: the defaults are filled in once, here, so every reader sees full tuples.
        if not self.lakefs_urls:
            object.__setattr__(self, "lakefs_urls", (self.lakefs_url,))
        if not self.conductor_urls:
            object.__setattr__(self, "conductor_urls", (self.conductor_url,))
        if self.conductor_persistence not in CONDUCTOR_PERSISTENCES:
            raise ValueError(
                f"conductor_persistence must be one of {CONDUCTOR_PERSISTENCES}, "
                f"not {self.conductor_persistence!r}"
            )

    @property
    def blockstore(self) -> str:
        return "local" if self.store is None else "s3"

    def instance(self, index: int) -> Endpoints:
        """The same stack seen through its `index`-th Conductor and lakeFS (a worker of that
        instance is started with `instance(i).as_env()`)."""
        return replace(
            self,
            lakefs_url=self.lakefs_urls[index % len(self.lakefs_urls)],
            conductor_url=self.conductor_urls[index % len(self.conductor_urls)],
        )

    def as_env(self) -> dict[str, str]:
        """The worker's settings for this stack (see `perago_worker.settings`): the first
        Conductor and lakeFS; `instance(i).as_env()` for another."""
        return {
            "PERAGO_LAKEFS__ENDPOINT": self.lakefs_url,
            "PERAGO_LAKEFS__ACCESS_KEY_ID": self.lakefs_access_key_id,
            "PERAGO_LAKEFS__SECRET_ACCESS_KEY": self.lakefs_secret_access_key,
            "PERAGO_CONDUCTOR__URL": self.conductor_url,
        }

    def as_test_env(self) -> dict[str, str]:
        """The `PERAGO_TEST_*` variables `endpoints_from_env` reads back: what the `up`
        command prints, so a test session or a benchmark reuses this stack. Kept apart from
        `as_env`, which is a worker's own settings."""
        env = {
            "PERAGO_TEST_LAKEFS_URL": self.lakefs_url,
            "PERAGO_TEST_CONDUCTOR_URL": self.conductor_url,
            "PERAGO_TEST_LAKEFS_URLS": ",".join(self.lakefs_urls),
            "PERAGO_TEST_CONDUCTOR_URLS": ",".join(self.conductor_urls),
            "PERAGO_TEST_CONDUCTOR_PERSISTENCE": self.conductor_persistence,
            "PERAGO_TEST_LAKEFS_ACCESS_KEY_ID": self.lakefs_access_key_id,
            "PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY": self.lakefs_secret_access_key,
        }
        if self.store is not None:
            env |= {
                "PERAGO_TEST_STORE_URL": self.store.url,
                "PERAGO_TEST_STORE_BUCKET": self.store.bucket,
                "PERAGO_TEST_STORE_ACCESS_KEY_ID": self.store.access_key_id,
                "PERAGO_TEST_STORE_SECRET_ACCESS_KEY": self.store.secret_access_key,
            }
        return env


def _urls(value: str | None) -> tuple[str, ...]:
    return tuple(u.strip().rstrip("/") for u in (value or "").split(",") if u.strip())


def endpoints_from_env(environ: Mapping[str, str]) -> Endpoints | None:
    """The stack `python -m perago_worker.devstack up` printed (its `PERAGO_TEST_*` exports),
    or None when `PERAGO_TEST_LAKEFS_URL` / `PERAGO_TEST_CONDUCTOR_URL` are unset.

    Tests, benchmarks and bench scripts reuse a running stack through it; a variable the
    exports always hold (a key) raises `KeyError` when missing. `PERAGO_TEST_*_URLS`
    (comma-separated) and `PERAGO_TEST_CONDUCTOR_PERSISTENCE` are optional: without them the
    stack is the single-server one the two URLs name.
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
        lakefs_urls=_urls(environ.get("PERAGO_TEST_LAKEFS_URLS")),
        conductor_urls=_urls(environ.get("PERAGO_TEST_CONDUCTOR_URLS")),
        conductor_persistence=environ.get("PERAGO_TEST_CONDUCTOR_PERSISTENCE") or "sqlite",
    )


@dataclass
class Stack:
    """A running lakeFS + Conductor pair (or, on `postgres`, two of each and the PostgreSQL
    under them), and the object store under lakeFS on `s3`.

    `lakefs` and `conductor` are the first server of each (what single-server callers
    restart); `lakefs_servers` and `conductors` hold every one.
    """

    workdir: Path
    lakefs: ServerProcess
    conductor: ServerProcess
    endpoints: Endpoints
    lakectl: Path
    timings: dict[str, float]
    store: ServerProcess | None = None
    conductors: tuple[ServerProcess, ...] = ()
    lakefs_servers: tuple[ServerProcess, ...] = ()
    postgres: PostgresServer | None = None

    def __post_init__(self) -> None:
        if not self.conductors:
            self.conductors = (self.conductor,)
        if not self.lakefs_servers:
            self.lakefs_servers = (self.lakefs,)

    @property
    def servers(self) -> tuple[ServerProcess, ...]:
        """Every server process except PostgreSQL (which is stopped last, after its clients)."""
        return self.lakefs_servers + self.conductors + ((self.store,) if self.store else ())

    def stop(self) -> None:
        servers = self.servers
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.stop(), servers))
        if self.postgres is not None:
            self.postgres.discard()

    def log_tails(self, lines: int = 30) -> str:
        logs: list[ServerProcess | PostgresServer] = [*self.servers]
        if self.postgres is not None:
            logs.append(self.postgres)
        return "\n".join(f"----- {s.name} log ({s.log_path}) -----\n{s.tail(lines)}" for s in logs)


def _timed(timings: dict[str, float], key: str, fn: Callable[[], object]) -> object:
    started = time.monotonic()
    try:
        return fn()
    finally:
        timings[key] = time.monotonic() - started


def resolve_blockstore(blockstore: str | None, conductor: str) -> str:
    """The blockstore a stack runs: `local` by default on SQLite, `s3` on PostgreSQL.

    Servers sharing one lakeFS KV must share its objects too, which the local blockstore
    (a folder per server) cannot do: `local` with `postgres` is refused.
    """
    if conductor not in CONDUCTOR_PERSISTENCES:
        raise ValueError(
            f"conductor must be one of {', '.join(CONDUCTOR_PERSISTENCES)}, not {conductor!r}"
        )
    chosen = blockstore or ("s3" if conductor == "postgres" else "local")
    if chosen not in BLOCKSTORES:
        raise ValueError(f"blockstore must be one of {', '.join(BLOCKSTORES)}, not {chosen!r}")
    if conductor == "postgres" and chosen != "s3":
        raise ValueError(
            "conductor='postgres' runs two lakeFS servers on one KV, and they must share their "
            "objects: use blockstore='s3' (the default there), not 'local'"
        )
    return chosen


def start_stack(
    workdir: Path,
    *,
    blockstore: str | None = None,
    conductor: str = "sqlite",
    log: Callable[[str], None] = print,
) -> Stack:
    """Obtain (cached), start and wait for the servers, printing how long each step took.

    The servers start concurrently: Conductor's JVM start dominates, and lakeFS (and the
    object store it sits on with `blockstore="s3"`) are ready long before it. On
    `conductor="postgres"` PostgreSQL comes first (every other server connects to it at
    start), then both Conductors (their Flyway migrations serialise on an advisory lock),
    `lakefs setup` once, and both lakeFS servers.
    """
    blockstore = resolve_blockstore(blockstore, conductor)
    clustered = conductor == "postgres"
    timings: dict[str, float] = {}
    lock = threading.Lock()

    def step(key: str, fn: Callable[[], object]) -> object:
        result = _timed(timings, key, fn)
        with lock:
            log(f"[devstack] {key}: {timings[key]:.1f}s")
        return result

    total = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    postgres: PostgresServer | None = None
    with ThreadPoolExecutor(5) as pool:
        f_bins = pool.submit(step, "obtain lakeFS + lakectl", tools.lakefs_binaries)
        f_jar = pool.submit(step, "obtain Conductor jar", tools.conductor_jar)
        f_java = pool.submit(step, "find Java >= 21", tools.java_runtime)
        f_gw = (
            pool.submit(step, "obtain VersityGW", tools.versitygw_binary)
            if blockstore == "s3"
            else None
        )
        if clustered:
            postgres = PostgresServer(workdir, free_port(), tools.postgres_bin_dir())
            f_pg = pool.submit(step, "PostgreSQL ready", _start_postgres(postgres))
        try:
            bins = f_bins.result()
            jar = f_jar.result()
            java = f_java.result()
            gateway = f_gw.result() if f_gw is not None else None
            if clustered:
                f_pg.result()
        except BaseException:
            if postgres is not None:
                postgres.discard()
            raise
    assert isinstance(bins, tools.LakeFSBinaries)
    assert isinstance(jar, Path) and isinstance(java, Path)
    count = CLUSTER_SIZE if clustered else 1
    conductors = tuple(
        conductor_server(
            workdir, free_port(), jar, java, postgres=postgres, name=_nth("conductor", i)
        )
        for i in range(count)
    )
    for server in conductors:
        server.start()
    store: ServerProcess | None = None
    store_endpoint: StoreEndpoint | None = None
    lakefs_servers: tuple[ServerProcess, ...] = ()
    try:
        if isinstance(gateway, Path):
            store_port = free_port()
            store = object_store_server(workdir, store_port, gateway)
            store.start()
            step("object store ready", lambda: store.wait_ready(60) if store else 0)
            store_endpoint = StoreEndpoint(
                f"http://127.0.0.1:{store_port}", STORE_ACCESS_KEY_ID, STORE_SECRET_ACCESS_KEY
            )
        lakefs_servers = tuple(
            lakefs_server(
                workdir,
                free_port(),
                bins.lakefs,
                store=store_endpoint,
                name=_nth("lakefs", i),
                postgres=postgres,
            )
            for i in range(count)
        )
        if clustered:
            step("lakeFS setup", lambda: lakefs_setup(lakefs_servers[0]))
        for server in lakefs_servers:
            server.start()
        # A wait, not a sleep: an idle machine starts Conductor in about 30 s, but a 2-core
        # machine shared with other stacks took over 240 s (measured, load ~25). The JVMs
        # start together and share the cores: each gets the time one would have alone.
        waits = [(s, 60.0) for s in lakefs_servers] + [
            (s, CONDUCTOR_READY_SECONDS * count) for s in conductors
        ]
        with ThreadPoolExecutor(len(waits)) as pool:
            futures = [
                pool.submit(step, _label(f"{s.name} ready"), partial(s.wait_ready, t))
                for s, t in waits
            ]
            for future in futures:
                future.result()
    except BaseException:
        for started in (*lakefs_servers, *conductors, store):
            if started is not None:
                started.stop(kill=True)
        if postgres is not None:
            postgres.discard()
        raise
    timings["total"] = time.monotonic() - total
    log(
        f"[devstack] servers ready ({blockstore} blockstore, {conductor} persistence"
        f"{f', {count} Conductors and {count} lakeFS' if clustered else ''}): "
        f"{timings['total']:.1f}s total"
    )
    lakefs_urls = tuple(f"http://{s.env['LAKEFS_LISTEN_ADDRESS']}" for s in lakefs_servers)
    conductor_urls = tuple(f"http://127.0.0.1:{_port_of(s)}/api" for s in conductors)
    endpoints = Endpoints(
        lakefs_url=lakefs_urls[0],
        lakefs_access_key_id=DEV_ACCESS_KEY_ID,
        lakefs_secret_access_key=DEV_SECRET_ACCESS_KEY,
        conductor_url=conductor_urls[0],
        store=store_endpoint,
        lakefs_urls=lakefs_urls,
        conductor_urls=conductor_urls,
        conductor_persistence=conductor,
    )
    return Stack(
        workdir,
        lakefs_servers[0],
        conductors[0],
        endpoints,
        bins.lakectl,
        timings,
        store,
        conductors=conductors,
        lakefs_servers=lakefs_servers,
        postgres=postgres,
    )


def _nth(name: str, index: int) -> str:
    """`lakefs`, `lakefs-b`, ...: the first server keeps the single-server name (its log
    file, data folder and timing label stay what they were)."""
    return name if index == 0 else f"{name}-{chr(ord('a') + index)}"


def _label(key: str) -> str:
    """The timing labels of the single-server stack ("lakeFS ready", "Conductor ready")."""
    return key.replace("lakefs", "lakeFS", 1).replace("conductor", "Conductor", 1)


def _port_of(server: ServerProcess) -> str:
    return next(a for a in server.cmd if a.startswith("--server.port=")).split("=")[1]


def _start_postgres(postgres: PostgresServer) -> Callable[[], object]:
    def run() -> None:
        postgres.start()
        postgres.wait_ready(60)
        postgres.create_databases()

    return run


@contextlib.contextmanager
def running_stack(
    workdir: Path,
    *,
    blockstore: str | None = None,
    conductor: str = "sqlite",
    log: Callable[[str], None] = print,
) -> Iterator[Stack]:
    stack = start_stack(workdir, blockstore=blockstore, conductor=conductor, log=log)
    try:
        yield stack
    finally:
        stack.stop()
