"""perago-worker: Conductor tasks in private per-attempt copies of lakeFS prefixes.

from perago_worker import Worker, WorkspaceSpec, TaskContext, TerminalError
from perago_worker.checks import require_file, require_dir, require_glob, forbid_glob
"""

from perago_worker._version import __version__
from perago_worker.app import RegistrationError, TaskSpec, Worker, WorkspaceSpec
from perago_worker.context import Cancelled, NoWorkspaceError, TaskContext
from perago_worker.contract import TerminalError

__all__ = [
    "Cancelled",
    "NoWorkspaceError",
    "RegistrationError",
    "TaskContext",
    "TaskSpec",
    "TerminalError",
    "Worker",
    "WorkspaceSpec",
    "__version__",
]
