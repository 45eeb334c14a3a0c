"""Workspace checks (the public API calls them guardrails): assertions about files on disk.

They inspect the local workspace root only: they are not data validation and never alter the
handler's result. A check is a small frozen value so that registration can validate its
argument at import time and a failure can say exactly which check and path failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

from perago_worker.paths import UnsafeKey, validate_relative

CheckKind = Literal["require_file", "require_dir", "require_glob", "forbid_glob"]


@dataclass(frozen=True)
class CheckFailure:
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.detail}"


@dataclass(frozen=True)
class Check:
    kind: CheckKind
    target: str
    min_count: int = 1

    def __str__(self) -> str:
        suffix = (
            f", min_count={self.min_count}"
            if self.kind == "require_glob" and self.min_count != 1
            else ""
        )
        return f"{self.kind}({self.target!r}{suffix})"

    def run(self, root: Path) -> CheckFailure | None:
        if self.kind == "require_file":
            path = root / self.target
            if path.is_symlink() or not path.is_file():
                what = (
                    "is missing"
                    if not path.exists() and not path.is_symlink()
                    else "is not a regular file"
                )
                return CheckFailure(str(self), f"{self.target} {what}")
            return None
        if self.kind == "require_dir":
            path = root / self.target
            if path.is_symlink() or not path.is_dir():
                what = "is missing" if not path.exists() else "is not a directory"
                return CheckFailure(str(self), f"{self.target} {what}")
            return None
        matches = _glob_files(root, self.target)
        if self.kind == "require_glob":
            found = list(islice(matches, self.min_count))
            if len(found) < self.min_count:
                return CheckFailure(
                    str(self), f"{len(found)} file(s) match {self.target!r}, need {self.min_count}"
                )
            return None
        offending = list(islice(matches, 5))
        if offending:
            listed = ", ".join(offending)
            return CheckFailure(str(self), f"forbidden file(s) present: {listed}")
        return None


def _glob_files(root: Path, pattern: str) -> Iterable[str]:
    for match in sorted(root.glob(pattern)):
        if match.is_file() or match.is_symlink():
            yield match.relative_to(root).as_posix()


def _relative(target: str, kind: str) -> str:
    try:
        return validate_relative(
            target.rstrip("/") if kind == "require_dir" else target, what=f"{kind} path"
        ).as_posix()
    except UnsafeKey as exc:
        raise ValueError(f"{kind}({target!r}): {exc.why}") from None


def _pattern(pattern: str, kind: str) -> str:
    if not pattern or pattern.startswith("/") or "\\" in pattern or ".." in pattern.split("/"):
        raise ValueError(
            f"{kind}({pattern!r}): a pattern must be relative, use '/', and have no '..'"
        )
    return pattern


def require_file(path: str) -> Check:
    """The workspace must hold a regular file at `path` (relative to the workspace root)."""
    return Check("require_file", _relative(path, "require_file"))


def require_dir(path: str) -> Check:
    """The workspace must hold a directory at `path`."""
    return Check("require_dir", _relative(path, "require_dir"))


def require_glob(pattern: str, *, min_count: int = 1) -> Check:
    """At least `min_count` files must match the glob (`**` spans folders)."""
    if min_count < 1:
        raise ValueError(f"require_glob({pattern!r}): min_count must be >= 1")
    return Check("require_glob", _pattern(pattern, "require_glob"), min_count)


def forbid_glob(pattern: str) -> Check:
    """No file may match the glob (e.g. `**/*.tmp` left behind by a handler)."""
    return Check("forbid_glob", _pattern(pattern, "forbid_glob"))


def run_checks(checks: Sequence[Check], root: Path) -> list[CheckFailure]:
    """Run every check (not just up to the first failure) so one report names them all."""
    return [failure for check in checks if (failure := check.run(root)) is not None]
