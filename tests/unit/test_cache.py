"""Specification of the object cache and of materialize's digests: no wrong byte ever comes out.

lakeFS is replaced by an in-memory store with the same listing and download calls, so that
thousands of handler behaviours can be tried (the property test) and checksums can be forged
(two repositories with one ETag). The real-server counterpart is
tests/integration/test_content.py.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from perago_worker import materialize as materialize_module
from perago_worker.cache import ObjectCache
from perago_worker.changes import FileSignature, Manifest, ManifestEntry, diff, scan
from perago_worker.lakefs import Downloaded, ObjectInfo
from perago_worker.materialize import fs_clock, materialize, settle
from perago_worker.settings import Settings

MiB = 1 << 20


@dataclass
class Obj:
    data: bytes
    checksum: str
    mtime: int


@dataclass
class FakeLakeFS:
    """Commits as dicts of key -> object; the listing and download calls materialize uses."""

    endpoint: str = "http://lakefs.test"
    repositories: dict[str, tuple[str, int]] = field(default_factory=dict)
    commits: dict[str, dict[str, Obj]] = field(default_factory=dict)
    downloads: int = 0
    clock: Iterator[int] = field(default_factory=lambda: itertools.count(1_700_000_000))

    @property
    def repos(self) -> FakeLakeFS:
        return self

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def get_repository(self, repository: str) -> SimpleNamespace:
        namespace, created = self.repositories[repository]
        return SimpleNamespace(storage_namespace=namespace, creation_date=created)

    def commit(
        self,
        repository: str,
        files: dict[str, bytes],
        parent: str | None = None,
        deleted: tuple[str, ...] = (),
        checksum: str | None = None,
    ) -> str:
        self.repositories.setdefault(repository, (f"local://{repository}", 1))
        tree = dict(self.commits[parent]) if parent else {}
        now = next(self.clock)
        for key, data in files.items():
            tree[key] = Obj(data, checksum or hashlib.md5(data).hexdigest(), now)
        for key in deleted:
            tree.pop(key, None)
        ref = f"{repository}@{len(self.commits)}"
        self.commits[ref] = tree
        return ref

    def list_objects(self, repository: str, ref: str, prefix: str) -> Iterator[list[ObjectInfo]]:
        tree = self.commits[ref]
        yield [
            ObjectInfo(key, len(tree[key].data), tree[key].checksum, tree[key].mtime)
            for key in sorted(tree)
            if key.startswith(prefix)
        ]

    @property
    def transfers(self) -> FakeLakeFS:  # the data plane is this fake, too
        return self

    def download(self, repository: str, ref: str, obj: ObjectInfo, dest: Path) -> Downloaded:
        self.downloads += 1
        data = self.commits[ref][obj.key].data
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            return Downloaded(os.fstat(fd), hashlib.sha256(data).hexdigest())
        finally:
            os.close(fd)

    def tree(self, ref: str) -> dict[str, bytes]:
        return {key: obj.data for key, obj in self.commits[ref].items()}


@pytest.fixture(autouse=True)
def _fresh_scopes() -> Iterator[None]:
    materialize_module._SCOPES.clear()
    yield
    materialize_module._SCOPES.clear()


def run_materialize(
    store: FakeLakeFS, repository: str, ref: str, root: Path, cache: ObjectCache | None
) -> tuple[Manifest, int]:
    root.mkdir(parents=True)
    manifest, stats = materialize(
        store,  # type: ignore[arg-type]
        repository,
        ref,
        "",
        root,
        concurrency=4,
        cache=cache,
    )
    return manifest, stats.cached_files


def tree_of(root: Path) -> dict[str, bytes]:
    return {rel.as_posix(): (root / rel).read_bytes() for rel in scan(root)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def edit_keep_mtime(path: Path) -> None:
    """A same-size in-place edit that restores the mtime (what `cp -p` or `os.utime` leave)."""
    before = path.stat()
    data = path.read_bytes()
    with path.open("r+b") as fh:
        fh.write(bytes([data[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


# --- materialize: digests --------------------------------------------------------------------


def test_materialize_records_the_sha256_of_every_file_it_wrote(tmp_path: Path) -> None:
    store = FakeLakeFS()
    ref = store.commit("r", {"a.txt": b"alpha", "d/b.bin": b"\x00" * 3000})
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws", None)
    assert {rel.as_posix(): e.digest for rel, e in manifest.items()} == {
        "a.txt": sha(b"alpha"),
        "d/b.bin": sha(b"\x00" * 3000),
    }


def test_settle_marks_entries_stamped_at_or_after_the_clock_as_racy(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    st = (tmp_path / "f").stat()
    old = ManifestEntry(FileSignature(1, 0, st.st_ctime_ns - 10**9, 1), "c", "d")
    future = ManifestEntry(FileSignature(1, 0, fs_clock(tmp_path) + 3600 * 10**9, 2), "c", "d")
    settled = settle(
        tmp_path, {PurePosixPath("old"): old, PurePosixPath("new"): future}, wait_seconds=0
    )
    assert settled[PurePosixPath("old")].racy is False
    assert settled[PurePosixPath("new")].racy is True


def test_settle_waits_for_the_clock_rather_than_flag_many_bytes_racy(tmp_path: Path) -> None:
    now = fs_clock(tmp_path)
    big = ManifestEntry(FileSignature(64 * MiB, 0, now, 1), "c", "d")
    settled = settle(tmp_path, {PurePosixPath("big"): big}, read_bytes=MiB, wait_seconds=1.0)
    assert settled[PurePosixPath("big")].racy is False
    assert fs_clock(tmp_path) > now


def test_file_system_clock_is_not_behind_a_file_written_before_it(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert fs_clock(tmp_path) >= (tmp_path / "f").stat().st_ctime_ns
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]  # the probe is gone


# --- serving -------------------------------------------------------------------------------


def test_a_second_materialize_is_served_from_the_cache_with_the_same_bytes(
    tmp_path: Path,
) -> None:
    store = FakeLakeFS()
    files = {"a.txt": b"alpha", "d/b.bin": os.urandom(3 * MiB)}
    ref = store.commit("r", files)
    cache = ObjectCache(tmp_path / "cache", 64 * MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws1", cache)
    assert cache.adopt(manifest, tmp_path / "ws1") == 2
    shutil.rmtree(tmp_path / "ws1")
    store.downloads = 0

    again, hits = run_materialize(store, "r", ref, tmp_path / "ws2", cache)

    assert (hits, store.downloads) == (2, 0)
    assert tree_of(tmp_path / "ws2") == files
    assert {e.digest for e in again.values()} == {sha(v) for v in files.values()}


def test_served_files_are_private_copies_of_the_entry(tmp_path: Path) -> None:
    store = FakeLakeFS()
    ref = store.commit("r", {"a.txt": b"alpha"})
    cache = ObjectCache(tmp_path / "cache", MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws0", cache)
    cache.adopt(manifest, tmp_path / "ws0")
    shutil.rmtree(tmp_path / "ws0")
    run_materialize(store, "r", ref, tmp_path / "a", cache)
    run_materialize(store, "r", ref, tmp_path / "b", cache)

    edit_keep_mtime(tmp_path / "a" / "a.txt")  # attempt A writes its input in place

    assert (tmp_path / "b" / "a.txt").read_bytes() == b"alpha"
    _, hits = run_materialize(store, "r", ref, tmp_path / "c", cache)
    assert hits == 1
    assert (tmp_path / "c" / "a.txt").read_bytes() == b"alpha"


def test_an_entry_written_after_adoption_is_never_served_and_is_evicted(tmp_path: Path) -> None:
    store = FakeLakeFS()
    ref = store.commit("r", {"a.txt": b"alpha"})
    cache = ObjectCache(tmp_path / "cache", MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "kept", cache)
    cache.adopt(manifest, tmp_path / "kept")
    # A kept (failed) workspace shares its inode with the entry; someone edits it later.
    edit_keep_mtime(tmp_path / "kept" / "a.txt")
    store.downloads = 0

    _, hits = run_materialize(store, "r", ref, tmp_path / "next", cache)

    assert (tmp_path / "next" / "a.txt").read_bytes() == b"alpha"
    assert (hits, store.downloads) == (0, 1)
    assert cache.total_bytes == 0


def test_a_file_the_handler_edited_in_place_with_its_mtime_restored_is_not_adopted(
    tmp_path: Path,
) -> None:
    store = FakeLakeFS()
    ref = store.commit("r", {"a.txt": b"alpha", "b.txt": b"bravo"})
    cache = ObjectCache(tmp_path / "cache", MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws", cache)
    edit_keep_mtime(tmp_path / "ws" / "a.txt")

    assert cache.adopt(manifest, tmp_path / "ws") == 1  # b.txt only
    assert cache.total_bytes == len(b"bravo")


def test_a_racy_entry_is_adopted_only_if_its_bytes_still_hash_to_its_digest(
    tmp_path: Path,
) -> None:
    store = FakeLakeFS()
    ref = store.commit("r", {"a.txt": b"alpha", "b.txt": b"bravo"})
    cache = ObjectCache(tmp_path / "cache", MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws", cache)
    a, b = PurePosixPath("a.txt"), PurePosixPath("b.txt")
    # Both racy (an edit in their clock tick would not show); a's bytes are not its digest's.
    manifest = {
        a: replace(manifest[a], racy=True, digest=sha(b"ALPHA")),
        b: replace(manifest[b], racy=True),
    }
    assert cache.adopt(manifest, tmp_path / "ws") == 1
    assert cache.total_bytes == len(b"bravo")


def test_link_mode_is_refused_with_an_error_naming_copy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'link' was removed.*use 'copy'"):
        ObjectCache(tmp_path / "cache", MiB, "link")
    with pytest.raises(ValidationError, match=r"'link' was removed.*use 'copy'"):
        Settings(cache_mode="link")  # type: ignore[arg-type]
    assert Settings(cache_mode="copy").cache_mode == "copy"


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    ["another repository", "the same repository name on another server", "a re-created repository"],
)
def test_objects_with_one_checksum_size_and_mtime_in_two_scopes_never_share_an_entry(
    tmp_path: Path, other: str
) -> None:
    first = FakeLakeFS()
    second = first if other != "the same repository name on another server" else FakeLakeFS()
    if second is not first:
        second.endpoint = "http://other-lakefs.test"
    repo_b = "b" if other == "another repository" else "a"
    # One ETag for two contents (e.g. from two buckets): only the scope tells them apart.
    ref_a = first.commit("a", {"x.bin": b"AAAA"}, checksum="etag-1")
    cache = ObjectCache(tmp_path / "cache", MiB)
    manifest, _ = run_materialize(first, "a", ref_a, tmp_path / "ws-a", cache)
    cache.adopt(manifest, tmp_path / "ws-a")
    if other == "a re-created repository":
        materialize_module._SCOPES.clear()  # the scope is looked up again after its TTL
        first.repositories["a"] = ("local://a-2", 2)
    second.clock = itertools.count(1_700_000_000)  # the same mtime too
    ref_b = second.commit(repo_b, {"x.bin": b"BBBB"}, checksum="etag-1")

    _, hits = run_materialize(second, repo_b, ref_b, tmp_path / "ws-b", cache)

    assert (tmp_path / "ws-b" / "x.bin").read_bytes() == b"BBBB"
    assert hits == 0


# --- the bound -----------------------------------------------------------------------------


def _adopt_in_child(folder: str, workdir: str, count: int, size: int, max_bytes: int) -> None:
    root = Path(workdir)
    root.mkdir(parents=True)
    manifest: Manifest = {}
    for i in range(count):
        data = os.urandom(size)
        path = root / f"f{i}"
        path.write_bytes(data)
        manifest[PurePosixPath(f"f{i}")] = ManifestEntry(
            FileSignature.of(path.stat()),
            checksum=f"{workdir}-{i}",
            digest=sha(data),
            cache_key=ObjectCache.key("scope", f"{workdir}-{i}", size, 0),
        )
    cache = ObjectCache(Path(folder), max_bytes)
    for rel, entry in manifest.items():  # one adoption per file: the most interleaving
        cache.adopt({rel: entry}, root)


def _bytes_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "blobs").rglob("*") if p.is_file())


def test_the_size_bound_holds_for_several_processes_sharing_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    max_bytes = MiB
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(
            target=_adopt_in_child,
            args=(str(folder), str(tmp_path / f"ws{i}"), 12, 100 * 1024, max_bytes),
        )
        for i in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0

    on_disk = _bytes_on_disk(folder)
    assert 0 < on_disk <= max_bytes
    assert ObjectCache(folder, max_bytes).total_bytes == on_disk


def blob_of(folder: Path, digest: str) -> Path:
    return folder / "blobs" / digest[:2] / digest[2:]


def test_eviction_removes_the_least_recently_served_entries_first(tmp_path: Path) -> None:
    store = FakeLakeFS()
    folder = tmp_path / "cache"
    ref = store.commit("r", {f"f{i}": os.urandom(300 * 1024) for i in range(3)})
    cache = ObjectCache(folder, MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws0", cache)
    cache.adopt(manifest, tmp_path / "ws0")
    for age, rel in enumerate(sorted(manifest)):  # last used: f0 first, then f1, then f2
        os.utime(blob_of(folder, manifest[rel].digest), ns=(age * 10**9, age * 10**9))
    only_f0 = store.commit("r", {}, parent=ref, deleted=("f1", "f2"))
    run_materialize(store, "r", only_f0, tmp_path / "ws1", cache)  # f0 served: now the newest
    new = store.commit("r", {"g": os.urandom(300 * 1024)})
    more, _ = run_materialize(store, "r", new, tmp_path / "ws2", cache)

    cache.adopt(more, tmp_path / "ws2")  # 1.2 MiB > 1 MiB: room is made

    assert not blob_of(folder, manifest[PurePosixPath("f1")].digest).exists()
    for kept in ("f0", "f2"):
        assert blob_of(folder, manifest[PurePosixPath(kept)].digest).exists()
    assert _bytes_on_disk(folder) <= MiB


def test_opening_a_cache_counts_its_bytes_from_disk_and_drops_the_old_layout(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "cache"
    old = folder / "ab" / "cdef"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"unverified entry of the previous layout")
    store = FakeLakeFS()
    ref = store.commit("r", {"a": b"12345"})
    cache = ObjectCache(folder, MiB)
    manifest, _ = run_materialize(store, "r", ref, tmp_path / "ws", cache)
    cache.adopt(manifest, tmp_path / "ws")
    (folder / "total").write_text("999999")  # a process died mid-way: the count is off

    assert ObjectCache(folder, MiB).total_bytes == 5
    assert not old.exists()


# --- the property --------------------------------------------------------------------------

KEYS = ["a.txt", "b/c.bin", "b/d.bin", "e"]
ACTIONS = [
    "rewrite_same",
    "rewrite_same_new_inode",
    "edit_keep_mtime",
    "edit",
    "copystat_edit",
    "truncate",
    "append",
    "delete",
    "chmod",
    "hardlink_and_edit_through_it",
    "touch",
    "add",
]


def act(root: Path, action: str, pick: int, step: int) -> None:
    """One thing a handler may do to its workspace."""
    present = sorted(scan(root))
    if action == "add" or not present:
        (root / f"new-{step}.txt").write_bytes(os.urandom(pick % 7))
        return
    path = root / present[pick % len(present)]
    data = path.read_bytes()
    if action == "rewrite_same":
        path.write_bytes(data)
    elif action == "rewrite_same_new_inode":
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    elif action == "edit_keep_mtime" and data:
        edit_keep_mtime(path)
    elif action == "edit" and data:
        with path.open("r+b") as fh:
            fh.write(bytes([data[-1] ^ 0x01]))
    elif action == "copystat_edit" and data:
        reference = root.parent / "reference"
        shutil.copy2(path, reference)
        with path.open("r+b") as fh:
            fh.write(bytes([data[0] ^ 0x10]))
        shutil.copystat(reference, path)
        reference.unlink()
    elif action == "truncate":
        os.truncate(path, len(data) // 2)
    elif action == "append":
        with path.open("ab") as fh:
            fh.write(b"+")
    elif action == "delete":
        path.unlink()
    elif action == "chmod":
        path.chmod(0o400)
    elif action == "hardlink_and_edit_through_it" and data:
        alias = path.with_name(path.name + ".alias")
        if not alias.exists():
            os.link(path, alias)
            edit_keep_mtime(alias)
    elif action == "touch":
        os.utime(path)


_EXAMPLES = itertools.count()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.dictionaries(st.sampled_from(KEYS), st.binary(max_size=48), min_size=1),
    steps=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 50)), min_size=1, max_size=6),
    verify=st.sampled_from(["stat", "hash"]),
    warm=st.booleans(),
)
def test_whatever_a_handler_does_the_next_attempt_materializes_exactly_the_committed_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    files: dict[str, bytes],
    steps: list[tuple[str, int]],
    verify: str,
    warm: bool,
) -> None:
    """Publish what the diff says, feed the cache, then materialize both commits again.

    Holds for both verify modes: the published commit is exactly what the handler left
    (no change lost, no identical file uploaded), and every later materialize, from the
    cache or not, yields exactly the committed bytes of the ref it asks for.
    """
    base = tmp_path_factory.mktemp(f"prop{next(_EXAMPLES)}")
    store = FakeLakeFS()
    cache = ObjectCache(base / "cache", MiB)
    before = store.commit("r", files)
    if warm:
        warm_manifest, _ = run_materialize(store, "r", before, base / "ws0", cache)
        cache.adopt(warm_manifest, base / "ws0")
        shutil.rmtree(base / "ws0")

    root = base / "ws1"
    manifest, _ = run_materialize(store, "r", before, root, cache)
    for step, (action, pick) in enumerate(steps):
        act(root, action, pick, step)
    left = tree_of(root)
    changes = diff(manifest, scan(root), root, verify=verify)  # type: ignore[arg-type]
    uploads = {f.rel.as_posix(): left[f.rel.as_posix()] for f in changes.uploads}
    after = store.commit(
        "r", uploads, parent=before, deleted=tuple(r.as_posix() for r in changes.deleted)
    )
    cache.adopt(manifest, root)
    shutil.rmtree(root)

    assert store.tree(after) == left
    assert all(files.get(key) != data for key, data in uploads.items())
    for n, ref in enumerate((after, before, after)):
        again = base / f"again{n}"
        run_materialize(store, "r", ref, again, cache)
        assert tree_of(again) == store.tree(ref)
        shutil.rmtree(again)
