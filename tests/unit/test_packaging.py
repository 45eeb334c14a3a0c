"""The package as users get it: its public names, its metadata, and a wheel built cleanly.

`perago_worker.__all__` is pinned (a name added or dropped is an API change, made here on
purpose) and every name in it imports. pyproject.toml states the license as an SPDX
expression with its file (PEP 639, setuptools >= 77), ships `py.typed` (PEP 561) and
classifiers. A wheel built from a copy of the sources shows no deprecation warning from the
build backend and holds `py.typed`, the license file and that metadata.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import perago_worker

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PUBLIC = [
    "Cancelled",
    "NoWorkspaceError",
    "RegistrationError",
    "TaskContext",
    "TaskSpec",
    "TerminalError",
    "Worker",
    "WorkspaceSpec",
    "__version__",
]


def test_the_public_names_are_pinned_and_each_imports() -> None:
    assert sorted(perago_worker.__all__) == sorted(PUBLIC)
    assert len(set(perago_worker.__all__)) == len(perago_worker.__all__)
    for name in perago_worker.__all__:
        assert getattr(perago_worker, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from perago_worker import *", namespace)
    assert set(PUBLIC) <= set(namespace)
    assert (
        perago_worker.__version__ == importlib.import_module("perago_worker._version").__version__
    )


def test_the_docstring_example_imports_what_it_names() -> None:
    from perago_worker import TaskContext, TerminalError, Worker, WorkspaceSpec
    from perago_worker.checks import forbid_glob, require_dir, require_file, require_glob

    assert all((TaskContext, TerminalError, Worker, WorkspaceSpec))
    assert all((forbid_glob, require_dir, require_file, require_glob))


def test_the_metadata_uses_an_spdx_license_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    # PEP 639: with a license expression, no `License ::` classifier.
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    requires = PYPROJECT["build-system"]["requires"]
    assert "setuptools>=77" in requires, "license-files and SPDX strings need setuptools 77"


def test_py_typed_is_package_data() -> None:
    assert (ROOT / "src" / "perago_worker" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["perago_worker"]


@pytest.mark.slow
def test_the_wheel_builds_without_deprecation_warnings_and_ships_py_typed(tmp_path: Path) -> None:
    # A copy: an in-tree build would leave build/ and egg-info behind in the work tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(out), "-v"],
        capture_output=True,
        text=True,
        check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # setuptools' deprecations reach pip's log as SetuptoolsDeprecationWarning (or, rewrapped,
    # as a BuildBackendWarning saying what "is deprecated").
    for marker in ("SetuptoolsDeprecationWarning", "BuildBackendWarning", "is deprecated"):
        assert marker not in log, [line for line in log.splitlines() if marker in line][:5]
    [wheel] = out.glob("perago_worker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "perago_worker/py.typed" in names
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        dist_info = metadata_name.rsplit("/", 1)[0]
        assert f"{dist_info}/licenses/LICENSE" in names
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Typing :: Typed" in metadata.get_all("Classifier", [])
    assert metadata["Version"] == perago_worker.__version__
