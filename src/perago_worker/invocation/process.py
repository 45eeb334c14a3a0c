"""The process room: a handler in a child process, killed at its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel

from perago_worker.app import RegistrationError, TaskSpec, load_app, models_from_hints
from perago_worker.context import AttemptWorkspace, Cancelled, TaskContext, UnknownConfigKey
from perago_worker.contract import FailureKind, TaskFailure, TerminalError
from perago_worker.invocation.errors import DeadlineExceeded, HandlerDied, HandlerRaised
from perago_worker.invocation.policy import isolation_for
from perago_worker.observability import logging as plog

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

    from perago_worker.settings import Settings

# A cancellation other than the deadline gives a child process this long to stop by itself.
CANCEL_GRACE_SECONDS = 5.0
# How long a child that has answered may take to exit before its group is killed anyway.
EXIT_GRACE_SECONDS = 1.0
_POLL_SECONDS = 0.25  # how often a waiting attempt looks at its cancellation


@dataclass(frozen=True)
class HandlerRef:
    """How a child process finds the handler: by the app path, else by module and name."""

    task: str
    module: str
    qualname: str
    app_path: str | None = None

    @classmethod
    def of(cls, spec: TaskSpec) -> HandlerRef:
        return cls(spec.name, spec.fn.__module__, spec.fn.__qualname__, spec.app_path)


def check_isolable(spec: TaskSpec) -> None:
    """Refuse, before any task runs, a process-isolated handler a child could not import."""
    ref = HandlerRef.of(spec)
    if ref.app_path is None and ("<locals>" in ref.qualname or ref.module == "__main__"):
        raise RegistrationError(
            f"task {spec.name!r} ({ref.module}.{ref.qualname}) runs in a child process, which "
            "finds its handler by import path: define it at module level, or serve the app "
            "with `perago-worker run module:attribute`"
        )


def resolve(ref: HandlerRef) -> tuple[Callable[..., Any], type[BaseModel], type[BaseModel]]:
    """The handler and its params and result models, imported afresh (in the child)."""
    if ref.app_path is not None:
        spec = load_app(ref.app_path).tasks.get(ref.task)
        if spec is None:
            raise LookupError(f"{ref.app_path} registers no task {ref.task!r}")
        return spec.fn, spec.params_model, spec.result_model
    obj: Any = importlib.import_module(ref.module)
    for part in ref.qualname.split("."):
        obj = getattr(obj, part)
    params_model, result_model = models_from_hints(ref.task, obj)
    return obj, params_model, result_model


@dataclass(frozen=True)
class ConfigLookup:
    """`ctx.config` in a child: the values of `handler_config` and `handler_secrets`.

    Only these values cross into the child, never the worker's own settings; the message
    for an unknown key is the one `Settings.handler_value` gives.
    """

    values: dict[str, str]
    environment: str

    def __call__(self, key: str) -> str:
        if key in self.values:
            return self.values[key]
        raise UnknownConfigKey(
            f"configuration key {key!r} is not set for environment {self.environment!r} "
            f"(known keys: {', '.join(sorted(self.values)) or 'none'})"
        )


@dataclass(frozen=True)
class _Call:
    """Everything the child needs, and nothing more (pickled to it)."""

    ref: HandlerRef
    params: dict[str, Any]
    fields: dict[str, Any]  # the TaskContext's ids
    workspace: AttemptWorkspace | None
    config: ConfigLookup
    seconds_left: float | None
    log_level: str
    log_format: str
    log_bindings: dict[str, Any]
    secrets: list[str] = field(repr=False, default_factory=list)  # masked in the child's logs


_CONTEXT_FIELDS = (
    "task_id",
    "workflow_id",
    "task_type",
    "reference_name",
    "retry_count",
    "poll_count",
    "worker_id",
    "environment",
    "delivery_token",
)

_MP_LOCK = threading.Lock()
_MP: BaseContext | None = None
_PRELOAD: set[str] = {"perago_worker.invocation.process"}
_CHILDREN: dict[int, BaseProcess] = {}  # by id(): the handler processes running now


def prepare(specs: Iterable[TaskSpec], settings: Settings) -> None:
    """Check the process-isolated handlers and name their modules for the fork server.

    The fork server imports them once; every child is then a fork of it, with the handler's
    module already loaded. Must run before the first child starts (the runner calls it).
    """
    isolated = [spec for spec in specs if isolation_for(spec, settings) == "process"]
    for spec in isolated:
        check_isolable(spec)
        _PRELOAD.add(spec.fn.__module__)
        if spec.app_path:
            _PRELOAD.add(spec.app_path.partition(":")[0])
    if isolated and _mp().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()  # now, not on the first task (it takes ~0.2 s)


def _mp() -> BaseContext:
    global _MP
    with _MP_LOCK:
        if _MP is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(sorted(_PRELOAD))
                _MP = ctx
            else:
                _MP = multiprocessing.get_context("spawn")
        return _MP


def _exited(proc: BaseProcess, timeout: float = 0.0) -> bool:
    """Whether the child has ended (its sentinel; this never reaps it)."""
    return bool(multiprocessing.connection.wait([proc.sentinel], timeout))


def _kill(proc: BaseProcess) -> None:
    """SIGKILL the child's process group (the child and whatever it started), and the child
    itself while it runs: killed before its `setsid`, it has no group of its own yet."""
    pid = proc.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if not _exited(proc):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def stop_children() -> int:
    """Kill every handler process still running (the drain's last step); how many there were."""
    with _MP_LOCK:
        children = list(_CHILDREN.values())
    for proc in children:
        _kill(proc)
    return len(children)


def _call_for(spec: TaskSpec, ctx: TaskContext, params: BaseModel, settings: Settings) -> _Call:
    values = {**settings.handler_config}
    values.update({k: v.get_secret_value() for k, v in settings.handler_secrets.items()})
    bindings: dict[str, Any] = {}
    if ctx.log is not None:
        with contextlib.suppress(Exception):
            bindings = dict(structlog.get_context(ctx.log))
    return _Call(
        ref=HandlerRef.of(spec),
        params=params.model_dump(mode="json"),
        fields={name: getattr(ctx, name) for name in _CONTEXT_FIELDS},
        workspace=ctx.workspace if ctx.has_workspace else None,
        config=ConfigLookup(values, settings.environment),
        seconds_left=ctx.seconds_left(),
        log_level=settings.log_level,
        log_format=settings.log_format,
        log_bindings=bindings,
        secrets=plog.secret_values(settings),
    )


def run_in_process(spec: TaskSpec, ctx: TaskContext, params: BaseModel, settings: Settings) -> Any:
    call = _call_for(spec, ctx, params, settings)
    mp = _mp()
    ours, theirs = mp.Pipe(duplex=True)
    proc = mp.Process(  # type: ignore[attr-defined]
        target=_child_main, args=(theirs, call), name=f"handler-{ctx.task_id[:8]}"
    )
    try:
        proc.start()
    except Exception as exc:
        ours.close()
        theirs.close()
        raise TaskFailure(
            FailureKind.INFRASTRUCTURE, f"cannot start the handler's process: {exc}"
        ) from None
    theirs.close()
    with _MP_LOCK:
        _CHILDREN[id(proc)] = proc
    reply: tuple[Any, ...] | None = None
    try:
        reply = _await(proc, ours, ctx)
    finally:
        # Whatever the answer, nothing the handler started outlives it: a child that
        # answered may exit on its own (its output flushed), then its group is killed.
        if reply is not None:
            _exited(proc, EXIT_GRACE_SECONDS)
        _kill(proc)
        proc.join(5)
        ours.close()
        with _MP_LOCK:
            _CHILDREN.pop(id(proc), None)
    if reply is None:
        code = proc.exitcode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exited with status {code}"
        )
        raise HandlerDied(f"the handler's process {how} before it answered")
    return _unpack(reply)


