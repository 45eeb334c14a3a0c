"""The lakeFS adapter: the only place the worker talks to lakeFS or its object store.

- `control`: the control plane (`LakeFS`: branches, commits, merges, logs) over the SDK.
- `transfers`: the data plane's interface (list, download, upload) and its two rooms:
  `api` (bodies through the lakeFS server) and `presigned` (bodies straight to and from the
  object store on URLs lakeFS presigns), chosen by `lakefs.data_path`.
- `errors`: what the servers answered, as exceptions; what is transient.
"""

from perago_worker.lakefs.control import DATA_PATHS, CommitInfo, LakeFS, StorageConfig
from perago_worker.lakefs.errors import (
    Conflict,
    ContentMismatch,
    DataPathUnavailable,
    HookRejected,
    LakeFSError,
    NoChanges,
    NotFound,
    PreconditionFailed,
    SourceChanged,
    StoreError,
    Unauthorized,
    is_transient,
    retrying,
    translate,
)
from perago_worker.lakefs.transfers import Downloaded, ObjectInfo, Transfers

__all__ = [
    "DATA_PATHS",
    "CommitInfo",
    "Conflict",
    "ContentMismatch",
    "DataPathUnavailable",
    "Downloaded",
    "HookRejected",
    "LakeFS",
    "LakeFSError",
    "NoChanges",
    "NotFound",
    "ObjectInfo",
    "PreconditionFailed",
    "SourceChanged",
    "StorageConfig",
    "StoreError",
    "Transfers",
    "Unauthorized",
    "is_transient",
    "retrying",
    "translate",
]
