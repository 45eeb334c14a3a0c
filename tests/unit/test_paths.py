"""Specification of `perago_worker.paths`: prefixes, key <-> path mapping, containment."""

from __future__ import annotations

import errno
import itertools
import os
import random
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from perago_worker.paths import (
    InvalidPrefix,
    NameCollision,
    TreeShape,
    UnsafeKey,
    contained,
    distinct_names,
    key_to_relative,
    local_path,
    normalize_prefix,
    open_beneath,
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


# --- distinct_names ----------------------------------------------------------------------

NFC_E, NFD_E = "\u00e9", "e\u0301"  # é precomposed, and e + COMBINING ACUTE ACCENT
# Pieces whose names collide under NFC or case: é both ways, É, the Kelvin sign (NFC: K), ß.
_NAME_PIECES = ["e", NFC_E, NFD_E, "E", "\u00c9", "k", "K", "\u212a", "\u00df", "ss", "a", "\u0301"]
segments = st.lists(st.sampled_from(_NAME_PIECES), min_size=1, max_size=3).map("".join)
name_keys = st.lists(segments, min_size=1, max_size=3).map("/".join)


def _nfc(segment: str) -> str:
    return unicodedata.normalize("NFC", segment)


def _caseless(segment: str) -> str:
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", segment).casefold())


def _clash(keys: list[str], fold: Callable[[str], str]) -> bool:
    """Oracle, pair by pair: two keys whose folders (or names) at one depth are spelled
    differently but fold to the same name."""
    for a, b in itertools.combinations(set(keys), 2):
        sa, sb = a.split("/"), b.split("/")
        for depth in range(1, min(len(sa), len(sb)) + 1):
            left, right = sa[:depth], sb[:depth]
            if left != right and [fold(x) for x in left] == [fold(y) for y in right]:
                return True
    return False


def _refusal(keys: list[str], *, case_insensitive: bool = False) -> NameCollision | None:
    try:
        distinct_names(keys, case_insensitive=case_insensitive)
    except NameCollision as exc:
        return exc
    return None


def test_distinct_names_refuses_nfc_and_nfd_spellings_naming_both() -> None:
    with pytest.raises(NameCollision) as caught:
        distinct_names([f"caf{NFC_E}.txt", f"caf{NFD_E}.txt"])
    message = str(caught.value)
    assert message == (
        "object keys 'cafe\\u0301.txt' and 'caf\\xe9.txt' are the same name under Unicode "
        "normalization (NFC)"
    )


def test_distinct_names_refuses_folders_that_differ_only_in_normalization() -> None:
    with pytest.raises(NameCollision) as caught:
        distinct_names([f"in/{NFC_E}/a.txt", f"in/{NFD_E}/b.txt"])
    assert (caught.value.first, caught.value.second) == (f"in/{NFD_E}", f"in/{NFC_E}")
    assert caught.value.keys == (f"in/{NFD_E}/b.txt", f"in/{NFC_E}/a.txt")
    assert "lie in folders 'in/e\\u0301' and 'in/\\xe9'" in str(caught.value)


def test_distinct_names_treats_the_kelvin_sign_as_k() -> None:
    with pytest.raises(NameCollision, match="NFC"):
        distinct_names(["K.txt", "\u212a.txt"])


def test_distinct_names_accepts_names_differing_only_in_case_by_default() -> None:
    distinct_names(["README.md", "Readme.md", "docs/A.txt", "docs/a.txt"])


def test_distinct_names_refuses_names_differing_only_in_case_when_portable() -> None:
    with pytest.raises(NameCollision, match="ignoring case") as caught:
        distinct_names(["docs/Readme.md", "docs/README.md"], case_insensitive=True)
    assert caught.value.keys == ("docs/README.md", "docs/Readme.md")


def test_distinct_names_names_files_when_asked() -> None:
    with pytest.raises(NameCollision, match=r"^files "):
        distinct_names([NFC_E, NFD_E], what="files")


def test_name_collision_is_an_unsafe_key_naming_the_first_key() -> None:
    with pytest.raises(UnsafeKey) as caught:
        distinct_names(["b/" + NFC_E, "b/" + NFD_E])
    assert caught.value.key == "b/" + NFD_E


@given(st.lists(name_keys, max_size=8))
def test_distinct_names_refuses_exactly_the_keys_with_a_clash_under_nfc(keys: list[str]) -> None:
    assert (_refusal(keys) is not None) == _clash(keys, _nfc)


@given(st.lists(name_keys, max_size=8))
def test_distinct_names_when_portable_refuses_exactly_the_caseless_clashes(
    keys: list[str],
) -> None:
    assert (_refusal(keys, case_insensitive=True) is not None) == _clash(keys, _caseless)


@given(st.lists(name_keys, max_size=8), st.booleans())
def test_distinct_names_names_two_listed_spellings_of_one_name(
    keys: list[str], case_insensitive: bool
) -> None:
    refusal = _refusal(keys, case_insensitive=case_insensitive)
    if refusal is None:
        return
    fold = _caseless if case_insensitive else _nfc
    assert refusal.first < refusal.second
    assert [fold(x) for x in refusal.first.split("/")] == [
        fold(y) for y in refusal.second.split("/")
    ]
    for spelling, key in zip((refusal.first, refusal.second), refusal.keys, strict=True):
        assert key in keys
        assert key == spelling or key.startswith(spelling + "/")


@given(st.lists(name_keys, max_size=8), st.randoms(use_true_random=False), st.booleans())
def test_distinct_names_names_the_same_pair_whatever_the_listing_order(
    keys: list[str], rng: random.Random, case_insensitive: bool
) -> None:
    shuffled = list(keys)
    rng.shuffle(shuffled)
    refused, again = (_refusal(k, case_insensitive=case_insensitive) for k in (keys, shuffled))
    assert (None if refused is None else str(refused)) == (None if again is None else str(again))


@given(st.lists(name_keys, max_size=8))
def test_distinct_names_when_portable_refuses_all_the_default_refuses(keys: list[str]) -> None:
    if _refusal(keys) is not None:
        assert _refusal(keys, case_insensitive=True) is not None


@given(st.text(min_size=1).filter(lambda t: "/" not in t))
def test_distinct_names_refuses_the_nfc_and_nfd_forms_of_any_name_that_has_two(
    name: str,
) -> None:
    spellings = [unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name)]
    assert (_refusal(spellings) is not None) == (spellings[0] != spellings[1])


