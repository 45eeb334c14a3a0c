"""`perago_worker.testing`: a handler's unit test runs it as a worker would, with no servers.

What the environment reports is what a worker would have reported: the status, the result,
the failure kind and reason, and the change set a publish would upload and delete.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from perago_worker import TaskContext, TerminalError, Worker, WorkspaceSpec
from perago_worker.checks import forbid_glob, require_file
from perago_worker.contract import Status
from perago_worker.testing import FileChange, HandlerEnvironment

app = Worker()


class Edit(BaseModel):
    do: str = "copy"
    seconds: float = 0.0


class Edited(BaseModel):
    files: int


@app.task(
    "edit",
    workspace=WorkspaceSpec(prefix="/data"),
    pre=[require_file("in/a.txt")],
    post=[forbid_glob("**/*.tmp")],
)
def edit(ctx: TaskContext, params: Edit) -> Edited:
    root = ctx.workspace.root
    if params.do == "copy":
        (root / "out").mkdir()
        (root / "out" / "a.txt").write_bytes((root / "in" / "a.txt").read_bytes().upper())
    elif params.do == "rewrite-same":
        data = (root / "in" / "a.txt").read_bytes()
        (root / "in" / "a.txt").write_bytes(data)
    elif params.do == "edit-and-delete":
        (root / "in" / "a.txt").write_text("changed")
        (root / "in" / "b.txt").unlink()
    elif params.do == "leave-tmp":
        (root / "x.tmp").write_text("scratch")
    elif params.do == "link":
        os.symlink("/etc/passwd", root / "passwd")
    elif params.do == "raise":
        raise RuntimeError("cannot parse row 7")
    elif params.do == "terminal":
        raise TerminalError("bad input file")
    elif params.do == "bad-result":
        return {"files": "many"}  # type: ignore[return-value]
    elif params.do == "hang":
        deadline = time.monotonic() + params.seconds
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            time.sleep(0.02)
    elif params.do == "config":
        (root / "region.txt").write_text(ctx.config("REGION") + ctx.config("TOKEN"))
    return Edited(files=len(list(root.rglob("*"))))


class Greeting(BaseModel):
    name: str


class Greeted(BaseModel):
    text: str


@app.task("greet")
async def greet(ctx: TaskContext, params: Greeting) -> Greeted:
    await asyncio.sleep(0)
    return Greeted(text=f"hello {params.name}")


ENV = HandlerEnvironment(app, config={"REGION": "eu-1"}, secrets={"TOKEN": "t0k"})
INPUT = {"in/a.txt": "abc", "in/b.txt": b"bee"}


def test_a_completed_run_reports_the_result_and_the_files_a_publish_would_add() -> None:
    run = ENV.run("edit", {"do": "copy"}, files=INPUT, keep=True)
    assert run.status == Status.COMPLETED and run.ok
    assert run.result == {"files": 5}
    assert (run.added, run.modified, run.deleted) == (["out/a.txt"], [], [])
    assert run.uploads == [FileChange("out/a.txt", 3)]
    assert run.read("out/a.txt") == b"ABC"


def test_a_rewrite_with_the_same_bytes_is_no_change() -> None:
    run = ENV.run("edit", {"do": "rewrite-same"}, files=INPUT)
    assert run.ok and run.changes is not None and run.changes.empty


def test_edits_and_deletions_are_in_the_change_set() -> None:
    run = ENV.run("edit", {"do": "edit-and-delete"}, files=INPUT)
    assert (run.added, run.modified, run.deleted) == ([], ["in/a.txt"], ["in/b.txt"])


def test_a_folder_is_copied_not_used_in_place(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("abc")
    run = ENV.run("edit", {"do": "edit-and-delete"}, files={"in/b.txt": "x"}, folder=tmp_path)
    assert run.modified == ["in/a.txt"]
    assert (tmp_path / "in" / "a.txt").read_text() == "abc"


@pytest.mark.parametrize(
    ("params", "files", "status", "reason"),
    [
        ({"do": 3}, INPUT, Status.FAILED_WITH_TERMINAL_ERROR, "bad_params: params.do"),
        ({}, {"other.txt": "x"}, Status.FAILED_WITH_TERMINAL_ERROR, "pre_check: input workspace"),
        ({"do": "leave-tmp"}, INPUT, Status.FAILED, "post_check: output workspace failed"),
        ({"do": "link"}, INPUT, Status.FAILED_WITH_TERMINAL_ERROR, "unpublishable: passwd"),
        ({"do": "raise"}, INPUT, Status.FAILED, "handler_error: RuntimeError: cannot parse"),
        ({"do": "terminal"}, INPUT, Status.FAILED_WITH_TERMINAL_ERROR, "handler_terminal: bad"),
        ({"do": "bad-result"}, INPUT, Status.FAILED_WITH_TERMINAL_ERROR, "invalid_result"),
        ({}, {"../up.txt": "x"}, Status.FAILED_WITH_TERMINAL_ERROR, "unsafe_key"),
    ],
)
def test_each_failure_maps_to_what_the_worker_would_report(
    params: dict[str, object], files: dict[str, str], status: Status, reason: str
) -> None:
    run = ENV.run("edit", params, files=files)
    assert (run.status, run.result) == (status, None)
    assert run.reason.startswith(reason), run.reason
    assert run.kind == reason.split(":")[0]


def test_the_deadline_times_the_run_out_and_a_cancellation_aborts_it() -> None:
    late = ENV.run("edit", {"do": "hang", "seconds": 30}, files=INPUT, timeout=0.3)
    assert (late.status, late.kind) == (Status.FAILED, "timed_out")
    gone = ENV.run("edit", {"do": "hang", "seconds": 30}, files=INPUT, cancel_after=0.3)
    assert (gone.status, gone.kind) == (Status.FAILED, "aborted")


def test_config_and_secrets_reach_the_handler() -> None:
    run = ENV.run("edit", {"do": "config"}, files=INPUT, keep=True)
    assert run.read("region.txt") == b"eu-1t0k"


def test_an_async_workspace_free_handler_runs_on_the_loop() -> None:
    run = ENV.run("greet", {"name": "ada"})
    assert run.ok and run.result == {"text": "hello ada"} and run.changes is None
    with pytest.raises(ValueError, match="workspace-free"):
        ENV.run("greet", {"name": "ada"}, files=INPUT)


def test_an_unknown_task_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="registered: edit, greet"):
        ENV.run("nope")


def test_a_workspace_is_removed_unless_kept(tmp_path: Path) -> None:
    env = HandlerEnvironment(app, scratch=tmp_path)
    env.run("edit", {"do": "copy"}, files=INPUT)
    assert list(tmp_path.iterdir()) == []
    kept = env.run("edit", {"do": "copy"}, files=INPUT, keep=True)
    assert kept.root is not None and kept.root.parent == tmp_path
