"""Session-wide real servers, and a fresh lakeFS repository for each test module.

The servers are started once per pytest session by `perago_worker.devstack` (obtained and
cached outside the repo on first use), or reused when `PERAGO_TEST_LAKEFS_URL` and
`PERAGO_TEST_CONDUCTOR_URL` (with `PERAGO_TEST_LAKEFS_ACCESS_KEY_ID` and
`PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY`) point at running ones. A failing test's report ends
with the tail of both server logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from perago_testing import new_repository
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import Endpoints, Stack, start_stack
from perago_worker.lakefs import LakeFS

_STACK: Stack | None = None


def _external_endpoints() -> Endpoints | None:
    lakefs_url = os.environ.get("PERAGO_TEST_LAKEFS_URL")
    conductor_url = os.environ.get("PERAGO_TEST_CONDUCTOR_URL")
    if not (lakefs_url and conductor_url):
        return None
    return Endpoints(
        lakefs_url=lakefs_url.rstrip("/"),
        lakefs_access_key_id=os.environ["PERAGO_TEST_LAKEFS_ACCESS_KEY_ID"],
        lakefs_secret_access_key=os.environ["PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY"],
        conductor_url=conductor_url.rstrip("/"),
    )


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    global _STACK
    external = _external_endpoints()
    if external is not None:
        yield external
        return
    stack = start_stack(tmp_path_factory.mktemp("stack"))
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
    client = LakeFS(
        endpoints.lakefs_url, endpoints.lakefs_access_key_id, endpoints.lakefs_secret_access_key
    )
    yield client
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
