"""The API data path: object bodies streamed through the lakeFS server.

The generated SDK holds whole objects in memory (`get_object` returns a bytearray,
`upload_object` takes bytes), so bodies go through keep-alive `http.client` connections
(`Connections`), one per transfer thread, streamed to and from disk in 1 MiB blocks. The
listing is read as plain JSON for the same reason it is fast: validating each entry through
the SDK's models cost about half a millisecond per object, as much as downloading a small one.

The presigned path (`presigned.py`) uses the JSON helpers here for its metadata calls, and
the execution ledger's small create-only records always travel this way.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from perago_worker.credentials import Credentials
from perago_worker.lakefs.connections import Connections
from perago_worker.lakefs.errors import (
    LakeFSError,
    PreconditionFailed,
    is_transient,
    message_of,
    retrying,
    translate,
)
from perago_worker.lakefs.transfers import Downloaded, ObjectInfo, exactly, write_body
from perago_worker.network import Network
from perago_worker.observability import metrics

T = TypeVar("T")


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def with_retries(fn: Callable[[], T], retry_seconds: float, server: str = "lakefs") -> T:
    """`fn()` under the retry policy, fast path first: building a retry controller per
    object costs more than the call."""
    try:
        return fn()
    except Exception as exc:
        if not is_transient(exc):
            raise
        metrics.RETRIES.labels(server=server).inc()
    for attempt in retrying(retry_seconds, server):
        with attempt:
            return fn()
    raise AssertionError("unreachable")


class ApiTransfers:
    mode = "api"

    def __init__(
        self,
        endpoint: str,
        access_key_id: str,
        secret: str,
        *,
        timeout: float,
        retry_seconds: float,
        network: Network | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(endpoint)
        self._base = parts.path.rstrip("/") + "/api/v1"
        self.credentials = credentials or Credentials(access_key_id, secret)
        self.http = Connections(endpoint, timeout, network=network, credentials=self.credentials)
        self.retry_seconds = retry_seconds

    def close(self) -> None:
        self.http.close()

    def route(self, repository: str, kind: str, ref: str, tail: str, **query: Any) -> str:
        """`/api/v1/repositories/{repository}/{kind}/{ref}/{tail}?{query}`, quoted."""
        route = f"{self._base}/repositories/{q(repository)}/{kind}/{q(ref)}/{tail}"
        return route + ("?" + urllib.parse.urlencode(query) if query else "")

    def json(
        self, method: str, route: str, body: Any = None, *, ok: tuple[int, ...] = (200, 201)
    ) -> Any:
        """One JSON request to lakeFS (not retried here); the decoded answer, or None."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        resp = self.http.request(method, route, body=data, headers=headers)
        answer = resp.read()
        if resp.status not in ok:
            raise translate(resp.status, answer)
        return json.loads(answer) if answer else None

    # -- listing and bodies -----------------------------------------------------------------

    def list_objects(
        self, repository: str, ref: str, prefix: str, *, presign: bool = False
    ) -> Iterator[list[ObjectInfo]]:
        """Pages of objects under `prefix`, in key order (1000 a page)."""
        after = ""
        while True:
            query: dict[str, Any] = {"prefix": prefix, "after": after, "amount": 1000}
            if presign:
                query["presign"] = "true"
            route = self.route(repository, "refs", ref, "objects/ls", **query)
            page: dict[str, Any] = with_retries(
                lambda route=route: self.json("GET", route),  # type: ignore[misc]
                self.retry_seconds,
            )
            yield [
                ObjectInfo(
                    o["path"],
                    int(o.get("size_bytes") or 0),
                    o.get("checksum", ""),
                    int(o.get("mtime", 0)),
                    o.get("physical_address", "") if presign else "",
                    int(o.get("physical_address_expiry") or 0) if presign else 0,
                )
                for o in page["results"]
                if o.get("path_type") == "object"
            ]
            if not page["pagination"]["has_more"]:
                return
            after = page["pagination"]["next_offset"]

    def download(self, repository: str, ref: str, obj: ObjectInfo, dest: Path) -> Downloaded:
        route = self.route(repository, "refs", ref, "objects", path=obj.key)

        def once() -> Downloaded:
            resp = self.http.request("GET", route)
            if resp.status != 200:
                raise translate(resp.status, resp.read())
            written, done = write_body(resp, dest)
            if written != obj.size:
                raise LakeFSError(
                    502, f"{obj.key}: got {written} bytes, the listing says {obj.size}"
                )
            return done

        return with_retries(once, self.retry_seconds)

    def upload(self, repository: str, branch: str, key: str, fd: int, size: int) -> str:
        """Exactly `size` bytes read with `pread` from offset 0, so a retry sends the same
        bytes and a file that grew sends no more; one that ends sooner raises
        `SourceChanged` and the request is abandoned (lakeFS stores nothing)."""
        route = self.route(repository, "branches", branch, "objects", path=key)

        def once() -> str:
            resp = self.http.request(
                "POST",
                route,
                body=exactly(fd, size, key),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
            data = resp.read()
            if resp.status not in (200, 201):
                raise translate(resp.status, data)
            return str(json.loads(data).get("checksum", ""))

        return with_retries(once, self.retry_seconds)

    # -- small records (the execution ledger) -------------------------------------------------

    def put_record(
        self, repository: str, branch: str, key: str, data: bytes, *, if_match: str | None
    ) -> None:
        """Write a small object to `branch`'s staging area (no commit: it is visible at once).

        A compare-and-swap: with `if_match=None` the object must not exist yet
        (`If-None-Match: *`), otherwise its ETag must still be `if_match`; lakeFS answers
        412 when it is not, raised as `PreconditionFailed`.
        """
        route = self.route(repository, "branches", branch, "objects", path=key)
        condition = {"If-None-Match": "*"} if if_match is None else {"If-Match": if_match}

        def once() -> None:
            resp = self.http.request(
                "POST",
                route,
                body=data,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(data)),
                    **condition,
                },
            )
            answer = resp.read()
            if resp.status == 412:
                raise PreconditionFailed(412, message_of(answer))
            if resp.status not in (200, 201):
                raise translate(resp.status, answer)

        with_retries(once, self.retry_seconds)

    def get_record(self, repository: str, ref: str, key: str) -> tuple[bytes, str] | None:
        """A small object's bytes and ETag, or None when there is none."""
        route = self.route(repository, "refs", ref, "objects", path=key)

        def once() -> tuple[bytes, str] | None:
            resp = self.http.request("GET", route)
            data = resp.read()
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise translate(resp.status, data)
            return data, str(resp.getheader("ETag") or "")

        return with_retries(once, self.retry_seconds)
