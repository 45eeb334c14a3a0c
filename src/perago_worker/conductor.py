"""A thin adapter over conductor-python's API client, with the worker's retry policy.

The SDK's bundled runner (`TaskHandler`) is not used: it installs no SIGTERM handler, kills
in-flight tasks on stop, polls with a fixed 100 ms timeout and reports through
`update-v2`, which hands out a next task that would be lost during a drain. The API client
and models are used as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from conductor.client.configuration.configuration import Configuration
from conductor.client.configuration.settings.authentication_settings import (
    AuthenticationSettings,
)
from conductor.client.http.api.metadata_resource_api import MetadataResourceApi
from conductor.client.http.api.task_resource_api import TaskResourceApi
from conductor.client.http.api.workflow_resource_api import WorkflowResourceApi
from conductor.client.http.api_client import ApiClient
from conductor.client.http.models.start_workflow_request import StartWorkflowRequest
from conductor.client.http.models.task import Task
from conductor.client.http.models.task_def import TaskDef
from conductor.client.http.models.task_result import TaskResult
from conductor.client.http.rest import ApiException
from tenacity import Retrying

from perago_worker import retries
from perago_worker.credentials import Credentials
from perago_worker.network import Network, certificate_message, is_certificate_failure

T = TypeVar("T")
TERMINAL_TASK_STATES = frozenset(
    {
        "COMPLETED",
        "COMPLETED_WITH_ERRORS",
        "FAILED",
        "FAILED_WITH_TERMINAL_ERROR",
        "CANCELED",
        "TIMED_OUT",
        "SKIPPED",
    }
)


class ConductorError(Exception):
    """A Conductor call that failed: the HTTP status (0: no HTTP answer) and why, in words.

    With an answer it reads `Conductor 503: <the server's message>`; without one, it says
    where and how the connection failed: `cannot connect to http://host:8080/api:
    connection refused`, `no answer from http://host:8080/api within 10 s`.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Conductor {status}: {message}" if status else message)
        self.status = status
        self.message = message


_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")


def _lowered(text: str) -> str:
    text = _ERRNO.sub("", text.strip())
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def describe_failure(exc: ApiException, url: str, timeout: object = None) -> ConductorError:
    """The SDK's exception as a `ConductorError` whose message names the cause.

    The SDK reports a failure without an HTTP answer as status 0 with no message and the
    cause in `reason` (`Connection error: [Errno 111] Connection refused`, `Request
    timeout: ...`); an HTTP error carries the server's message, or at least its reason.
    """
    status = int(exc.status or 0)
    reason = str(getattr(exc, "reason", "") or "").strip()
    message = getattr(exc, "message", None)
    if status == 0 and is_certificate_failure(reason):
        return ConductorError(0, certificate_message(url, reason))
    if status == 0:
        kind, _, detail = reason.partition(":")
        detail = _lowered(detail) if detail else ""
        if kind == "Connection error":
            text = f"cannot connect to {url}: {detail or 'connection failed'}"
        elif kind == "Request timeout":
            within = f" within {timeout:g} s" if isinstance(timeout, int | float) else ""
            text = f"no answer from {url}{within} (request timed out)"
        elif kind.startswith("Protocol error"):
            text = f"the connection to {url} broke: {detail or reason}"
        else:
            text = f"no answer from {url}: {reason or type(exc).__name__}"
        return ConductorError(0, text)
    if not message:
        body = getattr(exc, "body", None)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(body).get("message") if body else None
    return ConductorError(status, str(message or reason or f"HTTP {status}"))


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ApiException):
        status = exc.status or 0
        if status == 0 and is_certificate_failure(str(getattr(exc, "reason", ""))):
            return False  # a certificate the worker does not trust: retrying cannot help
        return bool(exc.transient) or status == 0 or status == 429 or status >= 500
    return False


def retrying(max_seconds: float) -> Retrying:
    return retries.policy("conductor", is_transient, max_seconds=max_seconds, max_attempts=50)


@dataclass(frozen=True)
class TaskState:
    """What `GET /api/tasks/{id}` says about a task: the truth the fences rely on.

    The last four fields are the task's *incarnation* (see `fences.Incarnation`): together
    with `retried_task_id` they say which logical execution a delivery belongs to.
    """

    task_id: str
    status: str
    worker_id: str | None
    poll_count: int
    retry_count: int = 0
    scheduled_time: int = 0
    start_time: int = 0
    retried_task_id: str = ""
    workflow_id: str = ""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_TASK_STATES


