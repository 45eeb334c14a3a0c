"""The lakeFS control plane: branches, commits, merges, logs and repositories, via `lakefs-sdk`.

`LakeFS` is the one client the worker holds. Its control-plane calls go through the
generated SDK's models; object bodies go through `transfers`, the data plane chosen by
`lakefs.data_path` (the API stream or presigned direct transfers, see `transfers.py`).
Every request carries the request timeout; transient faults (connection errors, timeouts,
5xx, 429) are retried with exponential backoff and jitter, 4xx answers are translated into
the errors of `errors.py`.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import lakefs_sdk
import urllib3
from lakefs_sdk.exceptions import ApiException

from perago_worker.credentials import Credentials
from perago_worker.lakefs.api import ApiTransfers
from perago_worker.lakefs.errors import (
    DataPathUnavailable,
    LakeFSError,
    NotFound,
    Unauthorized,
    certificate_refused,
    retrying,
    translate,
)
from perago_worker.lakefs.presigned import PresignedTransfers
from perago_worker.lakefs.transfers import Downloaded, ObjectInfo, Transfers
from perago_worker.network import Network, certificate_message, is_certificate_failure

T = TypeVar("T")
DATA_PATHS = ("auto", "presign", "api")


@dataclass(frozen=True)
class StorageConfig:
    """What the server's blockstore can do (`GET /config`), as the data path needs it."""

    blockstore_type: str
    default_namespace_prefix: str
    pre_sign_support: bool
    pre_sign_multipart_upload: bool


@dataclass(frozen=True)
class CommitInfo:
    id: str
    parents: list[str]
    message: str
    metadata: dict[str, str]
    creation_date: int


class _Configuration(lakefs_sdk.Configuration):  # type: ignore[misc]
    """The SDK's configuration, its Basic header always from the current `Credentials`."""

    credentials: Credentials

    def get_basic_auth_token(self) -> str:
        return self.credentials.basic()


def _pool_manager(network: Network, endpoint: str, maxsize: int) -> urllib3.PoolManager:
    """The SDK's urllib3 pool with the worker's TLS context and proxy (the SDK would build
    its own from `Configuration`, deaf to the proxy variables and `no_proxy`)."""
    context = network.new_ssl_context()
    if not network.verify:  # chosen (tls.verify: false): not a warning on every request
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    proxy = network.proxy_for(endpoint)
    if proxy is None:
        return urllib3.PoolManager(num_pools=4, maxsize=maxsize, ssl_context=context)
    return urllib3.ProxyManager(
        proxy.url,
        num_pools=4,
        maxsize=maxsize,
        proxy_headers=dict(proxy.headers),
        ssl_context=context,
    )


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _commit(c: Any) -> CommitInfo:
    return CommitInfo(
        id=c.id,
        parents=list(c.parents or []),
        message=c.message or "",
        metadata=dict(c.metadata or {}),
        creation_date=int(c.creation_date or 0),
    )


