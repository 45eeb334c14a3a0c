"""What running a handler can end in, besides its own return value or exception."""

from __future__ import annotations


class DeadlineExceeded(Exception):
    """The attempt's deadline passed while its handler ran; the handler was stopped."""

    def __init__(self, message: str, *, abandoned: bool) -> None:
        super().__init__(message)
        self.abandoned = abandoned  # a thread still running (thread mode), not killed


class HandlerRaised(Exception):
    """What a handler in a child process raised: its type's name, message and traceback."""

    def __init__(self, type_name: str, message: str, trace: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.trace = trace


class HandlerDied(Exception):
    """The child process ended without an answer: a crash, a signal, `os._exit`, OOM."""
