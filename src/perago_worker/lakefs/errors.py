"""What lakeFS (and the object store under it) answered, as exceptions callers can act on.

4xx answers become the errors below; transient faults (connection errors, timeouts, 5xx,
429) are what `is_transient` says to retry. An error's text never carries a presigned URL:
those are credentials (see `perago_worker.lakefs.presigned`).
"""

from __future__ import annotations

import http
import http.client
import json
import ssl
from typing import Any

import urllib3
from lakefs_sdk.exceptions import ApiException
from tenacity import Retrying

from perago_worker import retries


class LakeFSError(Exception):
    source = "lakeFS"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{self.source} {status}: {message}")
        self.status = status
        self.message = message


class NotFound(LakeFSError):
    pass


class Conflict(LakeFSError):
    pass


class HookRejected(LakeFSError):
    """A lakeFS action hook (pre-merge, pre-commit, ...) failed: lakeFS answers 412.

    Not a conflict: the data may merge cleanly, a policy the repository runs refused it.
    """


class PreconditionFailed(LakeFSError):
    """A conditional write found the object changed (or present) meanwhile: lakeFS 412."""


class NoChanges(LakeFSError):
    """A commit or merge found nothing to do (lakeFS answers 400)."""


class Unauthorized(LakeFSError):
    pass


class StoreError(LakeFSError):
    """The object store, reached through a presigned URL, answered what a transfer cannot use.

    A 5xx or 429 is transient (retried like lakeFS); a size or checksum that differs from
    what was sent or listed is not: the attempt fails and nothing it staged is published.
    """

    source = "object store"


class ContentMismatch(StoreError):
    """The store stored or served other bytes than were sent or listed (size, ETag).

    Never retried: the same request would meet the same store, and the attempt must fail
    with nothing published rather than spend its retry budget.
    """

    def __init__(self, message: str) -> None:
        super().__init__(502, message)


class DataPathUnavailable(LakeFSError):
    """`lakefs.data_path: presign` on a server whose storage cannot presign."""


class SourceChanged(OSError):
    """The file being uploaded ended before the size its caller checked: nothing was stored."""


# What lakeFS means by a status whose answer carries no message: a merge conflict answers
# 409 with `{"reference":""}` (a merge result, not an error).
_NO_MESSAGE = {409: "conflict found"}


def message_of(body: Any, status: int = 0) -> str:
    """The readable part of a lakeFS answer: its error's `message`, never raw JSON.

    An answer that is JSON without a message (a 409 merge answer) reads as what the status
    means; a body that is not JSON (a proxy's page) is kept, shortened, on one line.
    """
    if isinstance(body, bytes | bytearray):
        body = body.decode(errors="replace")
    if body is None:
        body = ""
    if not isinstance(body, str):
        return str(body)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str) and data["message"]:
        return " ".join(data["message"].split())
    text = " ".join(body.split())
    if data is not None or not text:
        try:
            phrase = http.HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = f"status {status}"
        return _NO_MESSAGE.get(status, phrase)
    return text if len(text) <= 300 else text[:299] + "…"


def translate(status: int, body: Any) -> LakeFSError:
    message = message_of(body, status)
    if status == 404:
        return NotFound(status, message)
    if status == 409:
        return Conflict(status, message)
    if status == 412:
        return HookRejected(status, message)
    if status in (401, 403):
        return Unauthorized(status, message)
    if status == 400 and "no changes" in message.lower():
        return NoChanges(status, message)
    return LakeFSError(status, message)


def certificate_refused(exc: BaseException) -> bool:
    """A server certificate this worker does not trust (however a library wraps it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        reason = getattr(current, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        current = nxt or current.__cause__ or current.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    if certificate_refused(exc):
        return False  # retrying cannot make the certificate trusted
    if isinstance(exc, ContentMismatch):
        return False
    # A connection that ends mid-body (`IncompleteRead`) or answers garbage is the network's
    # fault, as a reset is.
    if isinstance(
        exc,
        urllib3.exceptions.HTTPError | ConnectionError | TimeoutError | http.client.HTTPException,
    ):
        return True
    if isinstance(exc, ApiException):
        return exc.status is None or exc.status == 429 or exc.status >= 500
    if isinstance(exc, LakeFSError):
        return exc.status == 429 or exc.status >= 500
    return False


def retrying(max_seconds: float = 60.0, server: str = "lakefs") -> Retrying:
    return retries.policy(server, is_transient, max_seconds=max_seconds, max_attempts=12)
