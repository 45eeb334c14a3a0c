"""The task contract: input and output shapes, and how each failure maps to a Conductor status.

The workflow payload carries only the workspace identity that must travel between tasks
(repository, target branch, immutable ref); the prefix, credentials and staging branch never
enter it. The output `workspace` is exactly the next task's input `workspace`.

Unknown input keys are refused, with one exception: the keys Conductor itself writes into a
task's input when it schedules it (`CONDUCTOR_INJECTED_KEYS`) are dropped before validation,
so they never reach the handler and never fail a task.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPOSITORY_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"
BRANCH_PATTERN = r"^[A-Za-z0-9_][-A-Za-z0-9_]*$"  # lakeFS's Go \w is ASCII-only
# Conductor keeps the first 500 UTF-16 units of a reason (TaskResult and Task
# setReasonForIncompletion: StringUtils.substring(reason, 0, 500)); a longer one loses its tail.
MAX_REASON = 500

# Keys Conductor adds to a SIMPLE task's input at schedule time, never written by the workflow
# author. Read from conductor-oss (v3.32.1): ForkJoinDynamicTaskMapper.getDynamicTasksSimple
# puts `__index` (the fork's position, an int) into every task a FORK_JOIN_DYNAMIC spawns with
# `forkTaskName`/`forkTaskInputs` (since 3.16.0). No other mapper (SimpleTaskMapper,
# DynamicTaskMapper, the legacy dynamicForkTasksParam form) adds a key of its own; the retry,
# rerun and skip paths only copy inputs that a user supplied. Add a key here only when the
# Conductor source shows it being injected: everything else stays an error.
CONDUCTOR_INJECTED_KEYS: frozenset[str] = frozenset({"__index"})


class WorkspaceRef(BaseModel):
    """The flat `workspace` object: which repository, which target branch, which commit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repository: str = Field(pattern=REPOSITORY_PATTERN)
    branch: str = Field(pattern=BRANCH_PATTERN, max_length=256)
    ref_type: Literal["commit"]
    ref: str = Field(min_length=1, max_length=256)


class TaskInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workspace: WorkspaceRef | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class TaskOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workspace: WorkspaceRef | None = None
    result: dict[str, Any]

    def to_conductor(self) -> dict[str, Any]:
        """Workspace-free tasks output only `result`: there is no workspace to pass on."""
        return self.model_dump(mode="json", exclude_none=True)


class Status(enum.StrEnum):
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    FAILED_WITH_TERMINAL_ERROR = "FAILED_WITH_TERMINAL_ERROR"


class FailureKind(enum.StrEnum):
    """Why an attempt failed. The value is the stable label used in reasons and metrics."""

    INVALID_INPUT = "invalid_input"
    FORBIDDEN_REPOSITORY = "forbidden_repository"
    UNKNOWN_REF = "unknown_ref"
    BAD_PARAMS = "bad_params"
    UNSAFE_KEY = "unsafe_key"
    PRE_CHECK = "pre_check"
    HANDLER_ERROR = "handler_error"
    HANDLER_TERMINAL = "handler_terminal"
    INVALID_RESULT = "invalid_result"
    POST_CHECK = "post_check"
    UNPUBLISHABLE = "unpublishable"
    MERGE_CONFLICT = "merge_conflict"
    MERGE_REJECTED = "merge_rejected"
    INFRASTRUCTURE = "infrastructure"
    DISK_FULL = "disk_full"
    ABORTED = "aborted"
    TIMED_OUT = "timed_out"


# Terminal: retrying with the same immutable input cannot help. Retryable: a new attempt may
# succeed (the handler raised, the disk or a server hiccupped, the worker was draining).
_STATUS: dict[FailureKind, Status] = {
    FailureKind.INVALID_INPUT: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.FORBIDDEN_REPOSITORY: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.UNKNOWN_REF: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.BAD_PARAMS: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.UNSAFE_KEY: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.PRE_CHECK: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.HANDLER_ERROR: Status.FAILED,
    FailureKind.HANDLER_TERMINAL: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.INVALID_RESULT: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.POST_CHECK: Status.FAILED,
    FailureKind.UNPUBLISHABLE: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.MERGE_CONFLICT: Status.FAILED_WITH_TERMINAL_ERROR,
    # A lakeFS hook (a repository's policy) refused the merge: the same data is refused again.
    FailureKind.MERGE_REJECTED: Status.FAILED_WITH_TERMINAL_ERROR,
    FailureKind.INFRASTRUCTURE: Status.FAILED,
    FailureKind.DISK_FULL: Status.FAILED,
    FailureKind.ABORTED: Status.FAILED,
    # The attempt passed its deadline (`@app.task(timeout=...)`) before it began to publish:
    # nothing was published, and a new attempt may be faster (or the data smaller).
    FailureKind.TIMED_OUT: Status.FAILED,
}


