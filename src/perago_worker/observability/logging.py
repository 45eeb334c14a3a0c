"""structlog set-up: JSON lines in production, readable console output in development.

Every line of an attempt carries workflow id, task id, task type, attempt and worker id
(bound on the attempt's logger). A last processor masks any configured secret value that
found its way into an event, whatever field it hides in; `mask_text` is that masking, and
the runner applies it to every reason it sends to Conductor as well.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from perago_worker.settings import Settings

MASK = "**********"
CUT = "…"  # the mark `contract.bound_reason` leaves where it shortened a text
MIN_SECRET = 4  # shorter values are not masked (they would mask ordinary words)
_SECRETS: list[str] = []


def _prepared(secrets: Iterable[str]) -> list[str]:
    """Distinct secrets of at least MIN_SECRET characters, longest first, each also in the
    whitespace-collapsed spelling a bounded reason carries (a PEM key has newlines)."""
    values = {s for s in secrets if s and len(s) >= MIN_SECRET}
    values |= {c for c in (" ".join(s.split()) for s in values) if len(c) >= MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def add_secret(secret: str) -> None:
    """Mask `secret` from now on too (a credential re-read from a rotated Secret file)."""
    _SECRETS[:] = _prepared([*_SECRETS, secret])


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every configured secret, and each of `secrets`, replaced by `MASK`.

    The one masking function: the log processor and the reasons sent to Conductor both use
    it. A secret that a shortened text cut at `CUT` leaves pieces of itself just before and
    just after the mark; those are masked too (from MIN_SECRET characters).
    """
    extra = _prepared(secrets)
    values = sorted({*extra, *_SECRETS}, key=len, reverse=True) if extra else _SECRETS
    for secret in values:
        if secret in text:
            text = text.replace(secret, MASK)
    if values and CUT in text:
        pieces = text.split(CUT)
        for i, piece in enumerate(pieces):
            for secret in values:
                if i < len(pieces) - 1:  # followed by a cut: part of a secret may end it
                    piece = _mask_edge(piece, secret, head=True)
                if i > 0:  # after a cut: part of a secret may start it
                    piece = _mask_edge(piece, secret, head=False)
            pieces[i] = piece
        text = CUT.join(pieces)
    return text


def _mask_edge(piece: str, secret: str, *, head: bool) -> str:
    """Mask the longest run of `secret` (MIN_SECRET or more) at the cut end of `piece`.

    Any run, not only the secret's own head or tail: between two cuts (a shortened word,
    then the text's middle) a piece can hold a secret's middle.
    """
    for n in range(min(len(secret) - 1, len(piece)), MIN_SECRET - 1, -1):
        edge = piece[len(piece) - n :] if head else piece[:n]
        if edge in secret:
            return piece[: len(piece) - n] + MASK if head else MASK + piece[n:]
    return piece


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def mask_secrets(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {k: _mask(v) for k, v in event.items()} if _SECRETS else event


def secret_values(settings: Settings) -> list[str]:
    """Every secret a deployment configures: lakeFS's, Conductor's and the handlers'."""
    values = [settings.lakefs.secret_access_key.get_secret_value()]
    if settings.conductor.auth_secret is not None:
        values.append(settings.conductor.auth_secret.get_secret_value())
    # Secrets read from files (Kubernetes Secret volumes): what the files hold now.
    from perago_worker.credentials import file_secret

    values += [
        file_secret(settings.lakefs.secret_access_key_file),
        file_secret(settings.conductor.auth_secret_file),
    ]
    values += [s.get_secret_value() for s in settings.handler_secrets.values()]
    values += [s.get_secret_value() for s in settings.tracing.headers.values()]
    return [value for value in values if value]  # an unset secret masks nothing


def configure(level: str = "INFO", fmt: str = "console", secrets: Iterable[str] = ()) -> None:
    _SECRETS[:] = _prepared(secrets)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bindings: Any) -> Any:
    return structlog.get_logger("perago").bind(**bindings)
