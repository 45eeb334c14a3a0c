"""Which definitions are this app's: `register` records the app, the drift view counts only its own."""

from __future__ import annotations

from conductor.client.http.models.task_def import TaskDef
from pydantic import BaseModel

from perago_worker import TaskContext, Worker
from perago_worker.app import load_app
from perago_worker.register import coverage, owner_mark, owner_of, task_def_for


class P(BaseModel):
    pass


class R(BaseModel):
    ok: bool = True


def handler(ctx: TaskContext, params: P) -> R:
    return R()


def build(*names: str) -> Worker:
    app = Worker()
    for name in names:
        app.task(name)(handler)
    return app


# Loaded by path, as `perago-worker register/run MODULE:ATTRIBUTE` loads an app.
sales = build("clean")
sales_two = build("clean", "load")


def app_at(path: str | None, *names: str) -> Worker:
    """`names` registered in an app loaded from `path` (None: built in-process)."""
    if path is None:
        return build(*names)
    app = load_app(f"{__name__}:{path}")
    assert sorted(app.tasks) == sorted(names)
    return app


def defined(name: str, description: str) -> TaskDef:
    return TaskDef(name=name, description=description)


MOD = __name__


def test_register_names_the_app_in_the_mark_it_writes() -> None:
    spec = app_at("sales", "clean").tasks["clean"]
    assert task_def_for(spec).description.endswith(f"[perago-worker app={MOD}:sales]")
    assert owner_of(task_def_for(spec).description) == f"{MOD}:sales"
    assert owner_mark(None) == "[perago-worker]" and owner_of("x [perago-worker]") == ""
    assert owner_of("a definition someone wrote by hand") is None


def test_another_apps_definitions_are_not_no_handler_here() -> None:
    app = app_at("sales", "clean")
    defs = [
        defined("clean", f"x [perago-worker app={MOD}:sales]"),
        defined("old_sales", f"x [perago-worker app={MOD}:sales]"),
        defined("render", "x [perago-worker app=audio.handlers:app]"),
        defined("manual", "written by hand"),
    ]
    cov = coverage(app, defs)
    assert cov.unserved_definitions == ["old_sales"]
    assert cov.missing_definitions == []


def test_handlers_without_definitions_are_named() -> None:
    app = app_at("sales_two", "clean", "load")
    cov = coverage(app, [defined("clean", f"x [perago-worker app={MOD}:sales]")])
    assert cov.missing_definitions == ["load"]


def test_an_app_built_in_process_counts_the_marks_that_name_no_app() -> None:
    app = app_at(None, "clean")
    defs = [defined("gone", "x [perago-worker]"), defined("theirs", "x [perago-worker app=a:b]")]
    assert coverage(app, defs).unserved_definitions == ["gone"]
