"""Operating it: check, register, config show, metrics, handler configuration, secrets."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from perago_testing import (
    cli_env,
    new_repository,
    one_task_workflow,
    run_cli,
    seed,
    suffix,
    workspace,
)
from perago_worker import fences, preflight
from perago_worker.conductor import Conductor
from perago_worker.devstack import tools
from perago_worker.devstack.demo import wait_for_workflow
from perago_worker.devstack.servers import Endpoints, free_port
from perago_worker.devstack.worker_process import WorkerProcess, start_worker
from perago_worker.gc import collect
from perago_worker.lakefs import LakeFS

S = suffix()
HERE = Path(__file__).parent
APP = "ops_app:app"
HANDLER_SECRET = f"handler-secret-{S}-do-not-print"


def ops_env(endpoints: Endpoints, repo: str, tmp: Path, **extra: str) -> dict[str, str]:
    return cli_env(
        endpoints,
        PYTHONPATH=str(HERE),
        PERAGO_TEST_SUFFIX=S,
        PERAGO_ALLOWED_REPOSITORIES=json.dumps([repo]),
        PERAGO_SCRATCH_ROOT=str(tmp / "scratch"),
        PERAGO_HANDLER_CONFIG=json.dumps({"REGION": "eu-west-9"}),
        PERAGO_HANDLER_SECRETS=json.dumps({"API_KEY": HANDLER_SECRET}),
        **extra,
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, timeout=120)


@pytest.fixture(scope="module")
def env(
    endpoints: Endpoints, repo: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return ops_env(endpoints, repo, tmp_path_factory.mktemp("ops"))


@pytest.fixture(scope="module")
def registered(env: dict[str, str]) -> None:
    result = cli(env, "register", APP)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def worker(
    endpoints: Endpoints,
    env: dict[str, str],
    registered: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    extra = {k: v for k, v in env.items() if k.startswith("PERAGO_") or k == "PYTHONPATH"}
    extra.pop("PERAGO_SCRATCH_ROOT")
    proc = start_worker(APP, endpoints, tmp_path_factory.mktemp("ops-worker"), env=extra)
    yield proc
    proc.stop()


def test_register_dry_run_shows_the_diff_and_changes_nothing(
    env: dict[str, str], conductor: Conductor
) -> None:
    env = {**env, "PERAGO_TEST_SUFFIX": f"dry{S}"}
    result = cli(env, "register", APP, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"+ opsws_dry{S}: create" in result.stdout
    assert "dry run" in result.stdout
    assert f"opsws_dry{S}" not in {d.name for d in conductor.get_task_defs()}


def test_register_creates_definitions_with_json_schemas(
    registered: None, env: dict[str, str], conductor: Conductor
) -> None:
    defs = {d.name: d for d in conductor.get_task_defs()}
    ws = defs[f"opsws_{S}"]
    assert ws.response_timeout_seconds == 300
    assert sorted(ws.input_keys) == ["params", "workspace"]
    assert ws.description.endswith(f"[perago-worker app={APP}]")
    again = cli(env, "register", APP, "--dry-run")
    assert f"opsws_{S}: up to date" in again.stdout


def test_register_writes_the_options_a_task_declares_into_its_definition(
    registered: None, conductor: Conductor
) -> None:
    defined = {d.name: d for d in conductor.get_task_defs()}[f"opsopts_{S}"]
    assert (defined.retry_count, defined.retry_logic, defined.retry_delay_seconds) == (
        5,
        "FIXED",
        7,
    )
    assert defined.timeout_seconds == 4000
    assert (defined.rate_limit_per_frequency, defined.rate_limit_frequency_in_seconds) == (10, 60)


def test_settings_override_a_declared_option_and_dry_run_says_where_each_comes_from(
    registered: None, env: dict[str, str], conductor: Conductor
) -> None:
    overrides = json.dumps({f"opsopts_{S}": {"retries": 9, "concurrency": 3}})
    result = cli({**env, "PERAGO_TASK_OPTIONS": overrides}, "register", APP, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = lines.index(f"~ opsopts_{S}: retry_count: 5 -> 9")
    assert lines[at + 1].split(", ") == [
        "    concurrency=3 (settings)",
        "retries=9 (settings)",
        "retry_logic=FIXED (code)",
        "retry_delay_seconds=7 (code)",
        "response_timeout_seconds=300 (code)",
        "total_timeout_seconds=4000 (code)",
        "rate_limit_per_frequency=10 (code)",
        "rate_limit_frequency_seconds=60 (code)",
    ]
    defined = {d.name: d for d in conductor.get_task_defs()}[f"opsopts_{S}"]
    assert defined.retry_count == 5  # a dry run changes nothing


def test_check_passes_against_the_local_stack(env: dict[str, str], registered: None) -> None:
    result = cli(env, "check", APP)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    order = [
        "settings",
        "handlers import",
        "Conductor reachable",
        "lakeFS reachable",
        "repository",
        "scratch root",
        "task definitions",
    ]
    positions = [next(i for i, line in enumerate(lines) if name in line) for name in order]
    assert positions == sorted(positions)
    assert all(line.startswith("ok") for line in lines)


@pytest.mark.parametrize(
    ("change", "failing", "says"),
    [
        (
            {"PERAGO_LAKEFS__SECRET_ACCESS_KEY": "wrong-secret-value-123"},
            "lakeFS reachable",
            "rejected the credentials",
        ),
        (
            {"PERAGO_CONDUCTOR__URL": "http://127.0.0.1:{port}/api"},
            "Conductor reachable",
            "PERAGO_CONDUCTOR__URL",
        ),
        (
            {"PERAGO_ALLOWED_REPOSITORIES": '["no-such-repo-{suffix}"]'},
            "repository no-such-repo",
            "does not exist",
        ),
        ({"PERAGO_SCRATCH_ROOT": "{file}/scratch"}, "scratch root", "not writable"),
    ],
    ids=[
        "wrong-lakefs-secret",
        "unreachable-conductor",
        "repository-not-accessible",
        "scratch-not-writable",
    ],
)
def test_check_fails_with_one_clear_line(
    env: dict[str, str],
    registered: None,
    tmp_path: Path,
    change: dict[str, str],
    failing: str,
    says: str,
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    values = {k: v.format(port=free_port(), suffix=S, file=blocker) for k, v in change.items()}
    result = cli({**env, **values}, "check", APP)
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failing in line and says in line
    assert "Traceback" not in result.stdout + result.stderr
    assert "wrong-secret-value-123" not in result.stdout + result.stderr


def test_a_task_outside_the_allowed_repositories_fails_terminally(
    worker: WorkerProcess, conductor: Conductor, lakefs: LakeFS, tmp_path: Path
) -> None:
    from perago_testing import new_repository

    stranger = new_repository(lakefs, "stranger")
    ref = seed(lakefs, stranger, {"ops/x": b"x"}, tmp_path)
    run = run_one(
        conductor, f"opsws_{S}", {"workspace": workspace(stranger, ref), "params": {"name": "x"}}
    )
    task = run.tasks[0]
    assert task.status == "FAILED_WITH_TERMINAL_ERROR"
    assert "forbidden_repository" in task.reason_for_incompletion
    assert lakefs.branch_head(stranger, "main") == ref


def test_config_show_masks_secrets(env: dict[str, str]) -> None:
    result = cli(env, "config", "show")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["lakefs"]["secret_access_key"] == "**********"
    assert shown["handler_secrets"]["API_KEY"] == "**********"
    assert shown["handler_config"] == {"REGION": "eu-west-9"}
    assert HANDLER_SECRET not in result.stdout
    assert env["PERAGO_LAKEFS__SECRET_ACCESS_KEY"] not in result.stdout


def test_invalid_settings_are_one_clear_line(env: dict[str, str]) -> None:
    result = cli({**env, "PERAGO_ENVIRONMENT": "Production!"}, "config", "show")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "environment" in result.stderr and "Traceback" not in result.stderr


def run_one(conductor: Conductor, task_type: str, task_input: dict[str, Any]) -> Any:
    name = one_task_workflow(conductor, task_type, sorted(task_input))
    return wait_for_workflow(conductor, conductor.start_workflow(name, task_input), 120)


def test_handler_reads_environment_configuration_and_secrets(
    worker: WorkerProcess, conductor: Conductor
) -> None:
    for key, value in (("REGION", "eu-west-9"), ("API_KEY", HANDLER_SECRET)):
        run = run_one(conductor, f"opscfg_{S}", {"params": {"key": key}})
        assert run.status == "COMPLETED"
        assert (
            run.tasks[0].output_data["result"]["sha256"]
            == hashlib.sha256(value.encode()).hexdigest()
        )
    run = run_one(conductor, f"opscfg_{S}", {"params": {"key": "NOPE"}})
    reason = run.tasks[0].reason_for_incompletion
    assert "NOPE" in reason and "API_KEY" in reason and "REGION" in reason


def test_secrets_never_appear_in_the_worker_log(
    worker: WorkerProcess, conductor: Conductor, env: dict[str, str]
) -> None:
    run_one(conductor, f"opscfg_{S}", {"params": {"key": "API_KEY"}})
    log = worker.log_path.read_text()
    assert "handler.read_config" in log
    assert HANDLER_SECRET not in log
    assert env["PERAGO_LAKEFS__SECRET_ACCESS_KEY"] not in log


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_metrics_after_a_workflow_carry_phase_histograms_and_outcomes(
    worker: WorkerProcess, conductor: Conductor, lakefs: LakeFS, repo: str, tmp_path: Path
) -> None:
    ref = seed(lakefs, repo, {"ops/a.txt": b"a", "ops/b.txt": b"bb"}, tmp_path)
    before = worker.get("/metrics")[1]
    task_type = f"opsws_{S}"
    try:
        done_before = metric(before, "perago_tasks_total", task_type=task_type, status="COMPLETED")
    except AssertionError:
        done_before = 0.0
    run = run_one(
        conductor, task_type, {"workspace": workspace(repo, ref), "params": {"name": "m"}}
    )
    assert run.status == "COMPLETED"
    text = worker.get("/metrics")[1]
    assert (
        metric(text, "perago_tasks_total", task_type=task_type, status="COMPLETED")
        == done_before + 1
    )
    for phase in (
        "validate",
        "materialize",
        "pre_check",
        "handler",
        "post_check",
        "stage",
        "fence",
        "merge",
    ):
        assert metric(text, "perago_phase_seconds_count", task_type=task_type, phase=phase) >= 1, (
            phase
        )
    assert metric(text, "perago_phase_seconds_count", task_type=task_type, phase="poll") > 0
    assert metric(text, "perago_files_total", task_type=task_type, direction="down") >= 2
    assert metric(text, "perago_files_total", task_type=task_type, direction="up") >= 1
    assert metric(text, "perago_attempts_in_flight", task_type=task_type) == 0
    assert metric(text, "perago_worker_state", state="running") == 1
    assert metric(text, "perago_last_poll_timestamp_seconds") > 0
    status = json.loads(worker.get("/status")[1])
    assert status["state"] == "running" and status["handlers_without_definitions"] == []


def test_several_processes_share_one_port_and_their_metrics_add_up(
    endpoints: Endpoints,
    env: dict[str, str],
    conductor: Conductor,
    lakefs: LakeFS,
    repo: str,
    tmp_path: Path,
    worker: WorkerProcess,
) -> None:
    worker.stop()  # the single-process worker would compete for the tasks
    extra = {k: v for k, v in env.items() if k.startswith("PERAGO_") or k == "PYTHONPATH"}
    extra.pop("PERAGO_SCRATCH_ROOT")
    extra["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    multi = start_worker(APP, endpoints, tmp_path / "multi", env=extra, args=("--processes", "2"))
    try:
        ref = seed(lakefs, repo, {"ops/m.txt": b"m"}, tmp_path)
        task_type = f"opsws_{S}"
        name = one_task_workflow(conductor, task_type, ["params", "workspace"])
        ids = [
            conductor.start_workflow(
                name, {"workspace": workspace(repo, ref, "main"), "params": {"name": f"p{i}"}}
            )
            for i in range(4)
        ]
        runs = [wait_for_workflow(conductor, i, 120) for i in ids]
        assert [r.status for r in runs] == ["COMPLETED"] * 4
        completed = 4
        text = multi.get("/metrics")[1]
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("perago_tasks_total{") and f'task_type="{task_type}"' in line
        )
        assert total == len(runs)
        assert (
            metric(text, "perago_tasks_total", task_type=task_type, status="COMPLETED") == completed
        )
        assert metric(text, "perago_attempts_in_flight", task_type=task_type) == 0
        assert metric(text, "perago_worker_state", state="running") == 1
        status = json.loads(multi.get("/status")[1])
        assert len(status["processes"]) == 2 and all(status["processes"].values())
    finally:
        assert multi.stop() == 0


# -- gc deletes only on Conductor's clear word ----------------------------------------------------


class _Canned(BaseHTTPRequestHandler):
    """Answers every request from a table: path -> (status, JSON body), else `default`."""

    routes: dict[str, tuple[int, bytes]] = {}
    default: tuple[int, bytes] = (503, b'{"status":503,"message":"unavailable"}')
    hits: list[str]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        self.hits.append(f"{self.command} {path}")
        status, body = self.routes.get(path, self.default)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def canned_conductor(
    default: tuple[int, bytes], routes: dict[str, tuple[int, bytes]] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """A tiny local HTTP server standing in for Conductor: yields its API URL and the hits."""
    hits: list[str] = []
    handler = type(
        "Handler", (_Canned,), {"routes": routes or {}, "default": default, "hits": hits}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def leftover_branches(lakefs: LakeFS, tmp_path: Path, workflow_id: str) -> tuple[str, str, str]:
    """A repository with one intent branch (of `workflow_id`) and one stale staging branch."""
    repo = new_repository(lakefs, "gc")
    source = f"attempt-{suffix()}"
    lakefs.create_branch(repo, source, "main", hidden=False)
    staged = tmp_path / "staged.txt"
    staged.write_text("staged")
    lakefs.upload(repo, source, "gc/staged.txt", staged)
    commit = lakefs.commit(repo, source, "staged", {"perago.workflow_id": workflow_id})
    intent = fences.INTENT_PREFIX + secrets.token_hex(24)
    assert len(intent) == len(fences.INTENT_PREFIX) + 48
    lakefs.create_branch(repo, intent, commit.id, hidden=True)
    staging = fences.staging_branch(str(uuid.uuid4()), uuid.uuid4().hex[:8], time.time() - 7200)
    assert fences.parse_staging_branch(staging) is not None
    lakefs.create_branch(repo, staging, "main", hidden=True)
    return repo, intent, staging


def branches(lakefs: LakeFS, repo: str) -> set[str]:
    return {
        name
        for prefix in (fences.STAGING_PREFIX, fences.INTENT_PREFIX)
        for name, _ in lakefs.list_branches(repo, prefix)
    }


@pytest.mark.parametrize("answer", ["refused", "503", "403"])
def test_gc_deletes_no_branch_when_conductor_cannot_answer(
    lakefs: LakeFS, tmp_path: Path, answer: str
) -> None:
    """Connection refused, 5xx after the retries, 403: every branch is kept, as unverifiable."""
    repo, intent, staging = leftover_branches(lakefs, tmp_path, str(uuid.uuid4()))
    with contextlib.ExitStack() as stack:
        if answer == "refused":
            url, hits = f"http://127.0.0.1:{free_port()}/api", []
        else:
            status = int(answer)
            body = json.dumps({"status": status, "message": "no"}).encode()
            url, hits = stack.enter_context(canned_conductor((status, body)))
        started = time.monotonic()
        report = collect(
            tmp_path / "scratch",
            lakefs,
            Conductor(url),
            [repo],
            older_than=0,
            intent_older_than=0,
            conductor_retry_seconds=1,
        )
        elapsed = time.monotonic() - started
    assert branches(lakefs, repo) == {intent, staging}
    assert report.staging_branches == [] and report.intent_branches == []
    assert report.kept_live == []
    assert sorted(report.unverifiable) == sorted([f"{repo}:{intent}", f"{repo}:{staging}"])
    if answer != "refused":
        assert hits and all(h.startswith("GET /api/") for h in hits)
        assert all(answer in r for r in report.unverifiable_reasons.values())
    assert elapsed < 30, "the Conductor calls are bounded"


def test_gc_deletes_the_intent_and_staging_branch_conductor_answers_404_for(
    lakefs: LakeFS, conductor: Conductor, tmp_path: Path
) -> None:
    repo, intent, staging = leftover_branches(lakefs, tmp_path, str(uuid.uuid4()))
    report = collect(
        tmp_path / "scratch",
        lakefs,
        conductor,
        [repo],
        older_than=0,
        intent_older_than=0,
        conductor_retry_seconds=1,
    )
    assert report.intent_branches == [f"{repo}:{intent}"]
    assert report.staging_branches == [f"{repo}:{staging}"]
    assert report.unverifiable == [] and report.kept_live == []
    assert branches(lakefs, repo) == set()


def test_gc_cli_lists_unverifiable_branches(
    env: dict[str, str], lakefs: LakeFS, tmp_path: Path
) -> None:
    repo, intent, staging = leftover_branches(lakefs, tmp_path, str(uuid.uuid4()))
    with canned_conductor((503, b"{}")) as (url, _):
        result = cli(
            {**env, "PERAGO_CONDUCTOR__URL": url},
            "gc",
            "--repository",
            repo,
            "--older-than",
            "0",
            "--intent-older-than",
            "0",
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"kept (unverifiable) {repo}:{intent}: ") for line in lines)
    assert any(line.startswith(f"kept (unverifiable) {repo}:{staging}: ") for line in lines)
    assert lines[-1].endswith(
        "0 staging branch(es), 0 intent branch(es), 0 ledger entries; kept 0 live, 2 unverifiable"
    )
    assert branches(lakefs, repo) == {intent, staging}


# -- the Conductor version ---------------------------------------------------------------------------


def test_preflight_reads_the_running_conductor_version_and_passes(conductor: Conductor) -> None:
    assert preflight.read_server_config(conductor)["version"] == tools.CONDUCTOR_VERSION
    result = preflight.version_check(conductor, allow_unsupported=False)
    assert result.ok is True and not result.warning and result.mark == "ok"
    assert tools.CONDUCTOR_VERSION in result.detail


def _fake_conductor_routes(version: object) -> dict[str, tuple[int, bytes]]:
    config = {"version": version} if version is not None else {"some.property": "x"}
    return {
        "/api/admin/config": (200, json.dumps(config).encode()),
        "/api/metadata/taskdefs": (200, b"[]"),
    }


def _version_line(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if preflight.VERSION_CHECK in line]
    return line


def test_check_fails_on_an_unsupported_conductor_naming_version_and_range(
    env: dict[str, str],
) -> None:
    with canned_conductor((404, b"{}"), _fake_conductor_routes("3.15.0")) as (url, _):
        result = cli({**env, "PERAGO_CONDUCTOR__URL": url}, "check", APP)
        allowed = cli(
            {
                **env,
                "PERAGO_CONDUCTOR__URL": url,
                "PERAGO_CONDUCTOR__ALLOW_UNSUPPORTED_VERSION": "true",
            },
            "check",
            APP,
        )
    assert result.returncode == 1
    line = _version_line(result.stdout)
    assert line.startswith("FAIL") and "3.15.0" in line and ">= 3.32.0, < 3.33.0" in line
    line = _version_line(allowed.stdout)
    assert line.startswith("warn") and "3.15.0" in line and "allow_unsupported_version" in line


@pytest.mark.parametrize("version", [None, "unknown", 3], ids=["missing", "garbage", "not-text"])
def test_check_warns_when_the_conductor_version_cannot_be_read(
    env: dict[str, str], version: object
) -> None:
    with canned_conductor((404, b"{}"), _fake_conductor_routes(version)) as (url, _):
        result = cli({**env, "PERAGO_CONDUCTOR__URL": url}, "check", APP)
    line = _version_line(result.stdout)
    assert line.startswith("warn"), line
    assert ">= 3.32.0, < 3.33.0" in line


def test_check_warns_when_conductor_has_no_admin_config_endpoint(env: dict[str, str]) -> None:
    routes = {"/api/metadata/taskdefs": (200, b"[]")}
    with canned_conductor((404, b'{"status":404}'), routes) as (url, _):
        result = cli({**env, "PERAGO_CONDUCTOR__URL": url}, "check", APP)
    line = _version_line(result.stdout)
    assert line.startswith("warn") and "cannot read the server version" in line


def test_run_refuses_an_unsupported_conductor_unless_allowed(
    env: dict[str, str], tmp_path: Path
) -> None:
    base = {**env, "PERAGO_HTTP_PORT": "0", "PERAGO_SCRATCH_ROOT": str(tmp_path / "scratch")}
    with canned_conductor((404, b"{}"), _fake_conductor_routes("3.31.2")) as (url, _):
        refused = cli({**base, "PERAGO_CONDUCTOR__URL": url}, "run", APP)
        allowed = cli(
            {
                **base,
                "PERAGO_CONDUCTOR__URL": url,
                "PERAGO_CONDUCTOR__ALLOW_UNSUPPORTED_VERSION": "true",
            },
            "run",
            APP,
        )
    assert refused.returncode == 2
    assert "preflight failed: Conductor version supported: Conductor 3.31.2 is outside" in (
        refused.stderr
    )
    # Allowed, it warns and goes on: the next failure is the fake's missing task definitions.
    assert allowed.returncode == 2
    assert "preflight failed: task definitions present and compatible" in allowed.stderr
    warn = [ln for ln in allowed.stderr.splitlines() if preflight.VERSION_CHECK in ln]
    assert warn and "warn" in warn[0] and "3.31.2" in warn[0]
