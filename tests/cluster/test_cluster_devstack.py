"""The devstack's cluster pieces without the JVMs: the exported endpoints round trip, the
persistence and blockstore rules, and PostgreSQL started, restarted and discarded (as root
too: through an unprivileged account, from a folder that account cannot enter)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from perago_worker.devstack import postgres, tools
from perago_worker.devstack.servers import (
    Endpoints,
    StoreEndpoint,
    endpoints_from_env,
    free_port,
    resolve_blockstore,
)

CLUSTER = Endpoints(
    "http://127.0.0.1:1",
    "key",
    "secret",
    "http://127.0.0.1:2/api",
    StoreEndpoint("http://127.0.0.1:3", "sk", "ss", "bucket"),
    lakefs_urls=("http://127.0.0.1:1", "http://127.0.0.1:4"),
    conductor_urls=("http://127.0.0.1:2/api", "http://127.0.0.1:5/api"),
    conductor_persistence="postgres",
)


def test_the_exports_of_a_cluster_read_back_as_the_same_endpoints() -> None:
    env = CLUSTER.as_test_env()
    assert env["PERAGO_TEST_CONDUCTOR_URLS"] == "http://127.0.0.1:2/api,http://127.0.0.1:5/api"
    assert env["PERAGO_TEST_LAKEFS_URLS"] == "http://127.0.0.1:1,http://127.0.0.1:4"
    assert env["PERAGO_TEST_CONDUCTOR_PERSISTENCE"] == "postgres"
    assert endpoints_from_env(env) == CLUSTER
    # A worker's own settings name one instance, never the test-only exports.
    assert CLUSTER.instance(1).as_env()["PERAGO_CONDUCTOR__URL"] == "http://127.0.0.1:5/api"
    assert CLUSTER.instance(1).as_env()["PERAGO_LAKEFS__ENDPOINT"] == "http://127.0.0.1:4"
    assert not any(k.startswith("PERAGO_TEST_") for k in CLUSTER.as_env())


def test_single_server_exports_without_the_new_variables_still_read() -> None:
    """What an older `up` printed: the tuples default to the one server, SQLite."""
    single = endpoints_from_env(
        {
            "PERAGO_TEST_LAKEFS_URL": "http://127.0.0.1:1/",
            "PERAGO_TEST_CONDUCTOR_URL": "http://127.0.0.1:2/api",
            "PERAGO_TEST_LAKEFS_ACCESS_KEY_ID": "k",
            "PERAGO_TEST_LAKEFS_SECRET_ACCESS_KEY": "s",
        }
    )
    assert single is not None
    assert single.lakefs_urls == ("http://127.0.0.1:1",)
    assert single.conductor_urls == ("http://127.0.0.1:2/api",)
    assert single.conductor_persistence == "sqlite"
    assert single.instance(1) == single
    assert endpoints_from_env(single.as_test_env()) == single


def test_the_blockstore_follows_the_persistence_and_local_is_refused_on_postgres() -> None:
    assert resolve_blockstore(None, "sqlite") == "local"
    assert resolve_blockstore("s3", "sqlite") == "s3"
    assert resolve_blockstore(None, "postgres") == "s3"
    with pytest.raises(ValueError, match="use blockstore='s3'"):
        resolve_blockstore("local", "postgres")
    with pytest.raises(ValueError, match="conductor must be one of"):
        resolve_blockstore(None, "mysql")
    with pytest.raises(ValueError, match="conductor_persistence"):
        Endpoints("a", "b", "c", "d", conductor_persistence="mysql")


def _bin_dir() -> Path:
    try:
        return tools.postgres_bin_dir()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def test_postgres_starts_keeps_its_data_over_a_restart_and_is_discarded(tmp_path: Path) -> None:
    # A folder only its owner may enter, as pytest's own temporary root is: as root, the
    # cluster cannot live in it (its account could not reach it) and goes elsewhere.
    workdir = tmp_path / "closed" / "stack"
    workdir.mkdir(parents=True)
    (tmp_path / "closed").chmod(stat.S_IRWXU)
    server = postgres.PostgresServer(workdir, free_port(), _bin_dir())
    try:
        if os.geteuid() == 0:
            assert server.user == postgres.DEFAULT_OS_USER
            assert (workdir / "postgres").is_symlink()
            assert not server.root.is_relative_to(tmp_path)
        else:
            assert server.user is None and server.root == workdir / "postgres"
        server.start()
        server.wait_ready(30)
        server.create_databases()
        server.create_databases()  # idempotent: a restarted stack creates them again
        server.restart()
        psql = server.bin_dir / "psql"
        cmd = [str(psql), "-X", "-At", "-h", "127.0.0.1", "-p", str(server.port)]
        cmd += ["-U", postgres.SUPERUSER, "-d", "postgres", "-c", "SELECT datname FROM pg_database"]
        names = subprocess.run(
            postgres.as_user(cmd, server.user), capture_output=True, text=True, check=True
        ).stdout.split()
        assert set(postgres.DATABASES) <= set(names)
        assert server.ready() and server.pid is not None
    finally:
        server.discard()
    assert server.pid is None and not server.ready()
    if os.geteuid() == 0:
        assert not server.root.exists() and not (workdir / "postgres").exists()
