"""One HTTP port for the platform: /healthz (liveness), /readyz (readiness), /metrics, /status.

Liveness fails (503, naming each cause) when the worker is broken: state `failed` (a failed
preflight, or a loop that died or stalled at run time), or, while running, a poll loop or the
lease keeper that died or stamped no heartbeat within its bound (`runner.Heartbeat`): a
restart is the remedy for both. Readiness is true only while the worker runs after a
preflight that passed or was skipped, so a draining replica leaves the Service before it
stops taking tasks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from perago_worker.runner import Lifecycle


def _metrics_payload() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        lifecycle: Lifecycle,
        status: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.lifecycle = lifecycle
        self._status = status
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, _metrics_payload(), CONTENT_TYPE_LATEST)
                    return
                if path == "/healthz":
                    summary = server_self.summary()
                    self._json(503 if summary["causes"] else 200, summary)
                    return
                if path == "/readyz":
                    ok = server_self.lifecycle.ready
                    self._json(200 if ok else 503, server_self.summary())
                    return
                if path == "/status":
                    self._json(200, {**server_self.summary(), **server_self._status()})
                    return
                self._json(404, {"error": f"no such endpoint {path}"})

            def _json(self, code: int, body: dict[str, Any]) -> None:
                self._send(code, json.dumps(body, default=str).encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    def summary(self) -> dict[str, Any]:
        last = self.lifecycle.last_poll
        return {
            "state": self.lifecycle.state,
            "ready": self.lifecycle.ready,
            "preflight": self.lifecycle.preflight,  # pending, passed, failed or skipped
            "preflight_ok": self.lifecycle.preflight_ok,  # true only when it ran and passed
            "causes": self.lifecycle.problems(),  # why liveness fails; empty when it does not
            "last_poll_age_seconds": None if last is None else round(time.time() - last, 3),
        }

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
