"""What a handler changed: the workspace tree against the manifest taken at materialization.

A file is unchanged when its size, mtime and inode match what was materialized (the same
stat signature git and rsync trust); hashing every byte of a large workspace to find the few
files a handler touched would cost more than uploading them. Anything that is not a regular
file, or that could smuggle a host file into the repository (a symlink, a device, a hard
link to a file outside the workspace), is refused by name.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from perago_worker.paths import UnsafeKey, validate_relative


@dataclass(frozen=True)
class FileSignature:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class ManifestEntry:
    signature: FileSignature
    checksum: str  # the lakeFS checksum of the object it came from


Manifest = dict[PurePosixPath, ManifestEntry]


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


def diff(manifest: Manifest, current: dict[PurePosixPath, os.stat_result]) -> ChangeSet:
    """Pure: the change set of `current` (a scan) against what was materialized."""
    changes = ChangeSet()
    known_inodes = {entry.signature.inode for entry in manifest.values()}
    links_seen = Counter(st.st_ino for st in current.values())
    for rel in sorted(current):
        st = current[rel]
        entry = manifest.get(rel)
        if entry is not None and FileSignature.of(st) == entry.signature:
            continue
        # A hard link whose other names are not in this workspace shares an inode with a
        # file elsewhere on the host; publishing it would publish that file.
        if st.st_nlink > links_seen[st.st_ino] and st.st_ino not in known_inodes:
            raise Unpublishable(rel.as_posix(), "is a hard link to a file outside the workspace")
        target = changes.added if entry is None else changes.modified
        target.append(LocalFile(rel, st.st_size))
    changes.deleted = sorted(rel for rel in manifest if rel not in current)
    return changes
