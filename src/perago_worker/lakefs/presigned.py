"""The presigned data path: object bodies straight between the worker and the object store.

lakeFS answers metadata (a listing with `presign=true` returns a page of presigned GET URLs
in one call; a staging address comes with a presigned PUT URL; a multipart upload's parts
are presigned on request) and the bodies never pass through it. That takes the lakeFS
server off the per-object path of a download entirely, and off the byte path of an upload.

- **Downloads**: the listing's URL, streamed to disk; a URL that is about to expire, or
  that the store refuses (403), is renewed with `stat?presign=true`, once per try.
- **Uploads**: `getPhysicalAddress(presign=true)`, a PUT of exactly the checked bytes, then
  `linkPhysicalAddress` with the size and the store's ETag; files under `SMALL_UPLOAD_BYTES`
  go through the API in one request instead (see there why). Files of
  `MULTIPART_THRESHOLD` and more go up as a presigned multipart upload: `PART_URL_BATCH`
  part URLs come with its creation and each later part is presigned when the upload reaches
  it (so an upload that outlasts a URL's lifetime still completes; lakectl presigns every
  part up front and fails after 15 minutes, treeverse/lakeFS#7501); parts go up
  `PART_THREADS` at a time, and a failure aborts the upload.
- **Checks**: the bytes sent are MD5-hashed on the way and compared with the ETag the store
  answers, whenever that ETag is an MD5 (S3 and S3-compatible stores without KMS); a GET's
  ETag must equal the listing's checksum; sizes always. A mismatch is a `StoreError` that
  fails the attempt: nothing it staged is merged.
- **Secrecy**: a presigned URL is a bearer credential. It never appears in a log line, a
  metric label, an error (and so never in a task's reason) or a repr.

What differs per store is kept to request shapes: Azure wants `x-ms-blob-type: BlockBlob`
on a PUT and lakeFS offers no presigned multipart there (so large files fall back to the API
path past `SINGLE_PUT_MAX`); GCS URLs are signed differently but used the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perago_worker.lakefs.api import ApiTransfers, with_retries
from perago_worker.lakefs.connections import Connections
from perago_worker.lakefs.errors import (
    ContentMismatch,
    LakeFSError,
    NotFound,
    StoreError,
    is_transient,
)
from perago_worker.lakefs.transfers import Downloaded, ObjectInfo, exactly, hashed, write_body

MIB = 1 << 20
# Files this large or larger go up as multipart uploads (when the store can presign parts).
MULTIPART_THRESHOLD = 64 * MIB
# A part's size: S3's floor is 5 MiB and its ceiling 10,000 parts per upload; 16 MiB parts
# keep a 256 MiB file at 16 parts in flight across PART_THREADS connections.
PART_SIZE = 16 * MIB
MAX_PARTS = 10_000
PART_URL_BATCH = 8
PART_THREADS = 4
# The largest single PUT S3 accepts; without presigned multipart, larger files use the API.
SINGLE_PUT_MAX = 5 * 1024 * MIB
# Files smaller than this go up through the API in one request: a presigned upload costs
# two lakeFS metadata calls (a staging address, then the link) plus the PUT, and for a small
# body those two calls cost lakeFS about as much CPU as the whole upload through it
# (measured on S3/VersityGW: 0.41 ms per metadata call, 0.72 ms per 16 KiB UploadObject),
# while adding two round trips. Downloads are always presigned: the listing carries the URLs.
SMALL_UPLOAD_BYTES = 64 * 1024
# A URL obtained longer ago than this is renewed before it is used. lakeFS presigns for
# `blockstore.<type>.pre_signed_expiry` (15 minutes by default); a 403 renews it too.
URL_MAX_AGE_SECONDS = 300.0
# A listing URL this close to its expiry is renewed before the GET starts.
EXPIRY_MARGIN_SECONDS = 30.0

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")


def part_size_for(size: int) -> int:
    """The part size for a `size`-byte multipart upload: PART_SIZE, or more (whole MiB) when
    PART_SIZE would need more than MAX_PARTS parts."""
    needed = -(-size // MAX_PARTS)
    return max(PART_SIZE, -(-needed // MIB) * MIB)


def etag_of(value: str | None) -> str:
    return (value or "").strip().strip('"').lower()


def is_md5_etag(etag: str) -> bool:
    return bool(_MD5_ETAG.match(etag))


def content_etag(resp: Any) -> str:
    """The response's ETag when it is the content's MD5, else "": S3 objects encrypted with
    SSE-KMS or SSE-C answer 32 hex digits that are not the data's MD5."""
    encryption = (resp.getheader("x-amz-server-side-encryption") or "").lower()
    if encryption.startswith("aws:kms") or resp.getheader(
        "x-amz-server-side-encryption-customer-algorithm"
    ):
        return ""
    etag = etag_of(resp.getheader("ETag"))
    return etag if is_md5_etag(etag) else ""


