"""Specification of `perago_worker.changes`: scanning a workspace and diffing it.

The change set holds exactly the files whose bytes differ from what was materialized. A file
whose whole stat signature (size, mtime, ctime, inode) is unchanged is trusted without being
read; a same-size file whose signature moved is read and compared by SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

from perago_worker import changes as changes_module
from perago_worker.app import RegistrationError, WorkspaceSpec
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
    """What materialization would have recorded for the current tree (signature + digest)."""
    return {
        rel: ManifestEntry(
            FileSignature.of(st),
            checksum=f"sum-{rel}",
            digest=hashlib.sha256((root / rel).read_bytes()).hexdigest(),
        )
        for rel, st in scan(root).items()
    }


def _changed(changes: ChangeSet) -> set[str]:
    return {f.rel.as_posix() for f in changes.uploads} | {r.as_posix() for r in changes.deleted}


@pytest.fixture
def materialized(tmp_path: Path) -> tuple[Path, Manifest]:
    root = tmp_path / "ws"
    root.mkdir()
    _write(root, "keep.txt", "keep")
    _write(root, "edit.txt", "before")
    _write(root, "gone/old.txt", "old")
    return root, _manifest(root)


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if diff reads a file's content (records nothing when it does not)."""
    read: list[str] = []

    def refuse(fd: int) -> str:
        read.append(str(fd))
        raise AssertionError("diff read a file's content")

    monkeypatch.setattr(changes_module, "digest_fd", refuse)
    return read


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


# --- diff: what is a change --------------------------------------------------------------


