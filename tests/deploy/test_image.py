"""The worker's OCI image, built here without Docker and started with podman.

`scripts/image` builds the Dockerfile on a Debian base made by mmdebstrap (cached in
`~/.cache/perago/image`; a warm run reuses the image when the Dockerfile, requirements.lock
and src/ did not change). The tests then run that image the way a deployment does: its
configuration as built, `--version`, and the default command (the demo handlers) against the
session's lakeFS and Conductor, answering /healthz and /readyz, completing the demo workflow,
and draining to exit 0 on SIGTERM.

Skipped, with the reason, when the tools are missing (root, mmdebstrap, buildah, podman;
`scripts/test` installs them best-effort on Debian as root), or with PERAGO_TEST_IMAGE=skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from perago_worker import __version__
from perago_worker.conductor import Conductor
from perago_worker.devstack.demo import register_app, seed_repository, wait_for_workflow
from perago_worker.devstack.demo_app import WORKFLOW, app
from perago_worker.devstack.servers import Endpoints, free_port
from perago_worker.lakefs import LakeFS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "image"
DEFAULT_PORT = 9464  # the Dockerfile's EXPOSE and HEALTHCHECK


def _missing_prerequisite() -> str | None:
    if os.environ.get("PERAGO_TEST_IMAGE") == "skip":
        return "PERAGO_TEST_IMAGE=skip"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "scripts/image needs root (rootless mmdebstrap/buildah/podman is not wired up)"
    absent = [tool for tool in ("mmdebstrap", "buildah", "podman") if shutil.which(tool) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (Debian: apt-get install {' '.join(absent)})"
    return None


# Session scope: set up before the session-scoped stack, so a skip starts no servers.
@pytest.fixture(scope="session")
def image() -> str:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode == 3:  # a prerequisite the script checks (its message says which)
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"scripts/image failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    ref = proc.stdout.strip().splitlines()[-1]
    print(f"image {ref} ready in {time.monotonic() - started:.1f}s")
    return ref


@pytest.fixture(scope="session")
def run_flags() -> list[str]:
    out = subprocess.run(
        [str(SCRIPT), "run-flags"], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.split()


def podman(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"podman {' '.join(args[:2])} failed: {proc.stderr[-3000:]}"
    return proc.stdout


def test_image_is_configured_as_the_dockerfile_says(image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image))[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["perago-worker"]
    assert config["WorkingDir"] == "/home/perago"
    assert config["Cmd"] == ["run", "perago_worker.devstack.demo_app:app"]
    assert config["StopSignal"] == "SIGTERM"
    assert f"{DEFAULT_PORT}/tcp" in config["ExposedPorts"]
    assert "/var/lib/perago/attempts" in config["Volumes"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PERAGO_LOG_FORMAT"] == "json"
    assert env["PERAGO_SCRATCH_ROOT"] == "/var/lib/perago/attempts"
    assert env["PATH"].startswith("/opt/perago/bin:")
    # Kept because scripts/image builds in Docker format (OCI has no HEALTHCHECK).
    assert f"127.0.0.1:{DEFAULT_PORT}/healthz" in " ".join(inspected["Healthcheck"]["Test"])


def test_image_runs_its_entrypoint(image: str, run_flags: list[str]) -> None:
    out = podman("run", "--rm", *run_flags, image, "--version")
    assert out.strip() == f"perago-worker {__version__}"
    python = podman("run", "--rm", *run_flags, "--entrypoint", "python", image, "--version")
    assert python.startswith("Python 3.11."), python


def _port() -> int:
    """The image's default port when it is free here (so its HEALTHCHECK applies), else any."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            return free_port()
    return DEFAULT_PORT


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def state(self) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", "--type", "container", self.name))[0]["State"])

    def logs(self) -> str:
        proc = subprocess.run(
            ["podman", "logs", self.name], capture_output=True, text=True, timeout=30, check=False
        )
        return proc.stdout + proc.stderr

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@pytest.fixture
def container() -> Iterator[Container]:
    box = Container(f"perago-image-test-{uuid.uuid4().hex[:8]}")
    yield box
    subprocess.run(
        ["podman", "rm", "--force", "--volumes", "--time", "0", box.name],
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_demo_workflow_completes_in_the_container_and_sigterm_drains(
    image: str,
    run_flags: list[str],
    endpoints: Endpoints,
    lakefs: LakeFS,
    conductor: Conductor,
    container: Container,
    tmp_path: Path,
) -> None:
    # A domain of its own: no other worker polling these task types takes this run's tasks.
    domain = f"image{uuid.uuid4().hex[:8]}"
    repository = f"image-{uuid.uuid4().hex[:8]}"
    seed = seed_repository(lakefs, repository, tmp_path)
    register_app(conductor, app)
    conductor.register_workflow(WORKFLOW)

    port = _port()
    worker_id = f"image-test-{domain}"
    settings = {
        **endpoints.as_env(),
        "PERAGO_HTTP_HOST": "127.0.0.1",
        "PERAGO_HTTP_PORT": str(port),
        "PERAGO_TASK_DOMAIN": domain,
        "PERAGO_WORKER_ID": worker_id,
        "PERAGO_POLL_TIMEOUT_MS": "500",
    }
    # `-e NAME` takes the value from podman's environment: no credentials on the command line.
    env_flags = [arg for name in settings for arg in ("-e", name)]
    podman_env = {**os.environ, **settings}
    # The image's default command: the demo handlers.
    podman(
        "run", "--detach", "--name", container.name, *run_flags, *env_flags, image, env=podman_env
    )

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        state = container.state()
        assert state["Running"], f"container exited ({state['ExitCode']}):\n{container.logs()}"
        with contextlib.suppress(OSError):
            if _get(url + "/readyz")[0] == 200:
                break
        assert time.monotonic() < deadline, f"not ready in 90 s:\n{container.logs()[-4000:]}"
        time.sleep(0.3)
    status, body = _get(url + "/healthz")
    assert status == 200, body
    if port == DEFAULT_PORT:  # the image's own HEALTHCHECK command, run by podman
        podman("healthcheck", "run", container.name)

    workflow_id = conductor.start_workflow(
        str(WORKFLOW["name"]),
        {
            "workspace": {
                "repository": repository,
                "branch": "main",
                "ref_type": "commit",
                "ref": seed,
            },
            "rows": 200,
        },
        task_to_domain={"*": domain},
    )
    run = wait_for_workflow(conductor, workflow_id, timeout=120)
    assert run.status == "COMPLETED", (
        [(t.reference_task_name, t.status, t.reason_for_incompletion) for t in run.tasks],
        container.logs()[-4000:],
    )
    assert {t.worker_id for t in run.tasks} == {worker_id}
    final = run.output["workspace"]["ref"]
    meta = lakefs.get_commit(repository, final).metadata
    assert meta["perago.task_type"] == "demo_transform", meta
    assert meta["perago.worker_id"] == worker_id, meta

    # SIGTERM (the image's STOPSIGNAL): drain, then exit 0.
    podman("kill", "--signal", "TERM", container.name)
    code = podman("wait", container.name, timeout=90).strip()
    assert code == "0", container.logs()[-4000:]
    events = [e.get("event") for e in container.events()]
    assert "worker.running" in events  # JSON logs: the image's PERAGO_LOG_FORMAT
    assert events.index("worker.draining") < events.index("worker.stopped"), events
