"""Workspace prefixes and the mapping between lakeFS object keys and local paths.

lakeFS accepts almost any object key (its validator only bounds the length), so everything
that turns a key into a file name is strict and pure: a key that cannot be mapped safely is
refused by name, and containment is decided on resolved paths, never by string prefix.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

MAX_SEGMENT_BYTES = 255
_DRIVE = re.compile(r"^[A-Za-z]:")


class InvalidPrefix(ValueError):
    """A `WorkspaceSpec` prefix that would not stay inside the repository."""


class UnsafeKey(ValueError):
    """An object key (or a local path) that cannot be mapped without escaping the root."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"object key {key!r} {why}")
        self.key = key
        self.why = why


def normalize_prefix(prefix: str) -> str:
    """Return the key prefix for a workspace spec: `""` for the root, else `"a/b/"`.

    `/audio/render`, `audio/render` and `/audio/render/` all mean the same repository folder.
    Host-path spellings are refused rather than guessed at: a drive (`C:`), a UNC host
    (`//host`), a home (`~`), a backslash anywhere, and `.` or `..` segments.
    """
    if not isinstance(prefix, str):
        raise InvalidPrefix(f"prefix must be a string, got {type(prefix).__name__}")
    if "\\" in prefix:
        raise InvalidPrefix(f"prefix {prefix!r} contains a backslash; use '/' separators")
    if "\x00" in prefix:
        raise InvalidPrefix(f"prefix {prefix!r} contains a NUL character")
    if prefix.startswith("//"):
        raise InvalidPrefix(f"prefix {prefix!r} names a network host, not a repository path")
    inner = prefix.strip("/")
    if inner.startswith("~"):
        raise InvalidPrefix(f"prefix {prefix!r} is a home-directory path, not a repository path")
    if _DRIVE.match(inner):
        raise InvalidPrefix(f"prefix {prefix!r} is a drive path, not a repository path")
    if not inner:
        return ""
    for segment in inner.split("/"):
        if segment == "":
            raise InvalidPrefix(f"prefix {prefix!r} has an empty segment ('//')")
        if segment in (".", ".."):
            raise InvalidPrefix(f"prefix {prefix!r} has a {segment!r} segment")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise InvalidPrefix(f"prefix {prefix!r} has a segment longer than 255 bytes")
    return inner + "/"


def validate_relative(rel: str, *, what: str = "path") -> PurePosixPath:
    """Check a workspace-relative POSIX path (a key's remainder, or a check's argument)."""
    if rel == "":
        raise UnsafeKey(rel, f"is an empty {what}")
    if "\x00" in rel:
        raise UnsafeKey(rel, "contains a NUL character")
    if "\\" in rel:
        raise UnsafeKey(rel, "contains a backslash")
    if rel.startswith("/"):
        raise UnsafeKey(rel, f"is an absolute {what}")
    segments = rel.split("/")
    for segment in segments:
        if segment == "":
            raise UnsafeKey(rel, "has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise UnsafeKey(rel, f"has a {segment!r} segment")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise UnsafeKey(rel, "has a segment longer than 255 bytes")
    return PurePosixPath(*segments)


def key_to_relative(key: str, prefix: str) -> PurePosixPath:
    """Map an object key under `prefix` to its path relative to the workspace root."""
    if not key.startswith(prefix):
        raise UnsafeKey(key, f"is not under the prefix {prefix!r}")
    return validate_relative(key[len(prefix) :], what="key")


def relative_to_key(rel: PurePosixPath, prefix: str) -> str:
    return prefix + rel.as_posix()


def contained(root: Path, candidate: Path) -> bool:
    """True when `candidate` resolves inside `root` (symlinks followed, no string tricks)."""
    root_resolved = root.resolve()
    resolved = candidate.resolve()
    return resolved == root_resolved or resolved.is_relative_to(root_resolved)


def local_path(root: Path, rel: PurePosixPath) -> Path:
    """The local file for `rel`, refusing any that would resolve outside `root`."""
    path = root.joinpath(*rel.parts)
    if not contained(root, path):
        raise UnsafeKey(rel.as_posix(), f"resolves outside the workspace root {root}")
    return path


class TreeShape:
    """Tracks keys as they are listed, refusing a key that is both a file and a folder.

    lakeFS can hold `a` and `a/b` at once; a file system cannot. Keys arrive in listing
    order, so the conflict is detected whichever of the two comes first.
    """

    def __init__(self) -> None:
        self._files: set[PurePosixPath] = set()
        self._dirs: set[PurePosixPath] = set()

    def add(self, rel: PurePosixPath) -> None:
        if rel in self._dirs:
            raise UnsafeKey(rel.as_posix(), "is both a file and a folder of other keys")
        for parent in rel.parents:
            if parent == PurePosixPath("."):
                break
            if parent in self._files:
                raise UnsafeKey(
                    rel.as_posix(), f"lies under {parent.as_posix()!r}, which is also a file"
                )
            self._dirs.add(parent)
        self._files.add(rel)