def test_diff_of_untouched_workspace_is_empty(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    changes = diff(manifest, scan(root), root)
    assert changes.empty
    assert changes.summary() == "+0 ~0 -0"


def test_diff_reports_added_file(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    _write(root, "new/out.csv", "1,2,3")
    changes = diff(manifest, scan(root), root)
    assert changes.added == [LocalFile(PurePosixPath("new/out.csv"), 5)]
    assert changes.modified == []
    assert changes.deleted == []


def test_diff_reports_modified_file(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    _write(root, "edit.txt", "after, and longer")
    changes = diff(manifest, scan(root), root)
    assert changes.modified == [LocalFile(PurePosixPath("edit.txt"), len("after, and longer"))]
    assert changes.added == []


def test_diff_reports_deleted_file(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    (root / "gone" / "old.txt").unlink()
    changes = diff(manifest, scan(root), root)
    assert changes.deleted == [PurePosixPath("gone/old.txt")]
    assert changes.uploads == []


def test_diff_does_not_report_unchanged_files(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    _write(root, "edit.txt", "after, and longer")
    _write(root, "added.txt", "a")
    assert "keep.txt" not in _changed(diff(manifest, scan(root), root))


def test_diff_reports_same_size_rewrite_with_other_bytes(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    (root / "edit.txt").write_text("BEFORE")  # same size, other bytes
    changes = diff(manifest, scan(root), root)
    assert [f.rel for f in changes.modified] == [PurePosixPath("edit.txt")]


def test_rewriting_a_file_in_place_with_its_own_bytes_is_not_a_change(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    (root / "edit.txt").write_text("before")  # a deterministic regeneration
    assert (
        FileSignature.of((root / "edit.txt").stat())
        != manifest[PurePosixPath("edit.txt")].signature
    )
    assert diff(manifest, scan(root), root).empty


def test_replacing_a_file_by_a_new_inode_with_the_same_bytes_is_not_a_change(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    keep_old = root.parent / "hold-old-inode"
    os.link(root / "keep.txt", keep_old)  # keep the old inode alive so it cannot be reused
    (root / "keep.txt.new").write_text("keep")
    (root / "keep.txt.new").replace(root / "keep.txt")
    assert diff(manifest, scan(root), root).empty


def test_replacing_a_file_by_a_new_inode_with_other_bytes_and_the_old_mtime_is_modified(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    before = (root / "keep.txt").stat()
    keep_old = root.parent / "hold-old-inode"
    os.link(root / "keep.txt", keep_old)
    tmp = root / "keep.txt.new"
    tmp.write_text("KEEP")
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    tmp.replace(root / "keep.txt")
    changes = diff(manifest, scan(root), root)
    assert [f.rel.as_posix() for f in changes.modified] == ["keep.txt"]


def _edit_in_place_keep_mtime_with_utime(path: Path) -> None:
    before = path.stat()
    with path.open("r+b") as fh:
        fh.write(b"B")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _edit_in_place_keep_mtime_with_copystat(path: Path) -> None:
    reference = path.with_name("reference")
    shutil.copy2(path, reference)  # holds the original mtime
    with path.open("r+b") as fh:
        fh.write(b"B")
    shutil.copystat(reference, path)
    reference.unlink()


def _edit_in_place_keep_mtime_with_cp_p(path: Path) -> None:
    source = path.with_name("source")
    source.write_bytes(b"B" + path.read_bytes()[1:])
    subprocess.run(["touch", "-r", str(path), str(source)], check=True)
    subprocess.run(["cp", "-p", str(source), str(path)], check=True)  # same inode, old mtime
    source.unlink()


@pytest.mark.parametrize(
    "edit",
    [
        _edit_in_place_keep_mtime_with_utime,
        _edit_in_place_keep_mtime_with_copystat,
        _edit_in_place_keep_mtime_with_cp_p,
    ],
    ids=["os.utime", "shutil.copystat", "cp -p"],
)
def test_same_size_in_place_edit_that_restores_the_mtime_is_modified(
    materialized: tuple[Path, Manifest], edit: Callable[[Path], None]
) -> None:
    root, manifest = materialized
    path = root / "edit.txt"
    before = path.stat()
    edit(path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    changes = diff(manifest, scan(root), root)
    assert [f.rel.as_posix() for f in changes.modified] == ["edit.txt"]


def test_chmod_alone_is_not_a_change(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    (root / "keep.txt").chmod(0o444)
    assert diff(manifest, scan(root), root).empty


def test_many_rewrites_with_the_same_bytes_are_compared_in_parallel_and_are_no_change(
    tmp_path: Path,
) -> None:
    root = tmp_path / "ws"
    for i in range(40):
        _write(root, f"part-{i:02}.bin", f"row {i}\n" * 100)
    manifest = _manifest(root)
    for i in range(40):
        _write(root, f"part-{i:02}.bin", f"row {i}\n" * 100)
    _write(root, "part-07.bin", "ROW 7\n" + "row 7\n" * 99)
    changes = diff(manifest, scan(root), root)
    assert [f.rel.as_posix() for f in changes.modified] == ["part-07.bin"]


# --- diff: what is read ------------------------------------------------------------------


def test_untouched_files_are_not_read(
    materialized: tuple[Path, Manifest], no_reads: list[str]
) -> None:
    root, manifest = materialized
    _write(root, "added.txt", "new")
    changes = diff(manifest, scan(root), root)
    assert _changed(changes) == {"added.txt"}
    assert no_reads == []


def test_a_file_of_another_size_is_modified_without_being_read(
    materialized: tuple[Path, Manifest], no_reads: list[str]
) -> None:
    root, manifest = materialized
    _write(root, "edit.txt", "before, and then some")
    assert _changed(diff(manifest, scan(root), root)) == {"edit.txt"}
    assert no_reads == []


def test_verify_hash_reads_files_whose_signature_did_not_move(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    rel = PurePosixPath("keep.txt")
    # An edit no signature shows (a file system without a trustworthy ctime): the recorded
    # digest is the only witness that the bytes are not what was materialized.
    manifest[rel] = replace(manifest[rel], digest=hashlib.sha256(b"KEEP").hexdigest())
    assert diff(manifest, scan(root), root, verify="stat").empty
    changes = diff(manifest, scan(root), root, verify="hash")
    assert [f.rel.as_posix() for f in changes.modified] == ["keep.txt"]


def test_verify_hash_does_not_report_files_whose_bytes_are_unchanged(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    (root / "edit.txt").write_text("before")
    assert diff(manifest, scan(root), root, verify="hash").empty


def test_racy_entry_is_read_although_its_signature_did_not_move(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    rel = PurePosixPath("keep.txt")
    manifest[rel] = replace(manifest[rel], racy=True, digest=hashlib.sha256(b"KEEP").hexdigest())
    assert _changed(diff(manifest, scan(root), root)) == {"keep.txt"}
    manifest[rel] = replace(manifest[rel], digest=hashlib.sha256(b"keep").hexdigest())
    assert diff(manifest, scan(root), root).empty


def test_entry_without_a_digest_counts_as_modified_when_its_signature_moved(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    rel = PurePosixPath("edit.txt")
    manifest[rel] = replace(manifest[rel], digest="")
    (root / "edit.txt").write_text("before")
    assert _changed(diff(manifest, scan(root), root)) == {"edit.txt"}


def test_diff_without_root_reads_nothing_and_reports_every_moved_signature(
    materialized: tuple[Path, Manifest], no_reads: list[str]
) -> None:
    root, manifest = materialized
    (root / "edit.txt").write_text("before")
    assert _changed(diff(manifest, scan(root))) == {"edit.txt"}
    assert no_reads == []


def test_file_replaced_after_the_scan_counts_as_modified(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    (root / "edit.txt").write_text("before")
    scanned = scan(root)
    os.link(root / "edit.txt", root.parent / "hold")  # the scanned inode stays allocated
    (root / "edit.new").write_text("before")
    (root / "edit.new").replace(root / "edit.txt")  # same bytes, not the file scanned
    assert _changed(diff(manifest, scanned, root)) == {"edit.txt"}


def test_diff_refuses_an_unknown_verify_mode(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    with pytest.raises(ValueError, match="verify must be one of"):
        diff(manifest, scan(root), root, verify="mtime")  # type: ignore[arg-type]


def test_workspace_spec_takes_verify_hash_and_refuses_other_modes() -> None:
    assert WorkspaceSpec(verify="hash").verify == "hash"
    assert WorkspaceSpec().verify == "stat"
    with pytest.raises(RegistrationError, match="verify must be one of stat, hash"):
        WorkspaceSpec(verify="md5")  # type: ignore[arg-type]


# --- diff: what is refused ---------------------------------------------------------------


def test_diff_lists_changes_sorted(materialized: tuple[Path, Manifest]) -> None:
    root, manifest = materialized
    for rel in ("z.txt", "a.txt", "m/b.txt"):
        _write(root, rel, "x")
    changes = diff(manifest, scan(root), root)
    assert [f.rel.as_posix() for f in changes.added] == ["a.txt", "m/b.txt", "z.txt"]


def test_diff_refuses_hard_link_to_file_outside_workspace(
    materialized: tuple[Path, Manifest], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root, manifest = materialized
    host_file = tmp_path_factory.mktemp("host") / "secret.txt"
    host_file.write_text("host secret")
    os.link(host_file, root / "leak.txt")
    with pytest.raises(Unpublishable) as info:
        diff(manifest, scan(root), root)
    assert info.value.path == "leak.txt"
    assert "hard link to a file outside the workspace" in info.value.why


def test_diff_allows_hard_link_between_two_new_files_in_workspace(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    _write(root, "one.txt", "shared")
    os.link(root / "one.txt", root / "two.txt")
    changes = diff(manifest, scan(root), root)
    assert [f.rel.as_posix() for f in changes.added] == ["one.txt", "two.txt"]


def test_diff_allows_new_hard_link_to_materialized_file(
    materialized: tuple[Path, Manifest],
) -> None:
    root, manifest = materialized
    os.link(root / "keep.txt", root / "keep-copy.txt")
    changes = diff(manifest, scan(root), root)
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


def test_file_signature_of_reads_size_mtime_ctime_inode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("abcd")
    st = path.stat()
    assert FileSignature.of(st) == FileSignature(4, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
