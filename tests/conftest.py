"""Session-wide real servers, and a fresh lakeFS repository for each test module.

The servers are started once per pytest session by `perago_worker.devstack` (obtained and
cached outside the repo on first use), or reused when `PERAGO_TEST_LAKEFS_URL` and
`PERAGO_TEST_CONDUCTOR_URL` (with `PERAGO_TEST_LAKEFS_ACCESS_KEY_ID` and
`PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY`, and `PERAGO_TEST_STORE_*` when lakeFS sits on the S3
store) point at running ones. The session's lakeFS runs on the blockstore
`PERAGO_TEST_BLOCKSTORE` names: `s3` (the default: an S3-compatible store, presigned
transfers, as in production) or `local`. A failing test's report ends with the tail of the
server logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from perago_testing import lakefs_client, new_repository
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import (
    BLOCKSTORES,
    Endpoints,
    Stack,
    endpoints_from_env,
    start_stack,
)
from perago_worker.lakefs import DataPathUnavailable, LakeFS, Transfers

_STACK: Stack | None = None


def session_blockstore() -> str:
    blockstore = os.environ.get("PERAGO_TEST_BLOCKSTORE", "s3")
    if blockstore not in BLOCKSTORES:
        raise pytest.UsageError(f"PERAGO_TEST_BLOCKSTORE must be one of {BLOCKSTORES}")
    return blockstore


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    global _STACK
    external = endpoints_from_env(os.environ)
    if external is not None:
        yield external
        return
    stack = start_stack(tmp_path_factory.mktemp("stack"), blockstore=session_blockstore())
    _STACK = stack
    try:
        yield stack.endpoints
    finally:
        stack.stop()
        _STACK = None


@pytest.fixture(scope="session")
def stack(endpoints: Endpoints) -> Stack:
    """The locally started stack, for tests that restart servers; skipped on external ones."""
    if _STACK is None:
        pytest.skip("servers are external (PERAGO_TEST_*_URL); cannot restart them")
    return _STACK


@pytest.fixture(scope="session")
def lakefs(endpoints: Endpoints) -> Iterator[LakeFS]:
    yield from lakefs_client(endpoints)


@pytest.fixture(scope="session", params=["api", "presign"])
def transfers(endpoints: Endpoints, request: pytest.FixtureRequest) -> Iterator[Transfers]:
    """Each data plane in turn: through lakeFS, and presigned (skipped where lakeFS cannot)."""
    client = LakeFS(
        endpoints.lakefs_url,
        endpoints.lakefs_access_key_id,
        endpoints.lakefs_secret_access_key,
        data_path=request.param,
    )
    try:
        chosen = client.transfers
    except DataPathUnavailable:
        client.close()
        pytest.skip(f"lakeFS on the {endpoints.blockstore} blockstore cannot presign")
    yield chosen
    client.close()


@pytest.fixture(scope="session")
def conductor(endpoints: Endpoints) -> Conductor:
    return Conductor(endpoints.conductor_url)


@pytest.fixture(scope="module")
def repo(lakefs: LakeFS, request: pytest.FixtureRequest) -> str:
    """A fresh repository for this test module (branch `main`)."""
    return new_repository(lakefs, Path(str(request.module.__file__)).stem.removeprefix("test_"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _STACK is not None and call.when in ("setup", "call"):
        report.sections.append(("server logs", _STACK.log_tails()))