class _KeyAndSecret(AuthenticationSettings):  # type: ignore[misc]
    """The SDK's key id and secret, read from `Credentials` each time it asks for a token:
    a rotated secret file is what the next token request sends."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    @property
    def key_id(self) -> str:
        return self._credentials.key

    @property
    def key_secret(self) -> str:
        return self._credentials.secret


def http_client(network: Network, url: str, *, timeout: float) -> httpx.Client:
    """The httpx client conductor-python sends through, with the worker's TLS context and
    proxy (the SDK's own sets a transport, which makes httpx ignore the proxy variables,
    and trusts certifi only). Pool limits and HTTP/2 as the SDK has them.

    `timeout` (`conductor.request_timeout_seconds`) is the client's default, where the
    SDK's is 120 s: it bounds every request sent without a `_request_timeout` of its own.
    The SDK sends its token requests (`POST /token`: at start, when the token's TTL is
    over, inside whichever call noticed it, and after an expired or invalid token) that
    way, from private methods the worker cannot pass an argument to; a default on the one
    client every request goes through bounds them all, including ones a later SDK adds."""
    proxy = network.proxy_for(url)
    http2 = os.getenv("CONDUCTOR_HTTP2_ENABLED", "true").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )
    transport = httpx.HTTPTransport(
        verify=network.new_ssl_context(),
        http2=http2,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=50, keepalive_expiry=30),
        proxy=httpx.Proxy(proxy.url, headers=proxy.headers) if proxy is not None else None,
        retries=3,
    )
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(timeout),
        follow_redirects=True,
        trust_env=False,
    )


class Conductor:
    def __init__(
        self,
        url: str,
        *,
        auth_key: str | None = None,
        auth_secret: str | None = None,
        retry_seconds: float = 30.0,
        request_timeout: float = 10.0,
        network: Network | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if credentials is None and auth_key and auth_secret:
            credentials = Credentials(auth_key, auth_secret)
        self.credentials = credentials
        auth = _KeyAndSecret(credentials) if credentials is not None else None
        config = Configuration(server_api_url=url.rstrip("/"), authentication_settings=auth)
        self.url = url.rstrip("/")
        self.network = network if network is not None else Network()
        # Every request is bounded: the SDK's own default is 120 s, and a fence read that
        # hangs is a window in which a superseded attempt could still act. `call` passes it
        # to each request; the client's default (`http_client`) bounds the SDK's own token
        # requests, the first of which `ApiClient(config)` sends.
        self.request_timeout = request_timeout
        # The client is the SDK's only HTTP; it builds a fresh one after a broken connection,
        # which must carry the same TLS, proxy and timeout.
        config.http_connection = http_client(self.network, self.url, timeout=request_timeout)
        self._client = ApiClient(config)
        self._client.rest_client._create_default_httpx_client = lambda: http_client(
            self.network, self.url, timeout=self.request_timeout
        )
        self.tasks = TaskResourceApi(self._client)
        self.metadata = MetadataResourceApi(self._client)
        self.workflows = WorkflowResourceApi(self._client)
        # Each call's retry budget unless it names its own (the preflight lowers it).
        self.retry_seconds = retry_seconds

    def call(
        self, fn: Callable[..., T], *args: Any, retry_seconds: float | None = None, **kwargs: Any
    ) -> T:
        kwargs.setdefault("_request_timeout", self.request_timeout)
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        try:
            try:
                return self._retried(fn, args, kwargs, budget)
            except ApiException as exc:
                if not self._reauthenticated(exc):
                    raise
                return self._retried(fn, args, kwargs, budget)
        except ApiException as exc:
            timeout = kwargs.get("_request_timeout")
            raise describe_failure(exc, self.url, timeout) from None

    @staticmethod
    def _retried(
        fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], budget: float
    ) -> T:
        for attempt in retrying(budget):
            with attempt:
                return fn(*args, **kwargs)
        raise AssertionError("unreachable")

    def _reauthenticated(self, exc: ApiException) -> bool:
        """After a 401 the SDK did not act on (it renews a token only when the answer says
        EXPIRED_TOKEN or INVALID_TOKEN): a new token, from the current key and secret."""
        if exc.status != 401 or self.credentials is None:
            return False
        if getattr(exc, "token_expired", False) or getattr(exc, "invalid_token", False):
            return False
        return bool(self._client.force_refresh_auth_token())

    # -- the worker's calls --------------------------------------------------------------

    def batch_poll(
        self, task_type: str, worker_id: str, domain: str | None, count: int, timeout_ms: int
    ) -> list[Task]:
        """One long poll (no retry here: the poll loop owns the backoff)."""
        kwargs: dict[str, Any] = {
            "workerid": worker_id,
            "count": count,
            "timeout": timeout_ms,
            # The long poll itself may take `timeout_ms`; past that plus the request timeout
            # the server is not answering.
            "_request_timeout": timeout_ms / 1000 + self.request_timeout,
        }
        if domain:
            kwargs["domain"] = domain
        try:
            try:
                return list(self.tasks.batch_poll(task_type, **kwargs) or [])
            except ApiException as exc:
                if not self._reauthenticated(exc):
                    raise
                return list(self.tasks.batch_poll(task_type, **kwargs) or [])
        except ApiException as exc:
            raise describe_failure(exc, self.url, kwargs["_request_timeout"]) from None

    def update(self, result: TaskResult, *, retry_seconds: float | None = None) -> None:
        """`POST /api/tasks` (never update-v2, which would hand out a next task)."""
        self.call(self.tasks.update_task, result, retry_seconds=retry_seconds)

    def extend_lease(self, task: Task) -> None:
        result = TaskResult(
            workflow_instance_id=task.workflow_instance_id,
            task_id=task.task_id,
            status="IN_PROGRESS",
            extend_lease=True,
        )
        self.call(self.tasks.update_task, result, retry_seconds=5)

    def queue_sizes(
        self, task_types: Iterable[str], domain: str | None, *, retry_seconds: float = 5
    ) -> dict[str, int]:
        """How many tasks of each type wait in Conductor's queue to be polled, in `domain`.

        One request for all of them: `GET /tasks/queue/sizes?taskType=...` (repeated), whose
        values are queue names (`domain:taskType` in a domain); the server counts each
        queue's messages, and a polled task leaves its queue, so tasks in progress are not
        counted. A task type the answer leaves out is left out here too.
        """
        queues = {(f"{domain}:{name}" if domain else name): name for name in task_types}
        if not queues:
            return {}
        answer = self.call(self.tasks.size, task_type=list(queues), retry_seconds=retry_seconds)
        return {queues[q]: int(n) for q, n in dict(answer or {}).items() if q in queues}

    def task_state(self, task_id: str, *, retry_seconds: float = 5) -> TaskState | None:
        """`GET /api/tasks/{id}`: the attempt fence's read, once or more per task.

        Through the SDK's `ApiClient` (its auth header, TLS, proxy and errors) but not its
        generated `get_task`, whose argument validation and `Task` model cost most of the
        call's CPU in the worker (measured, docs/performance.md): the answer is decoded as
        plain JSON and only the fields the fences read are kept.
        """
        try:
            task = self.call(
                self._client.call_api,
                "/tasks/{taskId}",
                "GET",
                path_params={"taskId": task_id},
                header_params={"Accept": "application/json"},
                response_type="object",
                _return_http_data_only=True,
                retry_seconds=retry_seconds,
            )
        except ConductorError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(task, dict) or not task:
            return None  # Conductor answers an unknown task id with an empty body
        return TaskState(
            task_id=str(task.get("taskId") or task_id),
            status=str(task.get("status")),
            worker_id=task.get("workerId"),
            poll_count=int(task.get("pollCount") or 0),
            retry_count=int(task.get("retryCount") or 0),
            scheduled_time=int(task.get("scheduledTime") or 0),
            start_time=int(task.get("startTime") or 0),
            retried_task_id=str(task.get("retriedTaskId") or ""),
            workflow_id=str(task.get("workflowInstanceId") or ""),
        )

    # -- metadata and workflows (CLI, demo, tests) -----------------------------------------

    def get_task_defs(self) -> list[TaskDef]:
        return list(self.call(self.metadata.get_task_defs) or [])

    def register_task_defs(self, defs: list[TaskDef]) -> None:
        self.call(self.metadata.register_task_def, defs)

    def update_task_def(self, task_def: TaskDef) -> None:
        self.call(self.metadata.update_task_def, task_def)

    def register_workflow(self, workflow_def: dict[str, Any]) -> None:
        """Create or replace a workflow definition (raw JSON keeps examples readable)."""
        self.call(
            self._client.call_api,
            "/metadata/workflow",
            "PUT",
            body=[workflow_def],
            header_params={"Content-Type": "application/json"},
            _return_http_data_only=True,
        )

    def workflow_exists(self, name: str, version: int | None = None) -> bool:
        """Whether a workflow definition `name` (at `version`, or any) is registered."""
        return self.workflow_definition(name, version) is not None

    def workflow_definition(self, name: str, version: int | None = None) -> dict[str, Any] | None:
        """The JSON of workflow definition `name` (at `version`, else the latest), or None."""
        # Raw: the SDK's `get_workflow_metadata` asks an Orkes-only path (/metadata/tags/...).
        query = [] if version is None else [("version", version)]
        try:
            found = self.call(
                self._client.call_api,
                f"/metadata/workflow/{urllib.parse.quote(name, safe='')}",
                "GET",
                query_params=query,
                response_type="object",
                _return_http_data_only=True,
                retry_seconds=5,
            )
        except ConductorError as exc:
            if exc.status == 404:
                return None
            raise
        return found if isinstance(found, dict) else {}

    def start_workflow(
        self,
        name: str,
        workflow_input: dict[str, Any],
        *,
        version: int | None = None,
        task_to_domain: dict[str, str] | None = None,
    ) -> str:
        request = StartWorkflowRequest(
            name=name, version=version, input=workflow_input, task_to_domain=task_to_domain
        )
        return str(self.call(self.workflows.start_workflow, request))

    def decide(self, workflow_id: str) -> None:
        """Ask Conductor to evaluate a workflow now (what its sweeper does periodically)."""
        self.call(self.workflows.decide, workflow_id)

    def get_workflow(self, workflow_id: str) -> Any:
        return self.call(self.workflows.get_execution_status, workflow_id, include_tasks=True)
