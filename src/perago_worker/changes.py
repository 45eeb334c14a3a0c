"""What a handler changed: the workspace tree against the manifest taken at materialization.

A file is a change exactly when its bytes differ from the bytes materialized (a handler that
regenerates a file with the bytes it had changed nothing, and publishing it would make
lakeFS answer "no changes"). Reading every byte of a large workspace to find the few files
a handler touched would cost more than uploading them, so the common case is one `lstat`:

* a file whose stat signature (size, mtime, ctime, inode) is what materialization recorded
  is unchanged without being read. The ctime is what makes this sound: every write, truncate,
  `utime`, `chmod` or new hard link sets it to the current time, and no unprivileged call can
  set it back, so an in-place edit that keeps the size and restores the mtime (`cp -p`,
  `rsync --inplace -t`, `os.utime`, `shutil.copystat`) still moves the signature;
* a file of another size is modified, without being read;
* a file of the same size whose signature moved is read and its SHA-256 compared with the
  digest computed when it was materialized: equal bytes are not a change.

`verify="hash"` (per task) reads every file of the same size, for file systems whose ctime
cannot be trusted (some network and FUSE mounts). Entries materialized in the same clock
tick as the handler started are marked `racy` (see `materialize`) and always read.

Anything that is not a regular file, or that could smuggle a host file into the repository
(a symlink, a device, a hard link to a file outside the workspace), is refused by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from perago_worker.paths import UnsafeKey, open_beneath, validate_relative

Verify = Literal["stat", "hash"]
VERIFY_MODES: tuple[Verify, ...] = ("stat", "hash")
BLOCK = 1 << 20
# Reading candidates in parallel pays once there is enough to read (hashlib releases the
# interpreter lock for large buffers, so threads hash on every core).
PARALLEL_FILES = 8
PARALLEL_BYTES = 8 << 20
HASH_THREADS = 4


@dataclass(frozen=True)
class FileSignature:
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True)
class ManifestEntry:
    signature: FileSignature
    checksum: str  # the lakeFS checksum of the object it came from (an identity, not a digest)
    digest: str = ""  # SHA-256 of the bytes materialized, computed by the worker; "" = unknown
    cache_key: str = ""  # the object-cache entry these bytes may be kept under; "" = none
    racy: bool = False  # materialized in the clock tick the handler started in: always read


Manifest = dict[PurePosixPath, ManifestEntry]


def digest_fd(fd: int) -> str:
    """SHA-256 (hex) of an open file from offset 0 to its end (pread: the position is unused)."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, BLOCK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


class Unpublishable(ValueError):
    """The workspace holds something that must not be uploaded."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True)
class LocalFile:
    rel: PurePosixPath
    size: int


@dataclass
class ChangeSet:
    added: list[LocalFile] = field(default_factory=list)
    modified: list[LocalFile] = field(default_factory=list)
    deleted: list[PurePosixPath] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.modified or self.deleted)

    @property
    def uploads(self) -> list[LocalFile]:
        return self.added + self.modified

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f in self.uploads)

    def summary(self) -> str:
        return f"+{len(self.added)} ~{len(self.modified)} -{len(self.deleted)}"


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    if stat.S_ISFIFO(mode):
        return "is a named pipe"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is not a regular file"


def scan(root: Path) -> dict[PurePosixPath, os.stat_result]:
    """Every regular file under `root` with its lstat; anything else is refused.

    Walks with lstat only, never following a link, so a link to `/etc` is seen as a link,
    not as the host folder behind it.
    """
    found: dict[PurePosixPath, os.stat_result] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                rel_text = Path(entry.path).relative_to(root).as_posix()
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    raise Unpublishable(
                        rel_text, _kind(st.st_mode) + "; only regular files can be published"
                    )
                try:
                    rel = validate_relative(rel_text, what="file name")
                except UnsafeKey as exc:
                    raise Unpublishable(rel_text, exc.why) from None
                found[rel] = st
    return found


def same_bytes(root_fd: int, rel: PurePosixPath, seen: os.stat_result, digest: str) -> bool:
    """Whether the file at `rel` still is the one scanned and holds bytes hashing to `digest`.

    Opened beneath the root without following a link; a file that is not the one the scan
    saw (another inode, another size) counts as different, so the publish looks at it.
    """
    if not digest:
        return False
    try:
        fd = open_beneath(root_fd, rel)
    except (OSError, UnsafeKey):
        return False
    try:
        now = os.fstat(fd)
        if (now.st_ino, now.st_size) != (seen.st_ino, seen.st_size):
            return False
        return digest_fd(fd) == digest
    finally:
        os.close(fd)


def _unchanged_by_content(
    root: Path,
    candidates: list[tuple[PurePosixPath, os.stat_result, str]],
) -> set[PurePosixPath]:
    """The candidates whose bytes equal what was materialized (read, hashed, compared)."""
    if not candidates:
        return set()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:

        def check(item: tuple[PurePosixPath, os.stat_result, str]) -> bool:
            return same_bytes(root_fd, *item)

        total = sum(st.st_size for _, st, _ in candidates)
        results: Iterable[bool]
        if len(candidates) >= PARALLEL_FILES or total >= PARALLEL_BYTES:
            with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="diff-hash") as pool:
                results = list(pool.map(check, candidates))
        else:
            results = [check(item) for item in candidates]
        return {rel for (rel, _, _), same in zip(candidates, results, strict=True) if same}
    finally:
        os.close(root_fd)


def _trusted(entry: ManifestEntry, st: os.stat_result, verify: Verify) -> bool:
    """Unchanged on its signature alone: the stat-only fast path."""
    return verify == "stat" and not entry.racy and FileSignature.of(st) == entry.signature


def diff(
    manifest: Manifest,
    current: dict[PurePosixPath, os.stat_result],
    root: Path | None = None,
    *,
    verify: Verify = "stat",
) -> ChangeSet:
    """The change set of `current` (a scan of `root`) against what was materialized.

    Only files of the materialized size whose signature moved (every file of that size with
    `verify="hash"`, and racy entries) are read, from `root`. Without `root` nothing is read
    and every such file counts as modified (the stat-only answer, for callers that have no
    workspace to read).
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    known_inodes = {entry.signature.inode for entry in manifest.values()}
    links_seen = Counter(st.st_ino for st in current.values())
    candidates: list[tuple[PurePosixPath, os.stat_result, str]] = []
    for rel, st in current.items():
        entry = manifest.get(rel)
        same_size = entry is not None and st.st_size == entry.signature.size
        if entry is not None and same_size and not _trusted(entry, st, verify):
            candidates.append((rel, st, entry.digest))
    unchanged = _unchanged_by_content(root, candidates) if root is not None else set()
    changes = ChangeSet()
    for rel in sorted(current):
        st = current[rel]
        entry = manifest.get(rel)
        if entry is not None and (rel in unchanged or _trusted(entry, st, verify)):
            continue
        # A hard link whose other names are not in this workspace shares an inode with a
        # file elsewhere on the host; publishing it would publish that file.
        if st.st_nlink > links_seen[st.st_ino] and st.st_ino not in known_inodes:
            raise Unpublishable(rel.as_posix(), "is a hard link to a file outside the workspace")
        target = changes.added if entry is None else changes.modified
        target.append(LocalFile(rel, st.st_size))
    changes.deleted = sorted(rel for rel in manifest if rel not in current)
    return changes


def untouched(path: Path, entry: ManifestEntry) -> os.stat_result | None:
    """The lstat of `path` if it is a regular file whose signature is still `entry`'s."""
    with contextlib.suppress(OSError):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and FileSignature.of(st) == entry.signature:
            return st
    return None
