"""The cluster suite: PostgreSQL under two Conductors and two lakeFS servers (`conductor=
"postgres"` in `perago_worker.devstack.servers`), started once per session.

It overrides the session's `endpoints` and `stack` for the tests in this folder, and with
them the session-scoped clients `lakefs` and `conductor`: the root conftest's are cached
for the whole session, so if a test here made them they would point every later folder's
tests at the cluster while their workers use the session's stack. The root's `repo` then
talks to the cluster's first instance; `endpoints.conductor_urls` / `endpoints.lakefs_urls`
name both. A running cluster
is reused when the `PERAGO_TEST_*` exports of `python -m perago_worker.devstack up
--conductor postgres` are set; any other exported stack is left to the rest of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from perago_testing import lakefs_client
from perago_worker.conductor import Conductor
from perago_worker.devstack import tools
from perago_worker.devstack.servers import Endpoints, Stack, endpoints_from_env, start_stack
from perago_worker.lakefs import LakeFS

_CLUSTER: Stack | None = None


def exported_cluster() -> Endpoints | None:
    """The exported stack, if it is a cluster (PostgreSQL and at least two of each server)."""
    external = endpoints_from_env(os.environ)
    if (
        external is not None
        and external.conductor_persistence == "postgres"
        and len(external.conductor_urls) >= 2
        and len(external.lakefs_urls) >= 2
    ):
        return external
    return None


@pytest.fixture(scope="session")
def cluster_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    global _CLUSTER
    external = exported_cluster()
    if external is not None:
        yield external
        return
    try:
        tools.postgres_bin_dir()
    except RuntimeError as exc:  # scripts/test installs it where it can; say what is missing
        pytest.skip(str(exc))
    stack = start_stack(tmp_path_factory.mktemp("cluster"), conductor="postgres")
    _CLUSTER = stack
    try:
        yield stack.endpoints
    finally:
        stack.stop()
        _CLUSTER = None


@pytest.fixture(scope="session")
def endpoints(cluster_endpoints: Endpoints) -> Endpoints:
    return cluster_endpoints


@pytest.fixture(scope="session")
def lakefs(cluster_endpoints: Endpoints) -> Iterator[LakeFS]:
    yield from lakefs_client(cluster_endpoints)


@pytest.fixture(scope="session")
def conductor(cluster_endpoints: Endpoints) -> Conductor:
    return Conductor(cluster_endpoints.conductor_url)


@pytest.fixture(scope="session")
def stack(cluster_endpoints: Endpoints) -> Stack:
    if _CLUSTER is None:
        pytest.skip("the cluster is external (PERAGO_TEST_*_URLS); cannot restart it")
    return _CLUSTER


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _CLUSTER is not None and call.when in ("setup", "call"):
        report.sections.append(("cluster logs", _CLUSTER.log_tails()))
