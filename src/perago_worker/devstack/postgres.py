"""PostgreSQL as a local process: the production persistence under `--conductor postgres`.

Conductor OSS keeps its metadata, executions, queues, index and workflow locks in it, and
lakeFS its KV store, so two Conductors and two lakeFS servers on one PostgreSQL behave as a
scaled-out deployment does: one queue, one lock table, one set of branches.

The cluster is a throwaway: `initdb` with `trust` authentication, listening on 127.0.0.1
only (and a Unix socket in a folder of its own, never the system's `/var/run/postgresql`),
`fsync` off (a killed server keeps its data, only a machine crash could lose some), one
superuser role, `perago`, no password.

**Root.** `initdb` and `postgres` refuse to run as root. When this process is root, every
PostgreSQL program runs as an unprivileged account instead (`nobody` by default,
`PERAGO_POSTGRES_OS_USER` to choose another), switched to with `setpriv` (util-linux; `runuser`
when only that exists). That account owns the cluster's folder, so the folder must be
reachable by it: the stack's folder is used when it is (`<workdir>/postgres`), and when it is
not (pytest's temporary root is 0700 and owned by root, so `nobody` cannot pass through it) a
private folder in the system's temporary directory is used, linked from `<workdir>/postgres`,
and deleted by `discard()`. Nothing outside that folder is touched (no permissions are
loosened on the caller's folders).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from perago_worker.devstack import tools

SUPERUSER = "perago"
DATABASES = ("conductor", "lakefs")
DEFAULT_OS_USER = "nobody"
# Two Conductors (Hikari's default pool of 10 each) and two lakeFS (capped at 10 each in
# servers.lakefs_server) need 40; the rest is headroom for psql and a third instance.
MAX_CONNECTIONS = 100
# A Unix socket's path must fit in sockaddr_un (107 bytes); `.s.PGSQL.<port>.lock` is 20 more.
_MAX_SOCKET_DIR = 80


def os_user() -> str | None:
    """The account PostgreSQL runs as: None (this process's own) unless we are root."""
    if os.geteuid() != 0:
        return None
    return os.environ.get("PERAGO_POSTGRES_OS_USER") or DEFAULT_OS_USER


def as_user(cmd: list[str], user: str | None) -> list[str]:
    """`cmd` run as `user` (None: unchanged). `setpriv` keeps the environment and execs
    directly (no PAM session, no login shell); `runuser` is the fallback."""
    if user is None:
        return cmd
    entry = pwd.getpwnam(user)
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [
            setpriv,
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "--",
            *cmd,
        ]
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", user, "--", *cmd]
    raise RuntimeError(
        f"running PostgreSQL as root needs `setpriv` or `runuser` to switch to {user!r}"
    )


@dataclass
class PostgresServer:
    """One PostgreSQL cluster under `workdir/postgres`, started and stopped with `pg_ctl`.

    It answers the calls a stack makes of its servers (`start`, `wait_ready`, `stop`,
    `restart`, `tail`, `log_path`, `name`), so it stops, restarts and shows its log tail the
    way lakeFS and Conductor do.
    """

    workdir: Path
    port: int
    bin_dir: Path
    name: str = "postgres"
    user: str | None = field(default_factory=os_user)
    root: Path = field(init=False)  # data, socket and log; maybe outside workdir (see module)
    _outside: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = self._choose_root()

    # -- where the cluster lives ----------------------------------------------------------

    def _choose_root(self) -> Path:
        link = self.workdir / self.name
        if link.is_symlink():  # a second server object on the same stack folder
            self._outside = True
            return link.resolve()
        link.mkdir(exist_ok=True)
        self._own(link)
        if len(str(link)) <= _MAX_SOCKET_DIR and self._reachable(link):
            return link
        private = Path(tempfile.mkdtemp(prefix="perago-pg-"))
        self._own(private)
        link.rmdir()
        link.symlink_to(private, target_is_directory=True)
        self._outside = True
        return private

    def _own(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)

    def _reachable(self, path: Path) -> bool:
        if self.user is None:
            return True
        probe = as_user(["test", "-w", str(path), "-a", "-x", str(path)], self.user)
        return subprocess.run(probe, check=False, capture_output=True).returncode == 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    # -- what clients need ----------------------------------------------------------------

    def url(self, database: str) -> str:
        """A libpq URL (lakeFS's `database.postgres.connection_string`)."""
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def jdbc_url(self, database: str) -> str:
        """A JDBC URL (Conductor's `spring.datasource.url`)."""
        return f"jdbc:postgresql://127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, from its pid file (None when it is not running)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # -- the lifecycle --------------------------------------------------------------------

    def _program(self, name: str, *args: str) -> list[str]:
        return as_user([str(self.bin_dir / name), *args], self.user)

    def _run(self, cmd: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # Output to a file, not a pipe: `pg_ctl start` leaves a daemon behind that must not
        # hold our pipe open. The file is opened here (by us), so the account need not write
        # to the stack's folder.
        out = self.workdir / f"{self.name}-ctl.log"
        with out.open("a+") as fh:
            start = fh.tell()
            proc = subprocess.run(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                check=False,
                start_new_session=True,
                cwd=self.root,
                env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"},
            )
            fh.seek(start)
            return subprocess.CompletedProcess(cmd, proc.returncode, fh.read(), "")

    def _check(self, cmd: list[str], *, timeout: float = 120) -> str:
        proc = self._run(cmd, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"log tail:\n{self.tail()}"
            )
        return str(proc.stdout)

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def start(self) -> None:
        """initdb on first use, then `pg_ctl start` (which waits until connections work)."""
        if not self.initialized():
            self._check(
                self._program(
                    "initdb",
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                )
            )
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.socket_dir)
        options = " ".join(
            shlex.quote(o)
            for o in (
                "-p",
                str(self.port),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"max_connections={MAX_CONNECTIONS}",
                "-c",
                "fsync=off",
            )
        )
        self._check(
            self._program(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "90",
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-o",
                options,
            ),
            timeout=120,
        )

    def ready(self) -> bool:
        cmd = self._program("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port))
        return subprocess.run(cmd, check=False, capture_output=True, timeout=30).returncode == 0

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.ready():
                return time.monotonic() - started
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s; log tail:\n{self.tail()}")

    def create_databases(self, names: tuple[str, ...] = DATABASES) -> None:
        """One database per client (Conductor, lakeFS), so neither sees the other's tables."""
        for name in names:
            proc = self._run(
                self._program(
                    "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name
                )
            )
            if proc.returncode != 0 and "already exists" not in proc.stdout:
                raise RuntimeError(f"createdb {name} failed:\n{proc.stdout[-2000:]}")

    def stop(self, *, kill: bool = False, timeout: float = 20.0) -> None:
        """`pg_ctl stop`: `fast` mode (clients are disconnected, a clean checkpoint), or
        `immediate` with `kill` (no checkpoint: the next start recovers from the WAL)."""
        if not self.initialized() or self.pid is None:
            return
        mode = "immediate" if kill else "fast"
        proc = self._run(
            self._program(
                "pg_ctl", "stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(self.data)
            ),
            timeout=timeout + 10,
        )
        if proc.returncode != 0 and self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, 9)

    def restart(self, timeout: float = 120.0) -> float:
        self.stop()
        started = time.monotonic()
        self.start()
        self.wait_ready(timeout)
        return time.monotonic() - started

    def discard(self) -> None:
        """Stop, and delete the cluster when it lives outside the stack's folder (nothing
        else would clean the system's temporary directory)."""
        self.stop()
        if self._outside:
            shutil.rmtree(self.root, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.workdir / self.name).unlink()

    def tail(self, lines: int = 40) -> str:
        return tools.log_tail(self.log_path, lines)
