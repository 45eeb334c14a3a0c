"""Count and time every HTTP round trip a worker process makes, for the call list per task.

Installed by `bench_app` when `PERAGO_BENCH_CALLS` names a file (the task case sets it for
`--calls`): every request through `http.client` (the data plane's keep-alive connections and,
underneath, urllib3 and so lakefs-sdk) and through httpx (conductor-python) is recorded as
(thread name, server, method, path pattern, seconds). At exit the records are written to the
file as JSON lines; `summarize` turns them into calls per task by phase. Nothing here
changes what a request does: it only wraps the calls that send and answer it.
"""

from __future__ import annotations

import atexit
import http.client
import json
import re
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_RECORDS: list[tuple[str, str, str, str, float, float]] = []
_LOCK = threading.Lock()
_IDS = re.compile(r"/(?:[0-9a-f]{8}-[0-9a-f-]{27,}|[0-9a-f]{32,64})(?=/|$)")


def pattern(path: str) -> str:
    """A request path with ids, refs and object keys folded, so equal calls group."""
    path = urllib.parse.urlsplit(path).path
    path = _IDS.sub("/{id}", path)
    path = re.sub(r"/repositories/[^/]+", "/repositories/{repo}", path)
    path = re.sub(r"/branches/[^/]+", "/branches/{branch}", path)
    path = re.sub(r"/refs/[^/]+", "/refs/{ref}", path)
    path = re.sub(r"/commits/[^/]+", "/commits/{commit}", path)
    path = re.sub(r"/api/tasks/poll/batch/[^/]+", "/api/tasks/poll/batch/{type}", path)
    path = re.sub(r"/api/tasks/[^/]+$", "/api/tasks/{id}", path)
    if "/perago-dev/" in path or path.startswith("/perago-dev"):
        path = "/{bucket}/{key}"  # a presigned object URL on the store
    return path


def _record(server: str, method: str, path: str, started: float) -> None:
    ended = time.perf_counter()
    with _LOCK:
        _RECORDS.append(
            (threading.current_thread().name, server, method, pattern(path), started, ended)
        )


def install(out: Path) -> None:
    """Wrap http.client and httpx; write the records to `out` when the process exits."""
    import httpx

    put = http.client.HTTPConnection.putrequest
    get = http.client.HTTPConnection.getresponse

    def putrequest(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        self._bench_call = (method, url, time.perf_counter())
        return put(self, method, url, *args, **kwargs)

    def getresponse(self: Any) -> Any:
        try:
            return get(self)
        finally:
            call = getattr(self, "_bench_call", None)
            if call is not None:
                self._bench_call = None
                _record(f"{self.host}:{self.port}", call[0], call[1], call[2])

    send = httpx.Client.send

    def client_send(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return send(self, request, *args, **kwargs)
        finally:
            url = request.url
            _record(f"{url.host}:{url.port}", request.method, url.raw_path.decode(), started)

    http.client.HTTPConnection.putrequest = putrequest  # type: ignore[method-assign]
    http.client.HTTPConnection.getresponse = getresponse  # type: ignore[method-assign]
    httpx.Client.send = client_send  # type: ignore[method-assign]

    def dump() -> None:
        with _LOCK, out.open("a") as fh:
            for rec in _RECORDS:
                fh.write(json.dumps(rec) + "\n")

    atexit.register(dump)


def install_profile(out: Path) -> None:
    """Profile every thread the worker starts (cProfile, per thread, merged at exit) and
    write the merged statistics to `out` (pstats): where the worker's own CPU goes. Each
    profile counts its thread's CPU time (`time.thread_time`), not the wall clock, so the
    waits on sockets and locks drop out."""
    import cProfile
    import pstats

    merged: list[pstats.Stats] = []
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        try:
            profile.runcall(run, self)
        finally:
            with _LOCK:
                merged.append(pstats.Stats(profile))

    threading.Thread.run = profiled_run  # type: ignore[method-assign]

    def dump() -> None:
        with _LOCK:
            if not merged:
                return
            total = merged[0]
            for more in merged[1:]:
                total.add(more)
            total.dump_stats(str(out))

    atexit.register(dump)


def load(path: Path) -> list[tuple[str, str, str, str, float, float]]:
    rows = []
    for line in path.read_text().splitlines():
        thread, server, method, pat, started, ended = json.loads(line)
        rows.append((thread, server, method, pat, float(started), float(ended)))
    return rows


def role(thread: str) -> str:
    """Which part of the worker a thread is: the poll loop, an attempt, the lease keeper."""
    if thread.startswith("poll-"):
        return "poll loop"
    if thread.startswith("attempt-"):
        return "attempt"
    if thread.startswith("lease"):
        return "lease keeper"
    if thread.startswith(("stage", "materialize", "transfer", "ThreadPool")):
        return "attempt (transfer threads)"
    return thread.split("-")[0] or thread


def summarize(
    records: Iterable[tuple[str, str, str, str, float, float]],
    tasks: int,
    servers: dict[str, str],
) -> str:
    """A Markdown table: calls per task and mean ms per call, by role, server and call.

    `servers` names the `host:port` origins (lakeFS, Conductor, the store)."""
    count: Counter[tuple[str, str, str]] = Counter()
    seconds: dict[tuple[str, str, str], float] = defaultdict(float)
    for thread, server, method, pat, started, ended in records:
        key = (role(thread), servers.get(server, server), f"{method} {pat}")
        count[key] += 1
        seconds[key] += ended - started
    lines = ["| thread | server | call | per task | mean ms |", "|---|---|---|---|---|"]
    for key in sorted(count, key=lambda k: (k[0], k[1], -count[k])):
        n = count[key]
        lines.append(
            f"| {key[0]} | {key[1]} | `{key[2]}` | {n / tasks:.2f} | {1000 * seconds[key] / n:.1f} |"
        )
    total = sum(count.values())
    lines.append(f"| all | | | {total / tasks:.2f} | |")
    return "\n".join(lines)


def timeline(
    records: list[tuple[str, str, str, str, float, float]], servers: dict[str, str]
) -> str:
    """The calls of the last attempt, in the order they started, with every other thread's
    calls that started during it (transfer threads, the poll loop's next poll)."""
    attempts = [r for r in records if r[0].startswith("attempt-")]
    if not attempts:
        return "(no attempt recorded)"
    last = max(attempts, key=lambda r: r[4])[0]
    own = [r for r in records if r[0] == last]
    begin, end = min(r[4] for r in own), max(r[5] for r in own)
    during = sorted((r for r in records if begin <= r[4] <= end), key=lambda r: r[4])
    lines = ["| start ms | ms | thread | server | call |", "|---|---|---|---|---|"]
    for thread, server, method, pat, started, ended in during:
        lines.append(
            f"| {1000 * (started - begin):.1f} | {1000 * (ended - started):.1f} | {role(thread)} "
            f"| {servers.get(server, server)} | `{method} {pat}` |"
        )
    return "\n".join(lines)
