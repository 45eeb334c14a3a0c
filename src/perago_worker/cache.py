"""A bounded, content-addressed cache of objects already fetched, shared by attempts on a host.

Entries are keyed by the lakeFS checksum and size. The cache is filled for free: when an
attempt ends, the materialized files its handler left untouched are hard-linked into the
cache just before the attempt folder is removed, so no byte is copied. A later attempt that
needs the same object gets it without a download:

* `link` mode hard-links the entry into the workspace (metadata only). The file is shared
  with the cache and with concurrent attempts, so it is made read-only; a handler must
  replace such a file (write a new one, rename over it), never modify it in place.
* `copy` mode (the default) gives each attempt its own inode: a reflink where the file
  system supports it (XFS, btrfs: metadata only), otherwise a kernel-side copy. Attempts
  stay strictly private whatever their handlers do.

An entry whose size or mtime no longer matches what the cache set is treated as corrupt
(something wrote to it) and evicted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Literal

CacheMode = Literal["copy", "link"]
# Entries carry this mtime; any write to an entry changes it and so reveals the corruption.
ENTRY_MTIME_NS = 1_000_000_000 * 10**9
_FICLONE = 0x40049409


def _reflink(src: Path, dest: Path) -> bool:
    try:
        with src.open("rb") as s, dest.open("wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        return True
    except OSError:
        with contextlib.suppress(OSError):
            dest.unlink()
        return False


class ObjectCache:
    def __init__(self, folder: Path, max_bytes: int, mode: CacheMode = "copy") -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.mode = mode
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, int] = OrderedDict()
        self._total = 0
        self._reflink_ok = True
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = []
        for path in folder.glob("*/*"):
            with contextlib.suppress(OSError):
                st = path.stat()
                existing.append((st.st_atime, path, st.st_size))
        for _, path, size in sorted(existing):
            self._entries[path] = size
            self._total += size

    def _path(self, checksum: str, size: int) -> Path:
        digest = hashlib.sha256(f"{checksum}:{size}".encode()).hexdigest()
        return self.folder / digest[:2] / digest[2:]

    def _valid(self, path: Path, size: int) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size == size and st.st_mtime_ns == ENTRY_MTIME_NS:
            return True
        self._evict(path)
        return False

    def _evict(self, path: Path) -> None:
        with self._lock:
            size = self._entries.pop(path, None)
            if size is not None:
                self._total -= size
        with contextlib.suppress(OSError):
            path.unlink()

    def link_into(self, checksum: str, size: int, dest: Path) -> bool:
        """Materialize `dest` from the cache; False on a miss (the caller downloads)."""
        if not checksum or self.max_bytes <= 0:
            return False
        entry = self._path(checksum, size)
        if not self._valid(entry, size):
            return False
        try:
            if self.mode == "link":
                os.link(entry, dest)
            elif not (self._reflink_ok and _reflink(entry, dest)):
                self._reflink_ok = False
                shutil.copyfile(entry, dest)
                os.utime(dest, ns=(ENTRY_MTIME_NS, ENTRY_MTIME_NS))
        except OSError:
            return False
        with self._lock:
            if entry in self._entries:
                self._entries.move_to_end(entry)
        return True

    def adopt(self, checksum: str, size: int, source: Path) -> None:
        """Keep `source`, a file about to be deleted, as the entry for (checksum, size)."""
        if not checksum or self.max_bytes <= 0 or size > self.max_bytes:
            return
        entry = self._path(checksum, size)
        if entry.exists():
            return
        entry.parent.mkdir(exist_ok=True, mode=0o700)
        try:
            os.utime(source, ns=(ENTRY_MTIME_NS, ENTRY_MTIME_NS))
            source.chmod(0o444)
            os.link(source, entry)
        except OSError:
            return
        with self._lock:
            self._entries[entry] = size
            self._total += size
            victims = []
            while self._total > self.max_bytes and self._entries:
                victim, vsize = self._entries.popitem(last=False)
                self._total -= vsize
                victims.append(victim)
        for victim in victims:
            with contextlib.suppress(OSError):
                victim.unlink()

    @property
    def total_bytes(self) -> int:
        return self._total