class LakeFS:
    """The worker's lakeFS client: the SDK for the control plane, `transfers` for bodies.

    `data_path` picks the data plane: `api` streams bodies through lakeFS, `presign` moves
    them straight to and from the object store, `auto` (the default) presigns when the
    server's storage config says it can. It is resolved on first use (one `GET /config`).
    """

    def __init__(
        self,
        endpoint: str,
        access_key_id: str,
        secret_access_key: str,
        *,
        pool_size: int = 32,
        timeout: float = 60.0,
        retry_seconds: float = 60.0,
        data_path: str = "auto",
        network: Network | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if data_path not in DATA_PATHS:
            raise ValueError(f"data_path must be one of {', '.join(DATA_PATHS)}, not {data_path!r}")
        self.endpoint = endpoint.rstrip("/")
        self._api_base = urllib.parse.urlsplit(self.endpoint).path.rstrip("/") + "/api/v1"
        self.network = network if network is not None else Network()
        self.credentials = credentials or Credentials(access_key_id, secret_access_key)
        config = _Configuration(host=f"{self.endpoint}/api/v1", username="", password="")
        config.credentials = self.credentials
        config.connection_pool_maxsize = max(8, pool_size)
        self._client = lakefs_sdk.ApiClient(config)
        self._client.rest_client.pool_manager.clear()
        self._client.rest_client.pool_manager = _pool_manager(
            self.network, self.endpoint, config.connection_pool_maxsize
        )
        self.repos = lakefs_sdk.RepositoriesApi(self._client)
        self.branches = lakefs_sdk.BranchesApi(self._client)
        self.commits = lakefs_sdk.CommitsApi(self._client)
        self.refs = lakefs_sdk.RefsApi(self._client)
        self.objects = lakefs_sdk.ObjectsApi(self._client)
        self.auth = lakefs_sdk.AuthApi(self._client)
        self.api = ApiTransfers(
            self.endpoint,
            access_key_id,
            secret_access_key,
            timeout=timeout,
            retry_seconds=retry_seconds,
            network=self.network,
            credentials=self.credentials,
        )
        self.data_path = data_path
        self._transfers: Transfers | None = None
        self._transfers_lock = threading.Lock()
        self._retry_seconds = retry_seconds
        self.request_timeout = timeout

    @property
    def retry_seconds(self) -> float:
        """How long a transient fault is retried, on every plane (preflight shortens it)."""
        return self._retry_seconds

    @retry_seconds.setter
    def retry_seconds(self, value: float) -> None:
        self._retry_seconds = value
        self.api.retry_seconds = value
        if isinstance(self._transfers, PresignedTransfers):
            self._transfers.retry_seconds = value

    @property
    def transfers(self) -> Transfers:
        """The data plane `data_path` chose; `DataPathUnavailable` for `presign` on a
        server that cannot presign."""
        with self._transfers_lock:
            if self._transfers is None:
                self._transfers = self._choose_transfers()
            return self._transfers

    def _choose_transfers(self) -> Transfers:
        if self.data_path == "api":
            return self.api
        storage = self.storage_config()
        if not storage.pre_sign_support:
            if self.data_path == "presign":
                raise DataPathUnavailable(
                    501,
                    f"lakefs.data_path is presign, but the {storage.blockstore_type} blockstore "
                    f"at {self.endpoint} does not presign (set it to auto or api)",
                )
            return self.api
        return PresignedTransfers(
            self.api,
            blockstore=storage.blockstore_type,
            multipart=storage.pre_sign_multipart_upload,
            timeout=self.request_timeout,
            retry_seconds=self._retry_seconds,
        )

    def close(self) -> None:
        with self._transfers_lock:
            if self._transfers is not None and self._transfers is not self.api:
                self._transfers.close()
        self.api.close()
        self._client.close()

    # -- plumbing ---------------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, retry: bool = True, **kwargs: Any) -> T:
        """Run an SDK call with the retry policy (unless `retry=False`), translating 4xx.

        Every request carries the request timeout: the generated SDK sets none, so a
        stalled socket would otherwise hang a fence-to-merge window forever.
        """
        kwargs.setdefault("_request_timeout", self.request_timeout)
        version = self.credentials.version
        try:
            return self._call(fn, args, kwargs, retry)
        except Unauthorized:
            # A 401 to a key pair rotated since (or on disk, re-read now): once more.
            self.credentials.reload()
            if self.credentials.version == version:
                raise
            return self._call(fn, args, kwargs, retry)

    def _call(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], retry: bool
    ) -> T:
        if not retry:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                raise self._translate(exc) from None
            except urllib3.exceptions.HTTPError as exc:
                if certificate_refused(exc):
                    raise LakeFSError(0, certificate_message(self.endpoint, str(exc))) from None
                raise
        try:
            for attempt in retrying(self._retry_seconds):
                with attempt:
                    return fn(*args, **kwargs)
        except ApiException as exc:
            raise self._translate(exc) from None
        except urllib3.exceptions.HTTPError as exc:
            if certificate_refused(exc):  # urllib3 gave up: MaxRetryError(SSLError(...))
                raise LakeFSError(0, certificate_message(self.endpoint, str(exc))) from None
            raise
        raise AssertionError("unreachable")

    def _translate(self, exc: ApiException) -> LakeFSError:
        reason = str(getattr(exc, "reason", "") or "")
        if not exc.status and is_certificate_failure(reason):  # the SDK's TLS failure
            return LakeFSError(0, certificate_message(self.endpoint, reason))
        return translate(exc.status or 0, exc.body)

    def storage_config(self) -> StorageConfig:
        config = self.call(lakefs_sdk.ConfigApi(self._client).get_config)
        storage = config.storage_config
        if storage is None and config.storage_config_list:
            storage = config.storage_config_list[0]
        if storage is None:
            raise LakeFSError(502, "the server's config names no storage")
        return StorageConfig(
            blockstore_type=str(storage.blockstore_type),
            default_namespace_prefix=str(storage.default_namespace_prefix or ""),
            pre_sign_support=bool(storage.pre_sign_support),
            pre_sign_multipart_upload=bool(storage.pre_sign_multipart_upload),
        )

    # -- reads ------------------------------------------------------------------------------

    # The two reads every workspace attempt makes first (and `commit_staged` after a retried
    # commit) go as plain JSON over the data plane's keep-alive connection, like listings:
    # the SDK's argument validation and models cost more worker CPU than the request
    # (measured, docs/performance.md). Retries, 401 handling and errors are `call`'s.

    def get_commit(self, repository: str, ref: str) -> CommitInfo:
        route = f"{self._api_base}/repositories/{_q(repository)}/commits/{_q(ref)}"
        c = self.call(lambda **_: self.api.json("GET", route))
        return CommitInfo(
            id=str(c["id"]),
            parents=list(c.get("parents") or []),
            message=str(c.get("message") or ""),
            metadata={str(k): str(v) for k, v in (c.get("metadata") or {}).items()},
            creation_date=int(c.get("creation_date") or 0),
        )

    def branch_head(self, repository: str, branch: str) -> str:
        route = f"{self._api_base}/repositories/{_q(repository)}/branches/{_q(branch)}"
        return str(self.call(lambda **_: self.api.json("GET", route))["commit_id"])

    def repository_exists(self, repository: str) -> bool:
        try:
            self.call(self.repos.get_repository, repository)
        except NotFound:
            return False
        return True

    def list_objects(self, repository: str, ref: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        """Pages of objects under `prefix` in key order, through the API (no presigned URLs)."""
        return self.api.list_objects(repository, ref, prefix)

    def download(
        self, repository: str, ref: str, key: str, dest: Path, expected_size: int
    ) -> Downloaded:
        """Stream one object to `dest` through the API, verifying its size."""
        return self.api.download(repository, ref, ObjectInfo(key, expected_size, "", 0), dest)

    def changed_paths(self, repository: str, left: str, right: str, *, limit: int) -> list[str]:
        """Paths that differ between two refs (three-dot: what `right` changed since the base)."""
        paths: list[str] = []
        after = ""
        while len(paths) < limit:
            page = self.call(self.refs.diff_refs, repository, left, right, after=after, amount=1000)
            paths.extend(d.path for d in page.results)
            if not page.pagination.has_more:
                break
            after = page.pagination.next_offset
        return paths[:limit]

    # -- writes -----------------------------------------------------------------------------

    def upload(
        self,
        repository: str,
        branch: str,
        key: str,
        source: int | BinaryIO | Path,
        expected_size: int | None = None,
    ) -> str:
        """Stream an open file's first `expected_size` bytes to `key` through the API.

        For trusted local files (seeding, the demo, tests); the publisher uploads with
        `transfers`. A `Path` is opened here, O_NOFOLLOW.
        """
        if isinstance(source, Path):
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                return self.upload(repository, branch, key, fd, expected_size)
            finally:
                os.close(fd)
        fd = source if isinstance(source, int) else source.fileno()
        size = os.fstat(fd).st_size if expected_size is None else expected_size
        return self.api.upload(repository, branch, key, fd, size)

    def put_record(
        self, repository: str, branch: str, key: str, data: bytes, *, if_match: str | None
    ) -> None:
        """A small create-only (or compare-and-swap) record; see `ApiTransfers.put_record`."""
        self.api.put_record(repository, branch, key, data, if_match=if_match)

    def get_record(self, repository: str, ref: str, key: str) -> tuple[bytes, str] | None:
        return self.api.get_record(repository, ref, key)

    def list_keys(self, repository: str, ref: str, prefix: str) -> Iterator[str]:
        """Object keys under `prefix` (uncommitted ones included when `ref` is a branch)."""
        for page in self.list_objects(repository, ref, prefix):
            yield from (o.key for o in page)

    def delete_objects(self, repository: str, branch: str, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            self.call(
                self.objects.delete_objects, repository, branch, lakefs_sdk.PathList(paths=batch)
            )

    def create_branch(self, repository: str, name: str, source: str, *, hidden: bool = True) -> str:
        """Create a branch; `Conflict` when the name exists (creation is atomic)."""
        return str(
            self.call(
                self.branches.create_branch,
                repository,
                lakefs_sdk.BranchCreation(name=name, source=source, hidden=hidden),
            )
        )

    def delete_branch(self, repository: str, name: str) -> bool:
        try:
            self.call(self.branches.delete_branch, repository, name)
        except NotFound:
            return False
        return True

    def list_branches(self, repository: str, prefix: str) -> Iterator[tuple[str, str]]:
        """(name, head commit id) of branches starting with `prefix`, hidden ones included."""
        after = ""
        while True:
            page = self.call(
                self.branches.list_branches,
                repository,
                prefix=prefix,
                after=after,
                amount=1000,
                show_hidden=True,
            )
            for ref in page.results:
                yield ref.id, ref.commit_id
            if not page.pagination.has_more:
                return
            after = page.pagination.next_offset

    def commit(
        self, repository: str, branch: str, message: str, metadata: dict[str, str]
    ) -> CommitInfo:
        return _commit(
            self.call(
                self.commits.commit,
                repository,
                branch,
                lakefs_sdk.CommitCreation(message=message, metadata=metadata),
            )
        )

    def merge(
        self,
        repository: str,
        source: str,
        destination: str,
        message: str,
        metadata: dict[str, str],
        *,
        allow_empty: bool = False,
        retry: bool = True,
    ) -> str:
        """Merge `source` into `destination`; return the new head (the merge's `reference`).

        With `retry=False` a transient answer (429, 5xx, a timeout) is raised, not retried:
        the publish fence retries merges itself, re-checking its fences before each one.
        409 is a conflict, 412 a hook's refusal, `NoChanges` nothing to merge.
        """
        result = self.call(
            self.refs.merge_into_branch,
            repository,
            source,
            destination,
            merge=lakefs_sdk.Merge(message=message, metadata=metadata, allow_empty=allow_empty),
            retry=retry,
        )
        return str(result.reference)

    def log(
        self, repository: str, ref: str, *, amount: int = 1000, first_parent: bool = True
    ) -> list[CommitInfo]:
        page = self.call(
            self.refs.log_commits, repository, ref, amount=amount, first_parent=first_parent
        )
        return [_commit(c) for c in page.results]

    def walk_log(
        self, repository: str, ref: str, *, page_size: int = 100, first_parent: bool = True
    ) -> Iterator[CommitInfo]:
        """Commits of `ref`, newest first, fetched a page at a time as the caller reads."""
        after = ""
        while True:
            page = self.call(
                self.refs.log_commits,
                repository,
                ref,
                after=after,
                amount=page_size,
                first_parent=first_parent,
            )
            yield from (_commit(c) for c in page.results)
            if not page.pagination.has_more:
                return
            after = page.pagination.next_offset

    def create_repository(
        self, name: str, storage_namespace: str | None = None, default_branch: str = "main"
    ) -> None:
        """Create a repository; without `storage_namespace`, under the server's default
        namespace prefix (`blockstore.default_namespace_prefix`)."""
        if storage_namespace is None:
            prefix = self.storage_config().default_namespace_prefix
            if not prefix:
                raise LakeFSError(400, "no storage namespace given and the server has no default")
            # "local://" + name, "s3://bucket/" + name, "s3://bucket/repos" + "/" + name
            storage_namespace = prefix + name if prefix.endswith("/") else f"{prefix}/{name}"
        self.call(
            self.repos.create_repository,
            lakefs_sdk.RepositoryCreation(
                name=name, storage_namespace=storage_namespace, default_branch=default_branch
            ),
        )
