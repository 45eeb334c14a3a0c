"""The one retry policy for server calls: exponential backoff with jitter, bounded.

Transient faults (connection errors, timeouts, 5xx, 429) are retried; everything else is
raised at once. Each adapter says what is transient for its server; every retry is counted
in `perago_retries_total{server=...}`.
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from perago_worker.observability import metrics


def policy(
    server: str,
    is_transient: Callable[[BaseException], bool],
    *,
    max_seconds: float,
    max_attempts: int,
) -> Retrying:
    counter = metrics.RETRIES.labels(server=server)

    def count(_state: RetryCallState) -> None:
        counter.inc()

    return Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        stop=stop_after_delay(max_seconds) | stop_after_attempt(max_attempts),
        before_sleep=count,
        reraise=True,
    )
