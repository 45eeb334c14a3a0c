"""Workspace prefixes and the mapping between lakeFS object keys and local paths.

lakeFS accepts almost any object key (its validator only bounds the length), so everything
that turns a key into a file name is strict and pure: a key that cannot be mapped safely is
refused by name, and containment is decided on resolved paths, never by string prefix.
Two keys that a file system may store as one name (Unicode normalization; case, where
portable names are asked for) are refused naming both, and a file is opened for upload
only by walking down from the root's descriptor without following any link.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import NoReturn

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


class NameCollision(UnsafeKey):
    """Two spellings a file system may store as one name (`first` < `second`), by their keys."""

    def __init__(self, first: str, second: str, how: str, *, keys: tuple[str, str], what: str):
        if keys == (first, second):
            why = f"and {second!a} are the same name {how}"
        else:
            why = f"and {keys[1]!a} lie in folders {first!a} and {second!a}, the same name {how}"
        ValueError.__init__(self, f"{what} {keys[0]!a} {why}")
        self.key, self.why = keys[0], why
        self.first, self.second, self.keys = first, second, keys


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


_NFC = "under Unicode normalization (NFC)"
_CASELESS = "ignoring case and Unicode normalization (portable_names)"


def _nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _caseless(text: str) -> str:
    # Unicode's canonical caseless match (3.13, D145): NFD(casefold(NFD(x))).
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", text).casefold())


def distinct_names(
    keys: Iterable[str], *, case_insensitive: bool = False, what: str = "object keys"
) -> None:
    """Refuse two keys that a file system may store under one name, naming both spellings.

    Keys are compared folder by folder: `caf\u00e9/a` and `cafe\u0301/b` are distinct keys, but
    a normalizing file system (macOS, some volume drivers) puts both files in one folder and
    the next scan reports them renamed. Names equal under NFC are always refused; with
    `case_insensitive` (the `portable_names` setting) names equal ignoring case are too.
    The pair named depends only on the set of keys: the shallowest clash, lesser spellings
    first. Cost: one normalization per key (a quick check when it is already NFC) and, for
    keys listed folder by folder, about two dict lookups each.

    A key is folded whole: NFC, NFD and case folding never create, drop or move a `/`, nor
    combine across one (it is a starter no mark composes with), so the folded key's
    segments are the folded segments.
    """
    fold = _caseless if case_insensitive else _nfc
    listed = list(keys)
    first_spelling: dict[str, str] = {}  # folded prefix -> the first spelling seen
    for key in listed:
        folded = fold(key)
        end, fend = len(key), len(folded)
        while end > 0:  # from the key up its folders, until one already recorded
            spelled = key[:end]
            known = first_spelling.setdefault(folded[:fend], spelled)
            if known != spelled:
                _name_a_clash(listed, fold, _CASELESS if case_insensitive else _NFC, what)
            if known is not spelled:
                break  # recorded before, and with it every folder above it
            end, fend = key.rfind("/", 0, end), folded.rfind("/", 0, fend)


def _name_a_clash(keys: list[str], fold: Callable[[str], str], how: str, what: str) -> NoReturn:
    """Raise for the shallowest clash among `keys`, its two least spellings, their least keys."""
    spellings: dict[tuple[str, ...], dict[str, str]] = {}
    for key in keys:
        segments, folded = key.split("/"), tuple(fold(key).split("/"))
        for depth in range(1, len(segments) + 1):
            by_spelling = spellings.setdefault(folded[:depth], {})
            text = "/".join(segments[:depth])
            by_spelling[text] = min(by_spelling.get(text, key), key)
    clashes = []
    for folded_prefix, by_spelling in spellings.items():
        if len(by_spelling) > 1:
            a, b = sorted(by_spelling)[:2]
            clashes.append((len(folded_prefix), a, b, by_spelling[a], by_spelling[b]))
    _, first, second, first_key, second_key = min(clashes)
    raise NameCollision(first, second, how, keys=(first_key, second_key), what=what)


_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: a FIFO put in a file's place must not block the open (the fstat refuses it).
_LEAF_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_beneath(root_fd: int, rel: PurePosixPath) -> int:
    """Open `rel` for reading beneath the directory `root_fd`; never follows a link.

    Every folder on the way is opened relative to the one before it with O_NOFOLLOW and
    O_DIRECTORY, and the leaf with O_NOFOLLOW, so a symbolic link anywhere on the path, put
    there at any moment (even between a check and this call), fails the open (ELOOP or
    ENOTDIR) instead of leading out of the root. What was opened is the caller's to check
    (fstat: type, inode, size). Returns a descriptor the caller closes.
    """
    parts = rel.parts
    if not parts or any(p in ("", ".", "..") or "/" in p for p in parts):
        raise UnsafeKey(rel.as_posix(), "is not a plain relative path")
    fd = root_fd
    try:
        for name in parts[:-1]:
            folder = os.open(name, _DIR_FLAGS, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = folder
        return os.open(parts[-1], _LEAF_FLAGS, dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)