def multipart_etag(part_md5s: list[bytes]) -> str:
    """What S3 answers as a multipart object's ETag: MD5 of the parts' MD5s, dash, count."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"  # noqa: S324


def store_code(body: bytes) -> str:
    """The S3 error code of an answer (`<Code>AccessDenied</Code>`), never the whole body."""
    match = re.search(rb"<Code>([A-Za-z0-9]{1,64})</Code>", body[:4096])
    return match.group(1).decode() if match else "no error code"


def put_headers(blockstore: str, size: int) -> dict[str, str]:
    """A presigned PUT's headers: Azure's Put Blob also needs the blob type."""
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    if blockstore == "azure":
        headers["x-ms-blob-type"] = "BlockBlob"
    return headers


@dataclass
class _Url:
    url: str
    obtained: float = field(default_factory=time.monotonic)

    def fresh(self) -> bool:
        return time.monotonic() - self.obtained < URL_MAX_AGE_SECONDS


class PresignedTransfers:
    mode = "presign"

    def __init__(
        self,
        api: ApiTransfers,
        *,
        blockstore: str,
        multipart: bool,
        timeout: float,
        retry_seconds: float,
    ) -> None:
        self.api = api
        self.blockstore = blockstore
        self.small_upload_bytes = SMALL_UPLOAD_BYTES
        self.multipart = multipart
        self._timeout = timeout
        self.retry_seconds = retry_seconds
        self._stores: dict[str, Connections] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for conns in self._stores.values():
                conns.close()
            self._stores.clear()

    # -- the store ---------------------------------------------------------------------------

    def _send(
        self, method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        parts = urllib.parse.urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        with self._lock:
            conns = self._stores.get(origin)
            if conns is None:
                conns = self._stores[origin] = Connections(
                    origin, self._timeout, network=self.api.http.network
                )
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            return conns.request(method, target, body=body, headers=headers), conns
        except (ConnectionError, TimeoutError) as exc:
            # Same type (still transient, still a reset to the callers), but naming the store:
            # a task's reason then says which server was down. Its origin, never the URL.
            raise type(exc)(f"object store at {parts.netloc}: {exc}") from None

    def _retry(self, fn: Any) -> Any:
        return with_retries(fn, self.retry_seconds, server="objectstore")

    # -- downloads ---------------------------------------------------------------------------

    def list_objects(self, repository: str, ref: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        return self.api.list_objects(repository, ref, prefix, presign=True)

    def _download_url(self, repository: str, ref: str, key: str) -> str:
        route = self.api.route(repository, "refs", ref, "objects/stat", path=key, presign="true")
        stats = with_retries(lambda: self.api.json("GET", route), self.retry_seconds)
        return str(stats["physical_address"])

    def download(self, repository: str, ref: str, obj: ObjectInfo, dest: Path) -> Downloaded:
        listed = obj.physical_address
        if (
            listed
            and obj.address_expiry
            and obj.address_expiry - time.time() < EXPIRY_MARGIN_SECONDS
        ):
            listed = ""

        def once() -> Downloaded:
            url = listed or self._download_url(repository, ref, obj.key)
            resp, conns = self._send("GET", url)
            if resp.status == 403:  # expired or revoked: one renewal per try
                resp.read()
                url = self._download_url(repository, ref, obj.key)
                resp, conns = self._send("GET", url)
            if resp.status != 200:
                code = store_code(resp.read())
                raise StoreError(resp.status, f"{obj.key}: GET answered {code}")
            etag = etag_of(resp.getheader("ETag"))
            listed_sum = obj.checksum.lower()
            if is_md5_etag(etag) and is_md5_etag(listed_sum) and etag != listed_sum:
                conns.discard()  # the body is not read: the connection cannot be reused
                raise ContentMismatch(
                    f"{obj.key}: the store serves ETag {etag}, lakeFS lists {listed_sum}"
                )
            announced = resp.getheader("Content-Length")
            written, done = write_body(resp, dest)
            if announced is not None and announced.isdigit() and written < int(announced):
                # The connection ended mid-body (a store restarting): retried, not a mismatch.
                raise StoreError(
                    502, f"{obj.key}: the body ended at {written} of {announced} bytes"
                )
            if written != obj.size:
                raise ContentMismatch(
                    f"{obj.key}: got {written} bytes, the listing says {obj.size}"
                )
            return done

        result: Downloaded = self._retry(once)
        return result

    # -- uploads -----------------------------------------------------------------------------

    def upload(self, repository: str, branch: str, key: str, fd: int, size: int) -> str:
        if self.multipart and size >= MULTIPART_THRESHOLD:
            return self._multipart(repository, branch, key, fd, size)
        if size > SINGLE_PUT_MAX or size < self.small_upload_bytes:
            return self.api.upload(repository, branch, key, fd, size)
        backing = self.api.route(repository, "branches", branch, "staging/backing", path=key)

        def address() -> dict[str, Any]:
            found: dict[str, Any] = with_retries(
                lambda: self.api.json("GET", backing + "&presign=true"), self.retry_seconds
            )
            return found

        staging = address()

        def put() -> str:
            nonlocal staging
            md5 = hashlib.md5()  # noqa: S324 (what the store's ETag is, not a security hash)
            body = hashed(exactly(fd, size, key), md5)
            try:
                resp, _ = self._send(
                    "PUT",
                    staging["presigned_url"],
                    body=body,
                    headers=put_headers(self.blockstore, size),
                )
            except ConnectionError:
                # A store refusing a URL (expired: 403) may answer before it reads the body
                # and close the connection: the refusal then arrives as a reset. Renew it.
                staging = address()
                raise
            answer = resp.read()
            if resp.status == 403:
                staging = address()
                raise StoreError(503, f"{key}: PUT refused ({store_code(answer)}); renewed its URL")
            if resp.status not in (200, 201):
                raise StoreError(resp.status, f"{key}: PUT answered {store_code(answer)}")
            etag = etag_of(resp.getheader("ETag"))
            checked = content_etag(resp)
            if checked and checked != md5.hexdigest():
                raise ContentMismatch(f"{key}: the store stored other bytes (ETag {etag})")
            return etag

        etag: str = self._retry(put)
        self._linking(
            "PUT",
            backing,
            {
                "staging": {"physical_address": staging["physical_address"]},
                "checksum": etag,
                "size_bytes": size,
            },
            repository,
            branch,
            key,
            staging["physical_address"],
        )
        return etag

    def _linking(
        self,
        method: str,
        route: str,
        body: dict[str, Any],
        repository: str,
        branch: str,
        key: str,
        address: str,
    ) -> dict[str, Any]:
        """A request that links `address` to `key` (a link, a multipart complete), retried;
        its answer, or the object's stats. A retry of one whose answer was lost finds the
        address already taken (or the upload gone): a refusal after a transient failure is
        a success when the branch shows `key` linked to `address`."""
        uncertain = False

        def once() -> dict[str, Any]:
            nonlocal uncertain
            try:
                answer: dict[str, Any] = self.api.json(method, route, body) or {}
            except Exception as exc:
                uncertain = uncertain or is_transient(exc)
                raise
            return answer

        try:
            answer: dict[str, Any] = with_retries(once, self.retry_seconds)
        except LakeFSError as exc:
            if not uncertain or is_transient(exc):
                raise
            linked = self._linked_stats(repository, branch, key, address)
            if linked is None:
                raise
            return linked
        return answer

    def _linked_stats(
        self, repository: str, branch: str, key: str, address: str
    ) -> dict[str, Any] | None:
        """The object's stats when `key` on `branch` is linked to `address`, else None."""
        route = self.api.route(repository, "refs", branch, "objects/stat", path=key)
        try:
            stats: dict[str, Any] = with_retries(
                lambda: self.api.json("GET", route), self.retry_seconds
            )
        except NotFound:
            return None
        linked = str(stats.get("physical_address", "")).split(",")[0] == address.split(",")[0]
        return stats if linked else None

    def _multipart(self, repository: str, branch: str, key: str, fd: int, size: int) -> str:
        part = part_size_for(size)
        count = -(-size // part)
        pmpu = self.api.route(repository, "branches", branch, "staging/pmpu", path=key)
        created = with_retries(
            lambda: self.api.json("POST", pmpu + f"&parts={min(count, PART_URL_BATCH)}"),
            self.retry_seconds,
        )
        upload_id = str(created["upload_id"])
        address = str(created["physical_address"])
        one = self.api.route(
            repository,
            "branches",
            branch,
            f"staging/pmpu/{urllib.parse.quote(upload_id, safe='')}",
            path=key,
        )
        urls = {i + 1: _Url(u) for i, u in enumerate(created.get("presigned_urls") or [])}
        lock = threading.Lock()
        unverified = threading.Event()  # a part whose ETag is not its MD5 (SSE-KMS, SSE-C)
        failed = threading.Event()  # the first failed part stops the parts not yet begun

        def url_for(number: int, renew: bool = False) -> str:
            with lock:
                known = urls.get(number)
            if known is not None and known.fresh() and not renew:
                return known.url
            route = one.replace("?", f"/parts/{number}?", 1)
            got = with_retries(
                lambda: self.api.json("PUT", route, {"physical_address": address}),
                self.retry_seconds,
            )
            with lock:
                urls[number] = _Url(str(got["presigned_url"]))
                return urls[number].url

        def put_part(number: int) -> tuple[str, bytes]:
            offset = (number - 1) * part
            length = min(part, size - offset)
            renew = False

            def once() -> tuple[str, bytes]:
                nonlocal renew
                md5 = hashlib.md5()  # noqa: S324
                try:
                    resp, _ = self._send(
                        "PUT",
                        url_for(number, renew),
                        body=hashed(exactly(fd, length, key, offset), md5),
                        headers={"Content-Length": str(length)},
                    )
                except ConnectionError:
                    renew = True  # a refusal answered before the body was read is a reset
                    raise
                answer = resp.read()
                if resp.status == 403:
                    renew = True
                    raise StoreError(503, f"{key}: part {number} refused ({store_code(answer)})")
                if resp.status not in (200, 201):
                    raise StoreError(
                        resp.status, f"{key}: part {number} answered {store_code(answer)}"
                    )
                renew = False
                etag = etag_of(resp.getheader("ETag"))
                checked = content_etag(resp)
                if checked and checked != md5.hexdigest():
                    raise ContentMismatch(f"{key}: part {number} stored other bytes")
                if not checked:
                    unverified.set()  # encrypted (or not an MD5): the whole ETag is not either
                return etag, md5.digest()

            if failed.is_set():
                raise StoreError(503, f"{key}: part {number} not sent: another part failed")
            try:
                done: tuple[str, bytes] = self._retry(once)
            except BaseException:
                failed.set()
                raise
            return done

        try:
            with ThreadPoolExecutor(min(PART_THREADS, count), thread_name_prefix="part") as pool:
                parts = list(pool.map(put_part, range(1, count + 1)))
            body = {
                "physical_address": address,
                "parts": [
                    {"part_number": i + 1, "etag": etag} for i, (etag, _) in enumerate(parts)
                ],
            }
            stats = self._linking("PUT", one, body, repository, branch, key, address)
        except BaseException:
            # Best effort: a store also expires abandoned uploads by its lifecycle rules.
            with contextlib.suppress(Exception):
                self.api.json("DELETE", one, {"physical_address": address}, ok=(200, 204))
            raise
        if int(stats.get("size_bytes") or 0) != size:
            raise ContentMismatch(
                f"{key}: the store assembled {stats.get('size_bytes')} of {size} bytes"
            )
        checksum = etag_of(str(stats.get("checksum", "")))
        expected = multipart_etag([md5 for _, md5 in parts])
        if (
            not unverified.is_set()
            and is_md5_etag(checksum)
            and "-" in checksum
            and checksum != expected
        ):
            raise ContentMismatch(f"{key}: the store assembled other parts (ETag {checksum})")
        return checksum

    def probe(self, repository: str, branch: str) -> str:
        """Can this worker reach the store lakeFS presigns for? One HEAD on a fresh upload
        URL (any HTTP answer proves the route; nothing is written). Names only the origin."""
        backing = self.api.route(
            repository,
            "branches",
            branch,
            "staging/backing",
            path="perago-preflight",
            presign="true",
        )
        staging = self.api.json("GET", backing)
        url = str(staging.get("presigned_url") or "")
        if not url:
            raise LakeFSError(502, "lakeFS gave no presigned URL for an upload")
        parts = urllib.parse.urlsplit(url)
        try:
            resp, _ = self._send("HEAD", url)
            resp.read()
        except OSError as exc:
            raise StoreError(
                503, f"cannot reach the object store at {parts.netloc}: {type(exc).__name__}"
            ) from None
        return f"{parts.scheme}://{parts.netloc}"
