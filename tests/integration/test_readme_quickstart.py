"""The README's quick start, run exactly as written, in a fresh folder next to a checkout.

Its shell blocks run in order in one `bash -euo pipefail` script; its Python block is
saved as the file its first line names; its JSON block must be the example's workflow file.
The script installs the package into its own virtualenv, starts the local stack the README
starts (a stack of its own, not the suite's), and is then judged by what lakeFS and
Conductor hold, not by what it printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from perago_worker.devstack.servers import Endpoints
from perago_worker.lakefs import LakeFS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
HEREDOC = "PERAGO_README_EOF"


def quickstart() -> str:
    text = README.read_text()
    start = text.index("\n## Quick start\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(quickstart())]


def script() -> str:
    """The quick start as one shell script: shell blocks verbatim, files written in place."""
    parts = []
    for lang, body in blocks():
        if lang == "bash":
            parts.append(body)
        elif lang == "python":
            first = body.splitlines()[0]
            name = first.removeprefix("# ").strip() if first.startswith("# ") else ""
            assert name.endswith(".py"), f"the Python block must start with '# FILE.py': {first!r}"
            assert HEREDOC not in body
            parts.append(f"cat > {name} <<'{HEREDOC}'\n{body}{HEREDOC}\n")
    return "set -euo pipefail\n" + "\n".join(parts)


def test_the_quick_start_shows_the_examples_as_they_are() -> None:
    """The handlers and the workflow the README shows are the files in examples/."""
    shown = dict(blocks())
    assert shown["python"] == (ROOT / "examples" / "quickstart.py").read_text()
    workflow = json.loads((ROOT / "examples" / "quickstart.workflow.json").read_text())
    assert json.loads(shown["json"]) == workflow
    assert "perago-worker/examples/quickstart.workflow.json" in script()


def test_the_quick_start_walks_every_step_the_issue_names() -> None:
    steps = script()
    for needed in (
        "pip install",
        "devstack up",
        "/repositories",  # a repository
        "/commits",  # and its first commit
        "perago-worker register",
        "perago-worker check",
        "metadata/workflow",
        "perago-worker run",
        "perago-worker start",
        "--wait",
        "perago-worker exec",
        "--publish",
    ):
        assert needed in steps, needed


def _user_environment(home: Path) -> dict[str, str]:
    """A newcomer's shell: no PERAGO_* settings, not inside the project's own virtualenv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERAGO_")}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    own = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != own)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _checkout_copy(dest: Path) -> None:
    """What `git clone` would give: the tracked files (and the working tree's edits)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _processes_under(folder: Path) -> list[int]:
    """Processes whose working directory is inside `folder` (the stack's servers are)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append(int(proc.name))
    return found


@contextlib.contextmanager
def _reaped(folder: Path) -> Iterator[None]:
    """Whatever the script left running is stopped: the stack first, then anything else."""
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            pids = [p for p in _processes_under(folder) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
                time.sleep(0.5)


def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "perago-worker").mkdir(parents=True)
    _checkout_copy(work / "perago-worker")
    (work / "quickstart.sh").write_text(script())
    with _reaped(work):
        run = subprocess.run(
            ["bash", "quickstart.sh"],
            cwd=work,
            env=_user_environment(tmp_path),
            capture_output=True,
            text=True,
            timeout=1400,
            check=False,
        )
        worker_log = (work / "worker.log").read_text() if (work / "worker.log").exists() else ""
        stack_log = (work / "qs-stack.log").read_text()
        assert run.returncode == 0, (
            f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}\n"
            f"worker log:\n{worker_log[-3000:]}\nstack log:\n{stack_log[-2000:]}"
        )
        assert not _processes_under(work / "qs-stack"), "step 9 left a server running"
    out = run.stdout
    # `start --wait` printed the finished workflow, its output and both merges' provenance.
    assert re.search(r"^workflow \S+: COMPLETED$", out, re.MULTILINE), out
    assert out.count("merge by ") == 2 and "perago.task_type: qs_clean" in out
    # Amounts 10+i of ids 0..8 without every third: 13, 14, 16, 17 are at least 12.
    assert '"average": 15.0' in out
    # The two `exec` reports (the script's last JSON documents): a dry run, then a publish.
    reports = [json.loads(m) for m in re.findall(r"^\{\n.*?^\}$", out, re.MULTILINE | re.DOTALL)]
    dry, published = reports[-2], reports[-1]
    assert dry["status"] == published["status"] == "COMPLETED"
    assert dry["result"] == published["result"] == {"kept": 3, "total": 47}
    assert dry["changes"]["modified"] == [{"path": "clean/sales.csv", "size": 29}]
    assert "merge" not in dry and published["merge"]["provenance"]["perago.manual"] == "true"
    assert published["output"]["ref"] == published["merge"]["commit"] != dry["input"]["ref"]


def test_the_quick_start_lakefs_calls_work_on_a_running_lakefs(
    lakefs: LakeFS, endpoints: Endpoints, tmp_path: Path
) -> None:
    """Step 4's REST calls, on the suite's stack (any blockstore): a repository, an upload
    and a first commit, in exactly the README's curl commands."""
    [step] = [b for lang, b in blocks() if lang == "bash" and "/repositories" in b]
    namespace = lakefs.storage_config().default_namespace_prefix or "local://"
    name = f"qs-{os.getpid()}-{int(time.time())}"
    body = step.replace('"sales"', f'"{name}"').replace("/sales/", f"/{name}/")
    body = body.replace('"local://sales"', f'"{namespace.rstrip("/")}/{name}"')
    env = _user_environment(tmp_path)
    env.update(endpoints.as_env())
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    head = lakefs.get_commit(name, "main")
    assert head.message == "first commit"
    listed = [o.key for page in lakefs.list_objects(name, "main", "") for o in page]
    assert listed == ["sales/README.txt"]
