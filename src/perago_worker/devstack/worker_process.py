"""A perago-worker daemon as a real child process (the demo and the fault tests use it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from perago_worker.devstack.servers import Endpoints, free_port


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:  # noqa: S310
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        return int(self.proc.returncode)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def events(self) -> list[dict[str, object]]:
        """The JSON log lines written so far."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def start_worker(
    app: str,
    endpoints: Endpoints,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    name: str = "worker",
    wait: bool = True,
    skip_preflight: bool = False,
    args: tuple[str, ...] = (),
) -> WorkerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"{name}.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERAGO_")},
        **endpoints.as_env(),
        "PERAGO_HTTP_HOST": "127.0.0.1",
        "PERAGO_HTTP_PORT": str(port),
        "PERAGO_SCRATCH_ROOT": str(workdir / "scratch"),
        "PERAGO_LOG_FORMAT": "json",
        "PERAGO_WORKER_ID": f"{name}-{os.getpid()}-{port}",
        "PERAGO_POLL_TIMEOUT_MS": "500",
        "PERAGO_DRAIN_GRACE_SECONDS": "30",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "perago_worker.cli", "run", app]
    if skip_preflight:
        cmd.append("--skip-preflight")
    cmd.extend(args)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    worker = WorkerProcess(proc, port, log_path)
    if wait:
        worker.wait_ready()
    return worker
