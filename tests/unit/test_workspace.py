"""Specification of attempt folders: fresh, private, locked while alive, never leaked."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from perago_worker.workspace import AttemptDir


def test_an_attempt_folder_is_fresh_private_and_holds_an_empty_root(tmp_path: Path) -> None:
    first = AttemptDir.create(tmp_path, "t-1", {"task_id": "t-1"})
    second = AttemptDir.create(tmp_path, "t-1", {"task_id": "t-1"})
    assert first.path != second.path
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o700
    assert list(first.root.iterdir()) == []
    first.release(remove=True)
    second.release(remove=True)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_whose_owner_record_cannot_be_written_is_removed(tmp_path: Path) -> None:
    unserializable = {"owner": object()}  # json.dumps fails after the folder exists
    with pytest.raises(TypeError):
        AttemptDir.create(tmp_path, "t-1", unserializable)
    assert list(tmp_path.iterdir()) == []
