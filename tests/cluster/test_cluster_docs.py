"""docs/fences.md "Conductor on Postgres" quotes code: Conductor 3.32.3's (read back here from
the classes of the boot jar the stack runs, not from a copy of its source) and the devstack's.

A Java class file keeps each `long` literal as a CONSTANT_Long entry (tag 5, eight bytes big
endian) and each string as UTF-8, so a quoted constant or SQL fragment is checked by looking
for exactly those bytes in the class that uses it. No servers are needed.
"""

from __future__ import annotations

import functools
import io
import zipfile
from pathlib import Path

import pytest

from perago_worker.devstack import postgres, servers, tools

DOC = (Path(__file__).parents[2] / "docs" / "fences.md").read_text()
SECTION = DOC[DOC.index("## Conductor on Postgres") :].split("\n## ", 1)[0]


@functools.cache
def _jar_class(library: str, name: str) -> bytes:
    """The bytes of class `name` (a/b/C) in the boot jar's `BOOT-INF/lib/<library>-<v>.jar`."""
    jar = tools.conductor_jar()
    with zipfile.ZipFile(jar) as boot:
        inner = f"BOOT-INF/lib/{library}-{tools.CONDUCTOR_VERSION}.jar"
        with zipfile.ZipFile(io.BytesIO(boot.read(inner))) as lib:
            return lib.read(f"{name}.class")


def _has_long(code: bytes, value: int) -> bool:
    return b"\x05" + value.to_bytes(8, "big", signed=True) in code


def _utf8(code: bytes, text: str) -> bool:
    """`text` inside one of the class's strings (ASCII is the same in Java's modified UTF-8)."""
    return text.encode() in code


PG_QUEUE = ("conductor-postgres-persistence", "com/netflix/conductor/postgres/dao/PostgresQueueDAO")
SQLITE_QUEUE = ("conductor-sqlite-persistence", "com/netflix/conductor/sqlite/dao/SqliteQueueDAO")
PG_LOCK = ("conductor-postgres-persistence", "com/netflix/conductor/postgres/dao/PostgresLockDAO")
PG_PROPS = (
    "conductor-postgres-persistence",
    "com/netflix/conductor/postgres/config/PostgresProperties",
)
CORE_PROPS = ("conductor-core", "com/netflix/conductor/core/config/ConductorProperties")
SWEEPER = ("conductor-core", "org/conductoross/conductor/core/execution/WorkflowSweeper")


def test_the_section_names_the_version_it_read() -> None:
    assert f"Conductor {tools.CONDUCTOR_VERSION}" in SECTION


def test_unacked_messages_come_back_after_60_s_on_a_60_s_schedule_on_both() -> None:
    assert "60 s after its delivery time, checked every 60 s" in SECTION
    for queue in (PG_QUEUE, SQLITE_QUEUE):
        assert _has_long(_jar_class(*queue), 60_000), queue  # UNACK_SCHEDULE_MS
    assert _utf8(
        _jar_class(*PG_QUEUE), "(deliver_on + (60 ||' seconds')::interval)  <  current_timestamp"
    )
    assert _utf8(
        _jar_class(*SQLITE_QUEUE), "strftime('%Y-%m-%d %H:%M:%f', deliver_on, '+60 seconds')"
    )


def test_the_sweeper_leaves_what_it_pops_unacknowledged() -> None:
    assert "never acknowledges" in SECTION
    code = _jar_class(*SWEEPER)
    assert _utf8(code, "_deciderQueue")
    assert b"setUnackTimeout" not in code and b"\x01\x00\x03pop" in code


def test_the_pop_order_and_the_skip_locked_pop() -> None:
    assert "`deliver_on, priority DESC, created_on`" in SECTION
    assert "`priority DESC, deliver_on, created_on`" in SECTION
    assert "`FOR UPDATE SKIP LOCKED`" in SECTION
    pg, sqlite = _jar_class(*PG_QUEUE), _jar_class(*SQLITE_QUEUE)
    assert (
        b"ORDER BY deliver_on, priority DESC, created_on     LIMIT ?     FOR UPDATE SKIP LOCKED"
        in pg
    )
    assert b"ORDER BY priority DESC, deliver_on, created_on LIMIT ?" in sqlite