def _await(proc: BaseProcess, conn: Connection, ctx: TaskContext) -> tuple[Any, ...] | None:
    """The child's reply; None when it died without one. Kills it at the deadline."""
    cancelled_at: float | None = None
    while True:
        now = time.monotonic()
        if ctx.deadline is not None and now >= ctx.deadline:
            ctx.expire("the attempt passed its deadline")
            _kill(proc)
            if ctx.timed_out:
                raise DeadlineExceeded("its process group was killed", abandoned=False)
            raise Cancelled(ctx.cancel_reason or "attempt cancelled")
        if ctx.cancelled:
            if cancelled_at is None:
                cancelled_at = now
                with contextlib.suppress(OSError):
                    conn.send(("cancel", ctx.cancel_reason))
            elif now - cancelled_at >= CANCEL_GRACE_SECONDS:
                _kill(proc)
                raise Cancelled(ctx.cancel_reason or "attempt cancelled")
        wait = _POLL_SECONDS
        if ctx.deadline is not None:
            wait = min(wait, max(0.0, ctx.deadline - now))
        ready = multiprocessing.connection.wait([conn, proc.sentinel], wait)
        if conn in ready or (ready and conn.poll()):
            try:
                reply: tuple[Any, ...] = conn.recv()
            except (EOFError, OSError):
                return None
            return reply
        if ready:  # only the sentinel: the child is gone without a word
            return None