def status_for(kind: FailureKind) -> Status:
    return _STATUS[kind]


class TerminalError(Exception):
    """Raise from a handler to fail the task without retries (bad data, not bad luck)."""


class TaskFailure(Exception):
    """An attempt's outcome other than success, carrying the kind and a bounded reason."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = bound_reason(f"{kind.value}: {reason}")

    @property
    def status(self) -> Status:
        return status_for(self.kind)


CUT = "…"
MIN_SHORTENED = 40  # a shortened value keeps at least this many characters


def bound_reason(text: str, limit: int = MAX_REASON) -> str:
    """`text` on one line in at most `limit` UTF-16 units, keeping its kind and its cause.

    A reason reads `kind: what ... why`: the kind first, the cause usually last, and what
    makes it long is a value in between (a key, a path, a server's message). So the longest
    words are shortened first, each to the same length, keeping its head and its tail around
    `…` (a path keeps where it starts and its file name); only a text of too many words is
    then cut in its middle, keeping its first and last halves. Length is counted as Java
    counts it (a character outside the BMP is two), since Conductor cuts what is longer.
    """
    text = " ".join(text.split())
    budget = limit
    while True:
        bounded = _bound(text, budget)
        excess = _utf16_units(bounded) - limit
        if excess <= 0:
            return bounded
        budget -= excess


def _utf16_units(text: str) -> int:
    return len(text) + sum(1 for c in text if ord(c) > 0xFFFF)


def _bound(text: str, limit: int) -> str:
    """`bound_reason` in code points."""
    if len(text) <= limit:
        return text
    words = text.split(" ")
    floor = min(MIN_SHORTENED, limit)

    def length(cap: int) -> int:
        return sum(min(len(w), cap) for w in words) + len(words) - 1

    if length(floor) <= limit:
        low, high = floor, max(len(w) for w in words)  # the longest cap that fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if length(mid) <= limit else (low, mid - 1)
        return " ".join(_shorten(w, low) for w in words)
    text = " ".join(_shorten(w, floor) for w in words)
    tail = (limit - 1) // 2
    return text[: limit - 1 - tail] + CUT + text[len(text) - tail :]


def _shorten(word: str, cap: int) -> str:
    """`word` in `cap` characters: its head and tail around `…` (as even as can be)."""
    if len(word) <= cap:
        return word
    tail = (cap - 1) // 2
    return word[: cap - 1 - tail] + CUT + word[len(word) - tail :]


def describe_validation_error(exc: ValidationError, where: str) -> str:
    """One line per problem, naming the field path: `params.rows: Input should be ...`."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in (where, *err["loc"]) if p != "")
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_input(raw: dict[str, Any], *, wants_workspace: bool) -> TaskInput:
    """Validate the Conductor task input against the contract (not yet against lakeFS).

    The keys of `CONDUCTOR_INJECTED_KEYS` are dropped first; any other unknown key fails.
    """
    if isinstance(raw, dict):
        raw = {k: v for k, v in raw.items() if k not in CONDUCTOR_INJECTED_KEYS}
    try:
        parsed = TaskInput.model_validate(raw)
    except ValidationError as exc:
        raise TaskFailure(FailureKind.INVALID_INPUT, describe_validation_error(exc, "")) from None
    if wants_workspace and parsed.workspace is None:
        raise TaskFailure(
            FailureKind.INVALID_INPUT,
            "workspace: required for a workspace task; map it in the workflow definition "
            '("workspace": "${workflow.input.workspace}", or a previous task\'s '
            '"${ref.output.workspace}") and start the workflow with one '
            "(perago-worker start, or the object perago-worker ref prints)",
        )
    if not wants_workspace and parsed.workspace is not None:
        raise TaskFailure(
            FailureKind.INVALID_INPUT,
            "workspace: this task is workspace-free and must not receive a workspace",
        )
    return parsed
