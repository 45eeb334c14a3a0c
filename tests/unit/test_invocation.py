"""Specification of `perago_worker.invocation`: how a handler runs, and how it is stopped.

The handlers are defined at module level and registered on `app`, so a child process can
import them by the app path (`load_app`) exactly as a worker's child does.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from perago_worker import invocation
from perago_worker.app import RegistrationError, TaskSpec, Worker, load_app
from perago_worker.context import AttemptWorkspace, Cancelled, TaskContext, UnknownConfigKey
from perago_worker.contract import FailureKind, TaskFailure, TerminalError
from perago_worker.settings import Settings

app = Worker()


class Script(BaseModel):
    do: str = "return"
    seconds: float = 0.0
    path: str = ""
    key: str = ""


class Answer(BaseModel):
    pid: int
    thread: int = 0
    value: str = ""


@app.task("scripted", isolation="process")
def scripted(ctx: TaskContext, params: Script) -> Answer:
    """Does what its params say; the tests read what it did from its answer or a file."""
    if params.path:
        Path(params.path).write_text(str(os.getpid()))
    if params.do == "sleep":  # ignores cancellation
        time.sleep(params.seconds)
    elif params.do == "cooperate":
        deadline = time.monotonic() + params.seconds
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            time.sleep(0.05)
    elif params.do == "raise":
        raise ValueError("bad value 42")
    elif params.do == "terminal":
        raise TerminalError("bad data, do not retry")
    elif params.do == "exit":
        os._exit(7)
    elif params.do == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    elif params.do == "config":
        return Answer(pid=os.getpid(), value=ctx.config(params.key))
    elif params.do == "context":
        ws = ctx.workspace
        value = f"{ctx.task_id}|{ctx.workflow_id}|{ctx.retry_count}|{ws.root}|{ws.input_ref}"
        return Answer(pid=os.getpid(), value=value)
    elif params.do == "seconds-left":
        return Answer(pid=os.getpid(), value=f"{ctx.seconds_left():.1f}")
    elif params.do == "grandchild":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        Path(params.path).write_text(str(child.pid))
    elif params.do == "unpicklable":
        return threading.Lock()  # type: ignore[return-value]
    return Answer(pid=os.getpid(), thread=threading.get_ident())


SPEC = load_app(f"{__name__}:app").tasks["scripted"]
THREAD_SPEC = dataclasses.replace(SPEC, isolation="thread")
SETTINGS = Settings(
    handler_config={"REGION": "eu-west-9"}, handler_secrets={"API_KEY": "s3cr3t-value"}
)


@pytest.fixture(autouse=True)
def _no_perago_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PERAGO_"):
            monkeypatch.delenv(name)


def ctx_for(deadline_in: float | None = None, **overrides: Any) -> TaskContext:
    values: dict[str, Any] = {
        "task_id": "task-0001",
        "workflow_id": "wf-1",
        "task_type": "scripted",
        "reference_name": "only",
        "retry_count": 2,
        "poll_count": 1,
        "worker_id": "w-1",
        "environment": "dev",
        "_config": SETTINGS.handler_value,
    }
    if deadline_in is not None:
        values["deadline"] = time.monotonic() + deadline_in
    values.update(overrides)
    return TaskContext(**values)


def run(spec: TaskSpec, ctx: TaskContext, **params: Any) -> Any:
    return invocation.run_handler(spec, ctx, Script(**params), SETTINGS)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# -- choosing ----------------------------------------------------------------------------------


def test_the_task_timeout_wins_over_the_settings_default() -> None:
    spec = dataclasses.replace(SPEC, timeout_seconds=7.0)
    assert invocation.timeout_for(spec, Settings(task_timeout_seconds=60)) == 7.0


def test_the_settings_default_applies_to_a_task_without_a_timeout() -> None:
    assert invocation.timeout_for(SPEC, Settings(task_timeout_seconds=60)) == 60.0


def test_without_any_timeout_the_deadline_is_the_definitions_timeout_seconds() -> None:
    assert invocation.timeout_for(SPEC, Settings()) == max(3600, 4 * SPEC.response_timeout_seconds)


def test_the_task_isolation_wins_over_the_settings_default() -> None:
    assert invocation.isolation_for(SPEC, Settings(task_isolation="thread")) == "process"
    plain = dataclasses.replace(SPEC, isolation=None)
    assert invocation.isolation_for(plain, Settings(task_isolation="process")) == "process"
    assert invocation.isolation_for(plain, Settings()) == "thread"


# -- thread ------------------------------------------------------------------------------------


def test_without_a_deadline_a_thread_handler_runs_on_the_calling_thread() -> None:
    answer = run(THREAD_SPEC, ctx_for())
    assert answer.thread == threading.get_ident()


def test_a_thread_handler_exception_reaches_the_caller_as_it_was_raised() -> None:
    with pytest.raises(ValueError, match="bad value 42"):
        run(THREAD_SPEC, ctx_for(deadline_in=30), do="raise")


def test_at_the_deadline_a_thread_handler_is_abandoned_and_the_attempt_expires() -> None:
    release = threading.Event()
    done = threading.Event()

    def stuck(ctx: TaskContext, params: Script) -> Answer:
        release.wait(30)  # ignores cancellation
        done.set()
        return Answer(pid=0)

    spec = dataclasses.replace(THREAD_SPEC, fn=stuck)
    ctx = ctx_for(deadline_in=0.3)
    before = invocation.abandoned_threads()
    started = time.monotonic()
    with pytest.raises(invocation.DeadlineExceeded) as info:
        run(spec, ctx)
    assert time.monotonic() - started < 1.5
    assert info.value.abandoned and "cannot be killed" in str(info.value)
    assert ctx.timed_out and ctx.cancelled
    assert invocation.abandoned_threads() == before + 1
    release.set()
    assert done.wait(5)
    deadline = time.monotonic() + 5
    while invocation.abandoned_threads() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert invocation.abandoned_threads() == before


def test_a_deadline_after_a_lost_lease_is_not_a_timeout() -> None:
    """The attempt was already cancelled (superseded): it stays a zombie, not `timed_out`."""
    ctx = ctx_for(deadline_in=0.3)
    ctx.cancel("lease lost")
    release = threading.Event()

    def stuck(ctx: TaskContext, params: Script) -> Answer:
        release.wait(30)
        return Answer(pid=0)

    spec = dataclasses.replace(THREAD_SPEC, fn=stuck)
    with pytest.raises(Cancelled, match="lease lost"):
        invocation.threads.run_in_thread(spec, ctx, Script())
    release.set()
    assert not ctx.timed_out


# -- process -----------------------------------------------------------------------------------


def test_a_process_handler_runs_in_another_process_and_returns_its_result_as_json() -> None:
    answer = run(SPEC, ctx_for())
    assert isinstance(answer, dict)
    assert answer["pid"] != os.getpid()
    assert Answer.model_validate(answer).pid == answer["pid"]


def test_a_process_handler_exception_comes_back_with_its_type_message_and_trace() -> None:
    with pytest.raises(invocation.HandlerRaised) as info:
        run(SPEC, ctx_for(), do="raise")
    assert invocation.describe(info.value) == "ValueError: bad value 42"
    assert 'raise ValueError("bad value 42")' in invocation.trace_of(info.value)


def test_a_terminal_error_in_a_child_stays_terminal() -> None:
    with pytest.raises(TerminalError, match="bad data, do not retry"):
        run(SPEC, ctx_for(), do="terminal")


@pytest.mark.parametrize(
    ("do", "says"),
    [("exit", "exited with status 7"), ("kill-self", "killed by SIGKILL")],
)
def test_a_child_that_dies_without_answering_fails_the_handler(do: str, says: str) -> None:
    with pytest.raises(invocation.HandlerDied, match=says):
        run(SPEC, ctx_for(), do=do)


def test_at_the_deadline_a_process_handler_that_ignores_cancellation_is_killed(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "pid"
    ctx = ctx_for(deadline_in=1.0)
    started = time.monotonic()
    with pytest.raises(invocation.DeadlineExceeded) as info:
        run(SPEC, ctx, do="sleep", seconds=60, path=str(pid_file))
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3.0
    assert not info.value.abandoned and ctx.timed_out
    assert not alive(int(pid_file.read_text()))


def test_a_cancelled_child_stops_at_its_next_check(tmp_path: Path) -> None:
    ctx = ctx_for()
    threading.Timer(0.5, ctx.cancel, args=("lease lost",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="lease lost"):
        run(SPEC, ctx, do="cooperate", seconds=30)
    assert time.monotonic() - started < invocation.CANCEL_GRACE_SECONDS


def test_a_cancelled_child_that_ignores_it_is_killed_after_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    ctx = ctx_for()
    threading.Timer(0.3, ctx.cancel, args=("worker draining",)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled, match="worker draining"):
        run(SPEC, ctx, do="sleep", seconds=60, path=str(pid_file))
    elapsed = time.monotonic() - started
    assert invocation.CANCEL_GRACE_SECONDS <= elapsed < invocation.CANCEL_GRACE_SECONDS + 3
    assert not alive(int(pid_file.read_text()))


def test_nothing_a_process_handler_started_outlives_its_answer(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    run(SPEC, ctx_for(), do="grandchild", path=str(pid_file))
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)


def test_a_child_sees_the_ids_the_workspace_root_and_the_deadline(tmp_path: Path) -> None:
    ws = AttemptWorkspace(tmp_path, "repo-x", "main", "c" * 64, "data/")
    answer = run(SPEC, ctx_for(deadline_in=30, _workspace=ws), do="context")
    assert answer["value"] == f"task-0001|wf-1|2|{tmp_path}|{'c' * 64}"
    left = float(run(SPEC, ctx_for(deadline_in=30), do="seconds-left")["value"])
    assert 25 < left <= 30


@pytest.mark.parametrize("key", ["REGION", "API_KEY"])
def test_a_child_reads_configuration_and_secrets_like_a_thread(key: str) -> None:
    in_thread = run(THREAD_SPEC, ctx_for(), do="config", key=key).value
    assert run(SPEC, ctx_for(), do="config", key=key)["value"] == in_thread


def test_an_unknown_configuration_key_reads_the_same_in_a_child() -> None:
    with pytest.raises(UnknownConfigKey) as in_thread:
        run(THREAD_SPEC, ctx_for(), do="config", key="NOPE")
    with pytest.raises(invocation.HandlerRaised) as in_child:
        run(SPEC, ctx_for(), do="config", key="NOPE")
    assert in_child.value.type_name == "UnknownConfigKey"
    assert in_child.value.message == str(in_thread.value)
    assert "s3cr3t" not in in_child.value.message


def test_a_result_that_cannot_leave_the_child_is_an_invalid_result() -> None:
    with pytest.raises(TaskFailure) as info:
        run(SPEC, ctx_for(), do="unpicklable")
    assert info.value.kind is FailureKind.INVALID_RESULT
    assert "cannot leave its process" in info.value.reason


def test_an_already_cancelled_attempt_starts_no_handler(tmp_path: Path) -> None:
    ctx = ctx_for()
    ctx.cancel("draining")
    pid_file = tmp_path / "pid"
    with pytest.raises(Cancelled):
        run(SPEC, ctx, path=str(pid_file))
    assert not pid_file.exists()


# -- what a child can import ---------------------------------------------------------------------


def test_a_process_handler_a_child_cannot_import_is_refused_before_any_task() -> None:
    local = Worker()

    @local.task("nested", isolation="process")
    def nested(ctx: TaskContext, params: Script) -> Answer:
        return Answer(pid=0)

    with pytest.raises(RegistrationError, match="define it at module level"):
        invocation.prepare(local.tasks.values(), Settings())


def test_a_nested_handler_is_importable_through_the_app_path() -> None:
    local = Worker()

    @local.task("nested", isolation="process")
    def nested(ctx: TaskContext, params: Script) -> Answer:
        return Answer(pid=0)

    spec = local.tasks["nested"]
    invocation.check_isolable(dataclasses.replace(spec, app_path="pkg.mod:app"))


def test_a_module_level_handler_resolves_by_module_and_name_without_an_app_path() -> None:
    ref = invocation.HandlerRef("scripted", __name__, "scripted")
    fn, params_model, result_model = invocation.resolve(ref)
    assert fn is scripted and params_model is Script and result_model is Answer


# -- what docs/handlers.md quotes from the code ------------------------------------------------

HANDLERS_DOC = (Path(__file__).parents[2] / "docs" / "handlers.md").read_text()
SECTION = HANDLERS_DOC[HANDLERS_DOC.index("## Deadlines and isolation") :]


def test_the_handlers_doc_quotes_the_default_deadline() -> None:
    from perago_worker.app import conductor_timeout_seconds

    assert "max(3600, 4 \u00d7 `response_timeout_seconds`)" in SECTION
    assert [conductor_timeout_seconds(t) for t in (1, 900, 901)] == [3600, 3600, 3604]
    configuration = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert "max(3600, 4 \u00d7 `response_timeout_seconds`)" in configuration


def test_the_handlers_doc_quotes_the_cancel_and_exit_graces() -> None:
    assert "which gets 5 s to stop before it is killed" in SECTION
    assert invocation.CANCEL_GRACE_SECONDS == 5.0
    assert "may exit on its own for 1 s, then its group is" in SECTION
    assert invocation.EXIT_GRACE_SECONDS == 1.0


@pytest.mark.parametrize("spec", [THREAD_SPEC, SPEC], ids=["thread", "process"])
def test_a_handler_whose_deadline_passed_before_it_started_is_not_started(
    spec: TaskSpec, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    ctx = ctx_for(deadline_in=-1)
    with pytest.raises(Cancelled, match="deadline"):
        run(spec, ctx, path=str(pid_file))
    assert ctx.timed_out and not pid_file.exists()
