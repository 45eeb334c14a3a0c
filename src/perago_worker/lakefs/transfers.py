"""The data plane's one interface: list, download and upload object bodies.

Two implementations sit behind it, chosen by `lakefs.data_path` (see `LakeFS.transfers`):
`ApiTransfers` streams every body through the lakeFS server; `PresignedTransfers` moves
bodies straight between the worker and the object store with URLs lakeFS presigns, and asks
lakeFS only for metadata (listings, staging addresses, links). The materializer and the
publisher use this interface and do not know which one they have.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from perago_worker.lakefs.connections import BLOCK
from perago_worker.lakefs.errors import SourceChanged


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    checksum: str
    mtime: int
    # With a presigned listing: a URL to GET the body from the store until `address_expiry`
    # (Unix seconds). A credential: never logged, never part of an error.
    physical_address: str = ""
    address_expiry: int = 0

    def __repr__(self) -> str:  # the address stays out of reprs (and so out of logs)
        return f"ObjectInfo(key={self.key!r}, size={self.size}, checksum={self.checksum!r})"


@dataclass(frozen=True)
class Downloaded:
    """A file just written: its stat (from the open descriptor) and its SHA-256, hashed from
    the bytes as they were written (no second read)."""

    stat: os.stat_result
    sha256: str


class Transfers(Protocol):
    mode: str  # "api" or "presign": what `lakefs.data_path` resolved to

    def list_objects(self, repository: str, ref: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        """Pages of objects under `prefix`, in key order, ready for `download`."""
        ...

    def download(self, repository: str, ref: str, obj: ObjectInfo, dest: Path) -> Downloaded:
        """Stream `obj` to a new file at `dest` (the leaf opened O_NOFOLLOW), checking its size."""
        ...

    def upload(self, repository: str, branch: str, key: str, fd: int, size: int) -> str:
        """Stage exactly the first `size` bytes of `fd` at `key` on `branch`; the checksum."""
        ...

    def close(self) -> None: ...


def exactly(fd: int, size: int, key: str, start: int = 0) -> Iterator[bytes]:
    """Bytes `start` to `start + size` of `fd` in BLOCK pieces (pread: the file position is
    unused, so a retry re-reads the same bytes and threads can share one descriptor)."""
    offset = start
    end = start + size
    while offset < end:
        chunk = os.pread(fd, min(BLOCK, end - offset), offset)
        if not chunk:
            raise SourceChanged(f"{key}: the file ended at {offset} of {end} bytes")
        offset += len(chunk)
        yield chunk


def hashed(chunks: Iterator[bytes], digest: hashlib._Hash) -> Iterator[bytes]:
    """`chunks`, feeding each to `digest` on the way (a retry restarts with a new digest)."""
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def write_body(resp: http.client.HTTPResponse, dest: Path) -> tuple[int, Downloaded]:
    """Write a response body to a new file at `dest`; (bytes written, Downloaded).

    The leaf is opened with O_NOFOLLOW: a symlink planted at `dest` is refused, never
    followed. The stat comes from the open descriptor, saving a path lookup.
    """
    digest = hashlib.sha256()
    written = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        while chunk := resp.read(BLOCK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            digest.update(chunk)
            written += len(chunk)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return written, Downloaded(st, digest.hexdigest())
