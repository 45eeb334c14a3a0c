"""Specification of `perago_worker.paths`: prefixes, key <-> path mapping, containment."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from perago_worker.paths import (
    InvalidPrefix,
    TreeShape,
    UnsafeKey,
    contained,
    key_to_relative,
    local_path,
    normalize_prefix,
    relative_to_key,
    validate_relative,
)

# Text biased towards the characters that matter for path safety.
_TRICKY = ["/", ".", "..", "\\", "\x00", "~", ":", "C:", "a", "b", "é", " ", "//"]
tricky_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(_TRICKY), max_size=12).map("".join),
)
prefixes = st.sampled_from(["", "data/", "audio/render/"])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace-root")


# --- normalize_prefix -------------------------------------------------------------------


def test_normalize_prefix_root_slash_is_empty() -> None:
    assert normalize_prefix("/") == ""


def test_normalize_prefix_empty_string_is_empty() -> None:
    assert normalize_prefix("") == ""


@pytest.mark.parametrize("spelling", ["/audio/render", "audio/render", "/audio/render/"])
def test_normalize_prefix_spellings_of_one_folder_agree(spelling: str) -> None:
    assert normalize_prefix(spelling) == "audio/render/"


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("a\\b", "backslash"),
        ("C:\\data", "backslash"),
        ("a\x00b", "NUL"),
        ("~", "home"),
        ("~alice/data", "home"),
        ("//host/share", "network host"),
        ("C:/x", "drive"),
        ("c:", "drive"),
        ("..", "'..'"),
        ("a/../b", "'..'"),
        (".", "'.'"),
        ("a/./b", "'.'"),
        ("a//b", "empty segment"),
        ("x" * 256, "255 bytes"),
    ],
)
def test_normalize_prefix_refuses_host_spellings_and_dot_segments(prefix: str, why: str) -> None:
    with pytest.raises(InvalidPrefix, match=why):
        normalize_prefix(prefix)


def test_normalize_prefix_refuses_non_string() -> None:
    with pytest.raises(InvalidPrefix, match="must be a string"):
        normalize_prefix(b"audio")  # type: ignore[arg-type]


@given(tricky_text)
def test_normalize_prefix_output_is_empty_or_a_relative_folder(prefix: str) -> None:
    try:
        out = normalize_prefix(prefix)
    except InvalidPrefix:
        return
    if out:
        assert out.endswith("/")
        assert not out.startswith("/")
        assert "//" not in out
        assert all(seg not in (".", "..") for seg in out[:-1].split("/"))


@given(tricky_text.filter(lambda s: "~" not in s and ":" not in s))
def test_normalize_prefix_is_idempotent_without_home_or_drive_characters(prefix: str) -> None:
    try:
        once = normalize_prefix(prefix)
    except InvalidPrefix:
        return
    assert normalize_prefix(once) == once


@given(tricky_text)
@example("/~alice")
def test_normalize_prefix_is_idempotent_on_its_own_output(prefix: str) -> None:
    try:
        once = normalize_prefix(prefix)
    except InvalidPrefix:
        return
    assert normalize_prefix(once) == once


@pytest.mark.parametrize("prefix", ["/~alice", "/C:/data"])
def test_normalize_prefix_refuses_home_and_drive_behind_a_leading_slash(prefix: str) -> None:
    with pytest.raises(InvalidPrefix):
        normalize_prefix(prefix)


# --- validate_relative / key_to_relative -------------------------------------------------


def test_validate_relative_returns_posix_path() -> None:
    assert validate_relative("out/a.txt") == PurePosixPath("out", "a.txt")


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("../x", "'..'"),
        ("a/./b", "'.'"),
        ("y" * 256, "255 bytes"),
    ],
)
def test_validate_relative_refuses_unsafe_paths(rel: str, why: str) -> None:
    with pytest.raises(UnsafeKey, match=why):
        validate_relative(rel)


def test_unsafe_key_carries_key_and_reason() -> None:
    with pytest.raises(UnsafeKey) as info:
        validate_relative("../x")
    assert info.value.key == "../x"
    assert "'..'" in info.value.why


def test_key_to_relative_strips_the_prefix() -> None:
    assert key_to_relative("audio/render/a/b.wav", "audio/render/") == PurePosixPath("a/b.wav")


def test_key_to_relative_refuses_key_outside_prefix() -> None:
    with pytest.raises(UnsafeKey, match="not under the prefix"):
        key_to_relative("video/a.mp4", "audio/")


def test_key_to_relative_refuses_the_prefix_folder_marker_itself() -> None:
    with pytest.raises(UnsafeKey, match="empty key"):
        key_to_relative("audio/", "audio/")


@given(prefix=prefixes, tail=tricky_text, under=st.booleans())
def test_key_to_relative_is_refused_or_stays_inside_root(
    root: Path, prefix: str, tail: str, under: bool
) -> None:
    key = prefix + tail if under else tail
    try:
        rel = key_to_relative(key, prefix)
    except UnsafeKey:
        return
    assert not rel.is_absolute()
    path = local_path(root, rel)
    resolved = path.resolve()
    assert resolved != root.resolve()
    assert resolved.is_relative_to(root.resolve())


@given(prefix=prefixes, tail=tricky_text)
def test_relative_to_key_inverts_key_to_relative(prefix: str, tail: str) -> None:
    key = prefix + tail
    try:
        rel = key_to_relative(key, prefix)
    except UnsafeKey:
        return
    assert relative_to_key(rel, prefix) == key


# --- contained / local_path --------------------------------------------------------------


def test_contained_accepts_a_file_inside(tmp_path: Path) -> None:
    root = tmp_path / "ws-1"
    root.mkdir()
    assert contained(root, root / "a" / "b.txt")


def test_contained_accepts_the_root_itself(tmp_path: Path) -> None:
    assert contained(tmp_path, tmp_path)


def test_contained_refuses_sibling_with_root_as_string_prefix(tmp_path: Path) -> None:
    root = tmp_path / "ws-1"
    evil = tmp_path / "ws-1-evil"
    root.mkdir()
    evil.mkdir()
    assert not contained(root, evil / "x")


def test_contained_refuses_dotdot_escape(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    assert not contained(root, root / ".." / "other")


def test_contained_refuses_symlink_pointing_outside(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert not contained(root, root / "link" / "secret")


def test_local_path_joins_relative_under_root(tmp_path: Path) -> None:
    assert local_path(tmp_path, PurePosixPath("a/b.txt")) == tmp_path / "a" / "b.txt"


def test_local_path_refuses_path_through_symlink_outside(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafeKey, match="outside the workspace root"):
        local_path(root, PurePosixPath("link/secret"))


# --- TreeShape ---------------------------------------------------------------------------


def test_tree_shape_refuses_folder_after_file() -> None:
    shape = TreeShape()
    shape.add(PurePosixPath("a"))
    with pytest.raises(UnsafeKey, match="also a file"):
        shape.add(PurePosixPath("a/b"))


def test_tree_shape_refuses_file_after_folder() -> None:
    shape = TreeShape()
    shape.add(PurePosixPath("a/b"))
    with pytest.raises(UnsafeKey, match="both a file and a folder"):
        shape.add(PurePosixPath("a"))


def test_tree_shape_refuses_deep_conflict() -> None:
    shape = TreeShape()
    shape.add(PurePosixPath("a/b/c/d"))
    with pytest.raises(UnsafeKey):
        shape.add(PurePosixPath("a/b"))


def test_tree_shape_accepts_siblings_and_nested_files() -> None:
    shape = TreeShape()
    for rel in ("a/b", "a/c", "a/d/e", "ab", "a.txt"):
        shape.add(PurePosixPath(rel))
