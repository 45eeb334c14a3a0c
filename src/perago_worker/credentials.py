"""A key id and its secret, given as values or read from files that may be rotated.

A Kubernetes Secret mounted as a volume is a folder of files the kubelet replaces
atomically (a symlink swap) when the Secret changes, without restarting the pod. With
`lakefs.access_key_id_file` / `lakefs.secret_access_key_file` (or the Conductor pair) the
worker reads the files at start, looks at them again before each request (one `stat` per
file: the change is seen by their modification time, inode and size) and re-reads them
when the server answers 401, so a rotated Secret takes effect on the next request.

A file that cannot be read later (mid-rotation, removed) keeps the pair last read; at
start it is an error.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_Stamp = tuple[int, int, int] | None


class CredentialsError(ValueError):
    """A credentials file that cannot be read at start, or is empty."""


def _stamp(path: Path | None) -> _Stamp:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def _read(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except ValueError:  # not UTF-8 (caught mid-write): never echo the bytes, they are secret
        raise CredentialsError(f"{path} is not text (being rewritten?)") from None
    if not value:
        raise CredentialsError(f"{path} is empty")
    return value


class Credentials:
    """A (key id, secret) pair; `version` grows by one whenever the pair read changes."""

    def __init__(
        self,
        key: str = "",
        secret: str = "",
        *,
        key_file: Path | None = None,
        secret_file: Path | None = None,
        on_new_secret: Callable[[str], None] | None = None,
    ) -> None:
        self._key_file = key_file
        self._secret_file = secret_file
        # Told every secret read from a file (the composition root masks it in logs).
        self._on_new_secret = on_new_secret
        self._lock = threading.Lock()
        self._key = key
        self._secret = secret
        self.version = 0
        self._stamps: tuple[_Stamp, _Stamp] = (None, None)
        self._basic = ""
        if self.from_files:
            try:
                self._load()
            except (OSError, CredentialsError) as exc:
                raise CredentialsError(f"cannot read credentials: {exc}") from None
        self._basic = self._basic_of(self._key, self._secret)

    @property
    def from_files(self) -> bool:
        return self._key_file is not None or self._secret_file is not None

    @staticmethod
    def _basic_of(key: str, secret: str) -> str:
        return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()

    def _load(self) -> bool:
        """Read the files (under the lock); True when the pair changed."""
        stamps = (_stamp(self._key_file), _stamp(self._secret_file))
        key = _read(self._key_file) if self._key_file is not None else self._key
        secret = _read(self._secret_file) if self._secret_file is not None else self._secret
        self._stamps = stamps
        if (key, secret) == (self._key, self._secret):
            return False
        self._key, self._secret = key, secret
        self._basic = self._basic_of(key, secret)
        self.version += 1
        if self._secret_file is not None and self._on_new_secret is not None:
            self._on_new_secret(secret)
        return True

    def _refresh(self, force: bool) -> bool:
        if not self.from_files:
            return False
        stamps = (_stamp(self._key_file), _stamp(self._secret_file))
        if not force and stamps == self._stamps:
            return False
        with self._lock:
            if not force and stamps == self._stamps:
                return False
            try:
                changed = self._load()
            except (OSError, CredentialsError) as exc:
                log.warning("credentials file unreadable; keeping the last pair", error=str(exc))
                return False
        if changed:
            log.info("credentials reloaded from their files", key_id=self._key)
        return changed

    def current(self) -> tuple[str, str]:
        """The pair to send now (the files re-read first if they changed); read under the
        lock, so never a new key with the old secret."""
        self._refresh(False)
        with self._lock:
            return self._key, self._secret

    def basic(self) -> str:
        """`Authorization: Basic ...` for the current pair."""
        return self.basic_versioned()[0]

    def basic_versioned(self) -> tuple[str, int]:
        """The Basic header and the `version` it belongs to, read together: a 401 is then
        compared with the pair that was really sent."""
        self._refresh(False)
        with self._lock:
            return self._basic, self.version

    def reload(self) -> bool:
        """Re-read the files now (after a 401); True when the pair changed."""
        return self._refresh(True)

    @property
    def key(self) -> str:
        return self.current()[0]

    @property
    def secret(self) -> str:
        return self.current()[1]

    def __repr__(self) -> str:
        source = "files" if self.from_files else "values"
        return f"Credentials(key={self._key!r}, from {source})"


def file_secret(path: Path | None) -> str:
    """What a secret file holds now, for masking in logs ('' when unreadable or unset)."""
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return ""


__all__ = ["Credentials", "CredentialsError", "file_secret"]