def _unpack(reply: tuple[Any, ...]) -> Any:
    kind = reply[0]
    if kind == "returned":
        return reply[1]
    if kind == "terminal":
        raise TerminalError(reply[1])
    if kind == "cancelled":
        raise Cancelled(reply[1])
    if kind == "raised":
        raise HandlerRaised(reply[1], reply[2], reply[3])
    if kind == "unsendable":
        raise TaskFailure(
            FailureKind.INVALID_RESULT,
            f"the handler returned a value that cannot leave its process ({reply[1]}); "
            "return the result model",
        )
    if kind == "unresolvable":
        raise HandlerRaised(
            "ImportError", f"cannot load the handler in its process: {reply[1]}", ""
        )
    raise HandlerDied(f"the handler's process answered {kind!r}")


# -- the child ---------------------------------------------------------------------------------


def _child_main(conn: Connection, call: _Call) -> None:
    """The child process: run one handler, send one reply, exit."""
    with contextlib.suppress(OSError):
        os.setsid()  # a group of its own: killing it kills what the handler started
    # Metric files of short-lived children would pile up in the workers' multiprocess folder.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    plog.configure(call.log_level, call.log_format, call.secrets)
    try:
        fn, params_model, result_model = resolve(call.ref)
        params = params_model.model_validate(call.params)
    except BaseException as exc:
        conn.send(("unresolvable", f"{type(exc).__name__}: {exc}"))
        return
    ctx = TaskContext(
        **call.fields,
        _workspace=call.workspace,
        _config=call.config,
        log=plog.get_logger(**call.log_bindings),
        deadline=None if call.seconds_left is None else time.monotonic() + call.seconds_left,
    )
    threading.Thread(target=_listen, args=(conn, ctx), name="cancel", daemon=True).start()
    reply: tuple[Any, ...]
    try:
        returned = fn(ctx, params)
        if asyncio.iscoroutine(returned):
            returned = _run_here(returned, ctx)
    except TerminalError as exc:
        reply = ("terminal", str(exc))
    except Cancelled as exc:
        reply = ("cancelled", str(exc))
    except BaseException as exc:
        reply = ("raised", type(exc).__name__, str(exc), traceback.format_exc(limit=8))
    else:
        value = returned.model_dump(mode="json") if isinstance(returned, result_model) else returned
        reply = ("returned", value)
    try:
        conn.send(reply)
    except Exception as exc:  # not picklable: nothing was written yet
        conn.send(("unsendable", f"{type(reply[-1]).__name__}: {exc}"))


def _run_here(coro: Coroutine[Any, Any, Any], ctx: TaskContext) -> Any:
    """An async handler in its child: on a loop of the child's own, cancelled (its task)
    when the worker passes a cancellation down the pipe."""

    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None

        def cancel() -> None:
            loop.call_soon_threadsafe(task.cancel)

        ctx.on_cancel(cancel)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise Cancelled(ctx.cancel_reason or "attempt cancelled") from None


def _listen(conn: Connection, ctx: TaskContext) -> None:
    """Cancellation from the worker; the worker gone (EOF) stops the whole group."""
    try:
        while True:
            message = conn.recv()
            if message[0] == "cancel":
                ctx.cancel(message[1] or "attempt cancelled")
    except (EOFError, OSError):
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os._exit(1)