def test_a_push_onto_a_popped_message_resets_it_on_sqlite_only() -> None:
    assert "keeps `popped`" in SECTION
    pg, sqlite = _jar_class(*PG_QUEUE), _jar_class(*SQLITE_QUEUE)
    assert (
        b"DO UPDATE SET payload=excluded.payload, deliver_on=excluded.deliver_on, popped=false"
        in sqlite
    )
    assert b"popped=false" not in pg  # the pop and the unack sweep spell it `popped = false`


def test_the_workflow_lock_lease_wait_and_retry_interval() -> None:
    assert "lease 60 s (`lockLeaseTime`)" in SECTION
    assert "for 500 ms (`lockTimeToTry`)" in SECTION
    assert "every 100 ms" in SECTION
    core = _jar_class(*CORE_PROPS)
    assert _has_long(core, 60_000) and _has_long(core, 500)
    assert _has_long(_jar_class(*PG_LOCK), 100)
    assert _utf8(
        _jar_class(*PG_LOCK),
        "ON CONFLICT (lock_id) DO UPDATE SET lease_expiration = EXCLUDED.lease_expiration WHERE locks.lease_expiration <= now()",
    )


def test_the_task_definition_cache_refresh() -> None:
    assert "every 60 s (`conductor.postgres.taskDefCacheRefreshInterval`)" in SECTION
    assert _has_long(_jar_class(*PG_PROPS), 60)


def test_the_devstack_numbers() -> None:
    assert f"{servers.CLUSTER_SIZE} Conductors and {servers.CLUSTER_SIZE} lakeFS" in SECTION
    assert f"`max_connections` {postgres.MAX_CONNECTIONS}" in SECTION
    assert f"{servers.LAKEFS_DB_CONNECTIONS} database connections each" in SECTION
    offset = "--conductor.app.workflow-offset-timeout=3s"
    assert offset in servers.conductor_server(Path("/x"), 1, Path("/j.jar"), Path("/b/j/java")).cmd
    assert "`workflow-offset-timeout` 3 s" in SECTION


@pytest.mark.parametrize("name", [postgres.SUPERUSER, *postgres.DATABASES])
def test_the_roles_and_databases(name: str) -> None:
    assert f"`{name}`" in SECTION


def test_the_merge_race_answer_is_429_and_the_worker_retries_it() -> None:
    """lakeFS 1.86 answers a branch update that lost its compare-and-swap too often with 429
    (read from its Go module, where `lakefs_binaries` built it from; skipped when the module
    cache holds no copy), and the worker's lakeFS adapter retries a 429 as transient."""
    import subprocess

    from perago_worker.lakefs import LakeFSError, is_transient

    assert "answering 429, which the worker retries" in SECTION
    assert is_transient(LakeFSError(429, "Too many attempts, try again later"))
    try:
        modcache = subprocess.run(
            ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no Go toolchain to find lakeFS's module source")
    source = Path(modcache) / f"github.com/treeverse/lakefs@{tools.LAKEFS_VERSION}"
    if not source.exists():
        pytest.skip(f"lakeFS {tools.LAKEFS_VERSION} is not in the Go module cache")
    controller = (source / "pkg/api/controller.go").read_text()
    case = controller.index("case errors.Is(err, graveler.ErrTooManyTries):")
    assert "http.StatusTooManyRequests" in controller[case : case + 300]
    graveler = (source / "pkg/graveler/graveler.go").read_text()
    assert "func (g *Graveler) retryBranchUpdate(" in graveler
    assert "ErrTooManyTries" in graveler[graveler.index("func (g *Graveler) retryBranchUpdate(") :]


def test_the_cluster_suite_figures() -> None:
    from test_cluster_merges import TASKS

    assert f"run {TASKS} workspace tasks" in SECTION
    assert f"gains exactly {TASKS}\ncommits" in SECTION
