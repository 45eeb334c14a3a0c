"""Attempt directories: one fresh, private folder per task attempt, never reused.

Layout under the scratch root:

    <scratch>/<task-id>-<random>/
        attempt.json   who owns it (worker id, pid, task id, staging branch, created)
        lock           held (flock) for as long as the attempt lives
        ws/            the workspace root the handler sees

The lock is what `gc` trusts: a crashed process releases it, a live one never does, so gc
can remove leftovers without ever touching a live attempt's folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(text: str, limit: int = 48) -> str:
    return _UNSAFE.sub("-", text)[:limit].strip("-") or "task"


@dataclass
class AttemptDir:
    path: Path
    root: Path
    _lock: IO[str] | None = None

    @classmethod
    def create(cls, scratch_root: Path, task_id: str, owner: dict[str, Any]) -> AttemptDir:
        scratch_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = scratch_root / f"{safe_name(task_id)}-{uuid.uuid4().hex[:12]}"
        path.mkdir(mode=0o700)  # fails if it exists: never reuse
        lock: IO[str] | None = None
        try:
            lock = (path / "lock").open("w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (path / "attempt.json").write_text(
                json.dumps({**owner, "pid": os.getpid(), "created": time.time()})
            )
            root = path / "ws"
            root.mkdir(mode=0o700)
        except BaseException:
            # A half-made folder (disk full, a bad owner record) must not outlive the call.
            if lock is not None:
                lock.close()
            _remove_tree(path)
            raise
        return cls(path, root, lock)

    def record(self, **fields: Any) -> None:
        meta_path = self.path / "attempt.json"
        meta = json.loads(meta_path.read_text())
        meta.update(fields)
        meta_path.write_text(json.dumps(meta))

    def release(self, *, remove: bool) -> None:
        if remove:
            _remove_tree(self.path)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _remove_tree(path: Path) -> None:
    """Remove an attempt folder even if a handler left read-only files or folders in it."""
    for folder, dirs, _files in os.walk(path):
        for name in dirs:
            child = Path(folder) / name
            if not child.is_symlink():  # never chmod what a link points at
                with contextlib.suppress(OSError):
                    child.chmod(0o700)
    shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Leftover:
    path: Path
    owner: dict[str, Any]
    age_seconds: float


def _is_locked(path: Path) -> bool:
    try:
        with (path / "lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


def leftovers(scratch_root: Path, older_than: float) -> Iterator[Leftover]:
    """Attempt folders whose owner is gone (lock free) and that are older than the threshold."""
    if not scratch_root.is_dir():
        return
    now = time.time()
    for path in sorted(scratch_root.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            owner = json.loads((path / "attempt.json").read_text())
        except (OSError, ValueError):
            owner = {}
        age = now - float(owner.get("created", path.stat().st_mtime))
        if age < older_than or _is_locked(path):
            continue
        yield Leftover(path, owner, age)


def remove_leftover(leftover: Leftover) -> None:
    _remove_tree(leftover.path)


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free
