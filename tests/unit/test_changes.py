"""Specification of `perago_worker.changes`: scanning a workspace and diffing it."""

from __future__ import annotations

import os
import socket
from pathlib import Path, PurePosixPath

import pytest

from perago_worker.changes import (
    ChangeSet,
    FileSignature,
    LocalFile,
    Manifest,
    ManifestEntry,
    Unpublishable,
    diff,
    scan,
)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _manifest(root: Path) -> Manifest:
    """What materialization would have recorded for the current tree."""
    return {
        rel: ManifestEntry(FileSignature.of(st), checksum=f"sum-{rel}")
        for rel, st in scan(root).items()
    }


@pytest.fixture
def materialized(tmp_path: Path) -> tuple[Path, Manifest]:
    root = tmp_path / "ws"
    root.mkdir()
    _write(root, "keep.txt", "keep")
    _write(root, "edit.txt", "before")
    _write(root, "gone/old.txt", "old")
    return root, _manifest(root)


# --- scan --------------------------------------------------------------------------------


def test_scan_lists_regular_files_recursively(tmp_path: Path) -> None:
    _write(tmp_path, "a.txt", "a")
    _write(tmp_path, "d/e/f.bin", "fff")
    found = scan(tmp_path)
    assert set(found) == {PurePosixPath("a.txt"), PurePosixPath("d/e/f.bin")}
    assert found[PurePosixPath("d/e/f.bin")].st_size == 3


def test_scan_ignores_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    assert scan(tmp_path) == {}


def test_scan_refuses_symlink_to_host_file_by_name(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    os.symlink("/etc/hostname", tmp_path / "sub" / "host")
    with pytest.raises(Unpublishable) as info:
        scan(tmp_path)
    assert info.value.path == "sub/host"
    assert "symbolic link" in info.value.why


def test_scan_refuses_symlink_to_directory_without_following_it(tmp_path: Path) -> None:
    os.symlink("/etc", tmp_path / "etc")
    with pytest.raises(Unpublishable, match="etc: is a symbolic link"):
        scan(tmp_path)


def test_scan_refuses_fifo_by_name(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(Unpublishable) as info:
        scan(tmp_path)
    assert info.value.path == "pipe"
    assert "named pipe" in info.value.why


def test_scan_refuses_socket_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # AF_UNIX paths are length-limited; bind relative
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("s.sock")
        with pytest.raises(Unpublishable, match=r"s\.sock: is a socket"):
            scan(tmp_path)
    finally:
        sock.close()


def test_scan_refuses_file_name_with_backslash(tmp_path: Path) -> None:
    (tmp_path / "a\\b.txt").write_text("x")
    with pytest.raises(Unpublishable, match="backslash"):
        scan(tmp_path)


# --- diff --------------------------------------------------------------------------------


def test_diff_of_untouched_workspace_is_empty(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    changes = diff(manifest, scan(root))
    assert changes.empty
    assert changes.summary() == "+0 ~0 -0"


def test_diff_reports_added_file(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    _write(root, "new/out.csv", "1,2,3")
    changes = diff(manifest, scan(root))
    assert changes.added == [LocalFile(PurePosixPath("new/out.csv"), 5)]
    assert changes.modified == []
    assert changes.deleted == []


def test_diff_reports_modified_file(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    _write(root, "edit.txt", "after, and longer")
    changes = diff(manifest, scan(root))
    assert changes.modified == [LocalFile(PurePosixPath("edit.txt"), len("after, and longer"))]
    assert changes.added == []


def test_diff_reports_deleted_file(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    (root / "gone" / "old.txt").unlink()
    changes = diff(manifest, scan(root))
    assert changes.deleted == [PurePosixPath("gone/old.txt")]
    assert changes.uploads == []


def test_diff_does_not_report_unchanged_files(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    _write(root, "edit.txt", "after, and longer")
    _write(root, "added.txt", "a")
    changes = diff(manifest, scan(root))
    reported = {f.rel for f in changes.uploads} | set(changes.deleted)
    assert PurePosixPath("keep.txt") not in reported


def test_diff_treats_same_size_rewrite_with_new_mtime_as_modified(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    path = root / "edit.txt"
    before = path.stat()
    path.write_text("BEFORE")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    changes = diff(manifest, scan(root))
    assert [f.rel for f in changes.modified] == [PurePosixPath("edit.txt")]


def test_diff_treats_replaced_inode_as_modified(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    path = root / "keep.txt"
    before = path.stat()
    tmp = root / "keep.txt.new"
    tmp.write_text("keep")
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    keep_old = root.parent / "hold-old-inode"
    os.link(path, keep_old)  # keep the old inode alive so it cannot be reused
    tmp.replace(path)
    changes = diff(manifest, scan(root))
    assert [f.rel for f in changes.modified] == [PurePosixPath("keep.txt")]


def test_diff_lists_changes_sorted(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    for rel in ("z.txt", "a.txt", "m/b.txt"):
        _write(root, rel, "x")
    changes = diff(manifest, scan(root))
    assert [f.rel.as_posix() for f in changes.added] == ["a.txt", "m/b.txt", "z.txt"]


def test_diff_refuses_hard_link_to_file_outside_workspace(
    materialized: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root, manifest = materialized
    host_file = tmp_path_factory.mktemp("host") / "secret.txt"
    host_file.write_text("host secret")
    os.link(host_file, root / "leak.txt")
    with pytest.raises(Unpublishable) as info:
        diff(manifest, scan(root))
    assert info.value.path == "leak.txt"
    assert "hard link to a file outside the workspace" in info.value.why


def test_diff_allows_hard_link_between_two_new_files_in_workspace(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    _write(root, "one.txt", "shared")
    os.link(root / "one.txt", root / "two.txt")
    changes = diff(manifest, scan(root))
    assert [f.rel.as_posix() for f in changes.added] == ["one.txt", "two.txt"]


def test_diff_allows_new_hard_link_to_materialized_file(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    os.link(root / "keep.txt", root / "keep-copy.txt")
    changes = diff(manifest, scan(root))
    assert [f.rel.as_posix() for f in changes.added] == ["keep-copy.txt"]


# --- ChangeSet ---------------------------------------------------------------------------


def test_change_set_uploads_and_bytes_cover_added_and_modified() -> None:
    changes = ChangeSet(
        added=[LocalFile(PurePosixPath("a"), 3)],
        modified=[LocalFile(PurePosixPath("b"), 4)],
        deleted=[PurePosixPath("c")],
    )
    assert [f.rel.as_posix() for f in changes.uploads] == ["a", "b"]
    assert changes.upload_bytes == 7
    assert changes.summary() == "+1 ~1 -1"
    assert not changes.empty


def test_file_signature_of_reads_size_mtime_inode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("abcd")
    st = path.stat()
    assert FileSignature.of(st) == FileSignature(4, st.st_mtime_ns, st.st_ino)