# --- open_beneath ------------------------------------------------------------------------


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_open_beneath_opens_a_nested_regular_file(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.txt").write_bytes(b"inside")
    fd = open_beneath(root_fd, PurePosixPath("a/b/c.txt"))
    try:
        assert os.read(fd, 100) == b"inside"
    finally:
        os.close(fd)


def test_open_beneath_refuses_a_file_that_is_a_symlink(tmp_path: Path, root_fd: int) -> None:
    host = tmp_path.parent / f"{tmp_path.name}-host.txt"
    host.write_bytes(b"host")
    (tmp_path / "leak.txt").symlink_to(host)
    with pytest.raises(OSError) as caught:
        open_beneath(root_fd, PurePosixPath("leak.txt"))
    assert caught.value.errno == errno.ELOOP


def test_open_beneath_refuses_a_folder_on_the_way_that_is_a_symlink(
    tmp_path: Path, root_fd: int
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f.txt").write_bytes(b"x")
    (tmp_path / "via").symlink_to(tmp_path / "real")  # even one that stays inside the root
    with pytest.raises(OSError) as caught:
        open_beneath(root_fd, PurePosixPath("via/f.txt"))
    assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_open_beneath_opens_a_fifo_without_blocking(tmp_path: Path, root_fd: int) -> None:
    os.mkfifo(tmp_path / "pipe")
    fd = open_beneath(root_fd, PurePosixPath("pipe"))
    os.close(fd)


@pytest.mark.parametrize("rel", ["../x", "a/../b", ".."])
def test_open_beneath_refuses_dot_segments(root_fd: int, rel: str) -> None:
    with pytest.raises(UnsafeKey):
        open_beneath(root_fd, PurePosixPath(*rel.split("/")))
