"""A bounded object cache shared by the attempts and processes of a host; it never serves wrong bytes.

An object a previous attempt materialized is copied from here instead of downloaded. The
folder (`<scratch_root>/.cache`) holds:

    lock            flock'ed by whichever process adds or evicts entries
    total           the bytes under blobs/, as accounted under the lock
    blobs/ab/cd...  file contents, each named by its SHA-256
    keys/12/34...   one symlink per object, named by a hash of its key, pointing to the
                    SHA-256 of its bytes (the link's text only: it is read, never followed)

Why a wrong byte cannot come out of it:

* **Keys are scoped.** An object's key is (repository scope, lakeFS checksum, size, mtime),
  the scope naming the lakeFS server, the repository, its storage namespace and creation
  time (`materialize.repository_scope`): a checksum (an ETag) says nothing outside its
  repository's storage, so two repositories, servers or environments never share a key.
* **Digests are the worker's own.** What a key points to is the SHA-256 the worker computed
  from the bytes lakeFS sent, before any handler could touch them.
* **Every serve is verified.** A hit is copied into the attempt's workspace (its own inode:
  a reflink where the file system supports it, else a copy) and what was copied is hashed;
  a copy whose hash is not the digest is discarded, the blob evicted, the object downloaded.
  The hash is also the manifest's digest, so verifying costs nothing extra. Whatever wrote
  to an entry (a process still holding a file it adopted, someone editing a kept workspace)
  can make an entry useless, never wrong.
* **Entries come from files provably untouched.** When an attempt ends, the materialized
  files whose whole signature (size, mtime, ctime, inode) is what materialization recorded
  are hard-linked in (no copy); racy ones (see `materialize.settle`) are re-hashed first.

No attempt ever gets a cache inode: the former `link` mode, which hard-linked entries into
workspaces, let one attempt's in-place write change another attempt's input, and is gone.

The size bound holds for every process sharing the folder: additions are accounted in
`total` under the lock, and one that would pass `max_bytes` first evicts the least recently
served blobs. The count is taken again from disk when a cache opens and at every eviction,
so a process that died between the two steps only makes the bound stricter until then.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from perago_worker.changes import BLOCK, Manifest, digest_fd, same_bytes, untouched

CacheMode = Literal["copy"]
LINK_MODE_REMOVED = (
    "cache mode 'link' was removed: it hard-linked one cache inode into several attempts, so "
    "an in-place write by one handler changed the input of others; use 'copy' (a reflink "
    "where the file system supports it, else a copy; every hit is verified by its SHA-256)"
)
_FICLONE = 0x40049409
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_OLD_LAYOUT = re.compile(r"^[0-9a-f]{2}$")
# An eviction frees this fraction of the bound beyond what the addition needs, so a cache at
# its bound does not rescan its folder on every attempt.
EVICT_SLACK = 0.1


class ObjectCache:
    def __init__(self, folder: Path, max_bytes: int, mode: str = "copy") -> None:
        if mode != "copy":
            raise ValueError(
                LINK_MODE_REMOVED if mode == "link" else f"unknown cache mode {mode!r}"
            )
        self.folder = folder
        self.max_bytes = max_bytes
        self.mode: CacheMode = "copy"
        self._blobs = folder / "blobs"
        self._keys = folder / "keys"
        self._reflink_ok = True
        for path in (folder, self._blobs, self._keys):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            self._drop_old_layout()
            self._write_total(self._count()[0])

    # -- naming -----------------------------------------------------------------------------

    @staticmethod
    def key(scope: str, checksum: str, size: int, mtime: int) -> str:
        """The key of an object: "" (never cached) when lakeFS gave no checksum."""
        if not checksum:
            return ""
        text = json.dumps([scope, checksum, size, mtime])
        return hashlib.sha256(text.encode()).hexdigest()

    def _blob(self, digest: str) -> Path:
        return self._blobs / digest[:2] / digest[2:]

    def _pointer(self, key: str) -> Path:
        return self._keys / key[:2] / key[2:]

    def _digest_of(self, key: str) -> str | None:
        try:
            digest = str(self._pointer(key).readlink())
        except OSError:
            return None
        return digest if _HEX64.fullmatch(digest) else None

    # -- serving ----------------------------------------------------------------------------

    def serve(self, key: str, size: int, dest: Path) -> tuple[os.stat_result, str] | None:
        """Copy the entry for `key` to `dest` and return (its stat, its SHA-256); None: a miss.

        On a miss `dest` may hold a partial copy; the caller's download truncates it.
        """
        if not key or self.max_bytes <= 0:
            return None
        digest = self._digest_of(key)
        if digest is None:
            return None
        blob = self._blob(digest)
        try:
            src = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            with contextlib.suppress(OSError):
                self._pointer(key).unlink()  # its blob was evicted
            return None
        try:
            held = os.fstat(src)
            if not stat.S_ISREG(held.st_mode) or held.st_size != size:
                self._forget(blob, held)
                return None
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                copied = self._copy_hashing(src, fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if copied != digest or st.st_size != size:
                self._forget(blob, held)
                return None
            with contextlib.suppress(OSError):
                os.utime(src)  # last use, for eviction
            return st, digest
        except OSError:
            return None
        finally:
            os.close(src)

    def _copy_hashing(self, src: int, dest: int) -> str:
        """Copy `src` into `dest` and return the SHA-256 of what `dest` now holds."""
        if self._reflink_ok:
            try:
                fcntl.ioctl(dest, _FICLONE, src)
                return digest_fd(dest)
            except OSError:
                self._reflink_ok = False
                os.ftruncate(dest, 0)
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(src, BLOCK, offset):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dest, view) :]
            offset += len(chunk)
        return h.hexdigest()

    def _forget(self, blob: Path, held: os.stat_result) -> None:
        """Evict a blob that failed verification (if it still is the one that failed)."""
        with self._locked():
            try:
                now = blob.lstat()
            except OSError:
                return
            if now.st_ino == held.st_ino:
                blob.unlink()
                self._write_total(max(0, self._read_total() - now.st_size))

    # -- filling ----------------------------------------------------------------------------

    def adopt(self, manifest: Manifest, root: Path) -> int:
        """Keep the untouched materialized files under `root` as entries; return how many.

        Hard links, no copy: call it just before the attempt folder is removed.
        """
        if self.max_bytes <= 0:
            return 0
        wanted: list[tuple[str, str, Path, os.stat_result]] = []
        root_fd: int | None = None
        try:
            for rel, entry in manifest.items():
                size = entry.signature.size
                if (
                    not entry.cache_key
                    or not _HEX64.fullmatch(entry.digest)
                    or size > self.max_bytes
                ):
                    continue
                if (
                    self._digest_of(entry.cache_key) == entry.digest
                    and self._blob(entry.digest).exists()
                ):
                    continue
                source = root.joinpath(*rel.parts)
                st = untouched(source, entry)
                if st is None:
                    continue
                if entry.racy:
                    if root_fd is None:
                        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    if not same_bytes(root_fd, rel, st, entry.digest):
                        continue
                wanted.append((entry.cache_key, entry.digest, source, st))
        finally:
            if root_fd is not None:
                os.close(root_fd)
        if not wanted:
            return 0
        with self._locked():
            return self._add(wanted)

    def _add(self, wanted: list[tuple[str, str, Path, os.stat_result]]) -> int:
        """Under the lock: reserve the bytes (evicting first if needed), link, point."""
        fresh: dict[str, tuple[Path, os.stat_result]] = {}
        needed = 0
        for _key, digest, source, st in wanted:
            if digest in fresh or self._blob(digest).exists():
                continue
            if needed + st.st_size > self.max_bytes:
                continue
            fresh[digest] = (source, st)
            needed += st.st_size
        total = self._read_total()
        if total + needed > self.max_bytes:
            goal = max(0, self.max_bytes - needed - int(self.max_bytes * EVICT_SLACK))
            total = self._evict(goal)
        self._write_total(total + needed)  # reserved first: a crash overcounts, never under
        stored: set[str] = set()
        for digest, (source, st) in fresh.items():
            blob = self._blob(digest)
            try:
                blob.parent.mkdir(exist_ok=True, mode=0o700)
                os.link(source, blob)
                linked = blob.lstat()
            except OSError:
                needed -= st.st_size
                continue
            if not stat.S_ISREG(linked.st_mode) or linked.st_ino != st.st_ino:
                # The source was replaced between its check and the link (a link, another
                # file): never keep what was not checked.
                with contextlib.suppress(OSError):
                    blob.unlink()
                needed -= st.st_size
                continue
            stored.add(digest)
        self._write_total(total + needed)
        adopted = 0
        for key, digest, _source, _st in wanted:
            if digest in stored or (digest not in fresh and self._blob(digest).exists()):
                self._point(key, digest)
                adopted += 1
        return adopted

    def _point(self, key: str, digest: str) -> None:
        path = self._pointer(key)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        try:
            path.symlink_to(digest)
        except FileExistsError:
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            tmp.symlink_to(digest)
            tmp.replace(path)

    # -- accounting -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes and threads (each call opens its own description)."""
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_total(self) -> int:
        try:
            return int((self.folder / "total").read_text())
        except (OSError, ValueError):
            return self._count()[0]

    def _write_total(self, total: int) -> None:
        tmp = self.folder / f".total.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(str(total))
        tmp.replace(self.folder / "total")

    def _count(self) -> tuple[int, list[tuple[int, Path, int]]]:
        """(bytes under blobs/, [(last use, path, size)]) from disk; strays are removed."""
        total = 0
        found: list[tuple[int, Path, int]] = []
        for sub in _listdir(self._blobs):
            for entry in _listdir(sub):
                try:
                    st = entry.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or not _HEX64.fullmatch(sub.name + entry.name):
                    with contextlib.suppress(OSError):
                        entry.unlink()
                    continue
                total += st.st_size
                found.append((st.st_mtime_ns, entry, st.st_size))
        return total, found

    def _evict(self, goal: int) -> int:
        """Under the lock: remove least recently used blobs until at most `goal` bytes remain."""
        total, found = self._count()
        found.sort()
        gone: set[str] = set()
        for _used, path, size in found:
            if total <= goal:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                gone.add(path.parent.name + path.name)
        if gone:
            for sub in _listdir(self._keys):
                for pointer in _listdir(sub):
                    with contextlib.suppress(OSError):
                        if str(pointer.readlink()) in gone:
                            pointer.unlink()
        return total

    def _drop_old_layout(self) -> None:
        """Entries of the previous layout (`<aa>/<hash>`, checksum-keyed, unverified) go."""
        import shutil

        for path in _listdir(self.folder):
            if path.is_dir() and not path.is_symlink() and _OLD_LAYOUT.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)

    @property
    def total_bytes(self) -> int:
        """The bytes the cache holds, as accounted by every process sharing the folder."""
        with self._locked():
            return self._read_total()


def _listdir(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise
