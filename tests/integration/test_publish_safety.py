"""What is published is exactly what was scanned, from inside the root; reasons are safe to show.

Real lakeFS and Conductor, an in-process worker. A handler's leftover thread that swaps a
scanned file for a link (or another file) after the scan publishes nothing; two spellings
of one name are refused naming both; a reason never carries a configured secret, never
raw server JSON, and keeps its cause when it is shortened.
"""

from __future__ import annotations

import os
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from perago_testing import (
    InProcessWorker,
    keys_at,
    read,
    seed,
    suffix,
    task_of,
    workspace,
)
from perago_worker import TaskContext, Worker, WorkspaceSpec, publish
from perago_worker import attempt as attempt_module
from perago_worker.changes import diff, scan
from perago_worker.contract import MAX_REASON, TaskFailure, bound_reason
from perago_worker.fences import STAGING_PREFIX
from perago_worker.lakefs import LakeFS, SourceChanged, Transfers

S, S_PORTABLE = suffix(), suffix()
TOKEN = "tok-7Hq2ZxW9pLm4Rv8Ks1Nd"  # a configured handler secret
NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
assert NFC != NFD

# The scan hook (see `swaps_after_the_scan`) and a handler's leftover thread meet here.
SCANNED, SWAPPED = threading.Event(), threading.Event()
RAN: list[str] = []  # workflow ids of the handler runs


class Params(BaseModel):
    files: dict[str, str] = {}  # path -> content, written by the handler
    swap: Literal["", "file", "folder", "hardlink"] = ""  # what the leftover thread does
    host: str = ""  # the host file it swaps in
    fail: str = ""  # raise with this text ({token} is the configured secret)


class Result(BaseModel):
    written: int


def _leftover(root: Path, swap: str, host: Path) -> None:
    """What a thread the handler left behind does once the scan is over."""
    if not SCANNED.wait(60):
        return
    try:
        victim = root / "out" / "victim.txt"
        if swap == "file":
            (root / "out" / ".link").symlink_to(host)
            os.replace(root / "out" / ".link", victim)
        elif swap == "folder":
            os.rename(root / "out", root / "out.old")
            (root / "out").symlink_to(host.parent, target_is_directory=True)
        elif swap == "hardlink":
            os.link(host, root / "out" / ".link")
            os.replace(root / "out" / ".link", victim)
    finally:
        SWAPPED.set()


def handle(ctx: TaskContext, params: Params) -> Result:
    RAN.append(ctx.workflow_id)
    root = ctx.workspace.root
    for rel, content in params.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    if params.swap:
        threading.Thread(
            target=_leftover, args=(root, params.swap, Path(params.host)), daemon=True
        ).start()
    if params.fail:
        raise ValueError(params.fail.format(token=ctx.config("API_TOKEN")))
    return Result(written=len(params.files))


def build_app(s: str) -> Worker:
    app = Worker()
    app.task(f"publish_{s}", workspace=WorkspaceSpec())(handle)
    return app


@pytest.fixture(scope="module")
def worker(start_worker: Any, repo: str) -> InProcessWorker:
    return start_worker(
        build_app(S), allowed_repositories=[repo], handler_secrets={"API_TOKEN": TOKEN}
    )


@pytest.fixture(scope="module")
def portable(start_worker: Any, repo: str) -> InProcessWorker:
    return start_worker(build_app(S_PORTABLE), allowed_repositories=[repo], portable_names=True)


@pytest.fixture(scope="module")
def base(lakefs: LakeFS, repo: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return seed(lakefs, repo, {"same.txt": b"base\n"}, tmp_path_factory.mktemp("seed"))


@pytest.fixture
def branch(lakefs: LakeFS, repo: str, base: str) -> str:
    name = f"b-{suffix()}"
    lakefs.create_branch(repo, name, base, hidden=False)
    return name


@pytest.fixture
def swaps_after_the_scan(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The attempt's scan, then a pause until the handler's leftover thread has acted.

    Deterministic stand-in for the race: whatever the leftover does lands between the scan
    and the upload, the window that the publish must close.
    """
    SCANNED.clear()
    SWAPPED.clear()
    real = attempt_module.scan

    def scan_then_let_leftovers_act(root: Path) -> dict[PurePosixPath, os.stat_result]:
        found = real(root)
        SCANNED.set()
        assert SWAPPED.wait(60), "the leftover thread never acted"
        return found

    monkeypatch.setattr(attempt_module, "scan", scan_then_let_leftovers_act)
    yield
    SCANNED.set()  # release a leftover still waiting


def run(worker: InProcessWorker, repo: str, ref: str, branch: str, **params: Any) -> Any:
    task_type = next(iter(worker.app.tasks))
    return worker.run(task_type, {"workspace": workspace(repo, ref, branch), "params": params})


def failed(run: Any, status: str, *fragments: str) -> str:
    task = task_of(run)
    reason = task.reason_for_incompletion or ""
    assert (run.status, task.status) == ("FAILED", status), reason
    for fragment in fragments:
        assert fragment in reason, reason
    assert len(reason) <= MAX_REASON
    return reason


def every_object(lakefs: LakeFS, repo: str, tmp: Path) -> Iterator[tuple[str, str, bytes]]:
    """(branch, key, bytes) of every object on every branch, hidden ones included."""
    for name, head in lakefs.list_branches(repo, ""):
        for key in keys_at(lakefs, repo, head):
            yield name, key, read(lakefs, repo, head, key, tmp)


# -- (a) a file changed after the scan --------------------------------------------------


@pytest.mark.parametrize(
    ("swap", "how"),
    [
        ("file", "is a link or not a folder"),
        ("folder", "is a link or not a folder"),
        ("hardlink", "another file is in its place"),
    ],
    ids=["file-becomes-symlink", "folder-becomes-symlink", "file-becomes-hard-link"],
)
def test_a_host_file_swapped_in_after_the_scan_is_never_published(
    worker: InProcessWorker,
    lakefs: LakeFS,
    repo: str,
    base: str,
    branch: str,
    tmp_path: Path,
    swaps_after_the_scan: None,
    swap: str,
    how: str,
) -> None:
    # Before this fix the upload reopened each file by path, following the link (or taking
    # whatever inode the name held): the host's bytes were uploaded, committed and merged,
    # and the task COMPLETED.
    host_bytes = f"HOST FILE {suffix()}"
    host = tmp_path / "host" / "victim.txt"  # same file system as the scratch root
    host.parent.mkdir()
    host.write_text(host_bytes)
    (host.parent / "other.txt").write_text("fine")  # so a swapped folder has every name
    result = run(
        worker,
        repo,
        base,
        branch,
        files={"out/victim.txt": "handler bytes", "out/other.txt": "fine"},
        swap=swap,
        host=str(host),
    )

    reason = failed(
        result,
        "FAILED_WITH_TERMINAL_ERROR",
        "unpublishable: out/victim.txt: changed after the scan",
        how,
        "nothing was published",
    )
    assert "HOST FILE" not in reason
    assert lakefs.branch_head(repo, branch) == base
    assert not list(lakefs.list_branches(repo, STAGING_PREFIX))
    leaked = [
        (b, k) for b, k, data in every_object(lakefs, repo, tmp_path) if data == host_bytes.encode()
    ]
    assert leaked == []


def test_a_file_written_to_while_it_is_uploaded_fails_the_stage(
    lakefs: LakeFS,
    repo: str,
    base: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "grows.txt").write_text("first part")
    scanned = scan(root)
    real_upload = lakefs.transfers.upload

    def upload_while_a_writer_appends(*args: Any, **kwargs: Any) -> str:
        checksum = real_upload(*args, **kwargs)
        with (root / "grows.txt").open("a") as writer:
            writer.write(" and more")
        return checksum

    monkeypatch.setattr(lakefs.transfers, "upload", upload_while_a_writer_appends)
    staging = f"{STAGING_PREFIX}direct-{suffix()}"
    try:
        with pytest.raises(TaskFailure) as caught:
            publish.stage(
                lakefs,
                repo,
                base,
                staging,
                "",
                root,
                diff({}, scanned),
                scanned=scanned,
                concurrency=2,
            )
    finally:
        lakefs.delete_branch(repo, staging)
    assert caught.value.kind.value == "unpublishable"
    assert caught.value.reason == (
        "unpublishable: grows.txt: changed after the scan (it was written to while it was "
        "uploaded); nothing was published"
    )


# -- every data plane uploads exactly the checked bytes of an open file ---------------------


@pytest.fixture
def scratch_branch(lakefs: LakeFS, repo: str, base: str) -> Iterator[str]:
    name = f"up-{suffix()}"
    lakefs.create_branch(repo, name, base, hidden=True)
    yield name
    lakefs.delete_branch(repo, name)


def test_upload_sends_the_expected_bytes_of_a_descriptor_from_its_start(
    lakefs: LakeFS, transfers: Transfers, repo: str, scratch_branch: str, tmp_path: Path
) -> None:
    source = tmp_path / "body.bin"
    source.write_bytes(b"0123456789")
    with source.open("rb") as body:
        body.seek(0, os.SEEK_END)  # the file position is not used
        transfers.upload(repo, scratch_branch, "up/body.bin", body.fileno(), 10)
    assert read(lakefs, repo, scratch_branch, "up/body.bin", tmp_path) == b"0123456789"


def test_upload_of_a_file_shorter_than_expected_stores_nothing(
    lakefs: LakeFS, transfers: Transfers, repo: str, scratch_branch: str, tmp_path: Path
) -> None:
    source = tmp_path / "short.bin"
    source.write_bytes(b"only 12 byte")
    fd = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(SourceChanged, match="ended at 12 of 4096 bytes"):
            transfers.upload(repo, scratch_branch, "up/short.bin", fd, 4096)
        assert "up/short.bin" not in keys_at(lakefs, repo, scratch_branch, "up/")
        transfers.upload(repo, scratch_branch, "up/short.bin", fd, 12)  # the client still works
    finally:
        os.close(fd)
    assert read(lakefs, repo, scratch_branch, "up/short.bin", tmp_path) == b"only 12 byte"


# -- (b) two spellings of one name ---------------------------------------------------------


def test_keys_equal_under_unicode_normalization_are_refused_before_the_handler_runs(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, branch: str, tmp_path: Path
) -> None:
    ref = seed(lakefs, repo, {f"in/{NFC}.txt": b"one", f"in/{NFD}.txt": b"two"}, tmp_path, branch)
    result = run(worker, repo, ref, branch, files={"out.txt": "x"})

    failed(
        result,
        "FAILED_WITH_TERMINAL_ERROR",
        "unsafe_key: object keys 'in/cafe\\u0301.txt' and 'in/caf\\xe9.txt' are the same name "
        "under Unicode normalization (NFC)",
    )
    assert result.workflow_id not in RAN
    assert lakefs.branch_head(repo, branch) == ref


def test_a_handler_leaving_two_spellings_of_one_name_publishes_nothing(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, branch: str
) -> None:
    result = run(worker, repo, base, branch, files={f"{NFC}/a.txt": "1", f"{NFD}/b.txt": "2"})

    failed(
        result,
        "FAILED_WITH_TERMINAL_ERROR",
        "unpublishable: files 'cafe\\u0301/b.txt' and 'caf\\xe9/a.txt' lie in folders "
        "'cafe\\u0301' and 'caf\\xe9', the same name under Unicode normalization (NFC)",
        "nothing was published",
    )
    assert lakefs.branch_head(repo, branch) == base


def test_names_differing_only_in_case_are_published_by_default(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, branch: str
) -> None:
    result = run(worker, repo, base, branch, files={"Readme.md": "a", "README.md": "b"})

    assert result.status == "COMPLETED", task_of(result).reason_for_incompletion
    out = task_of(result).output_data["workspace"]["ref"]
    assert {"Readme.md", "README.md"} <= keys_at(lakefs, repo, out)


def test_portable_names_refuses_keys_differing_only_in_case(
    portable: InProcessWorker, lakefs: LakeFS, repo: str, branch: str, tmp_path: Path
) -> None:
    ref = seed(lakefs, repo, {"Docs/a.txt": b"a", "docs/b.txt": b"b"}, tmp_path, branch)
    result = run(portable, repo, ref, branch)

    failed(
        result,
        "FAILED_WITH_TERMINAL_ERROR",
        "unsafe_key: object keys 'Docs/a.txt' and 'docs/b.txt' lie in folders 'Docs' and "
        "'docs', the same name ignoring case",
    )
    assert result.workflow_id not in RAN


def test_portable_names_refuses_output_files_differing_only_in_case(
    portable: InProcessWorker, lakefs: LakeFS, repo: str, base: str, branch: str
) -> None:
    result = run(portable, repo, base, branch, files={"Readme.md": "a", "README.md": "b"})

    failed(
        result,
        "FAILED_WITH_TERMINAL_ERROR",
        "unpublishable: files 'README.md' and 'Readme.md' are the same name ignoring case",
    )
    assert lakefs.branch_head(repo, branch) == base


# -- (c), (d) reasons: masked, readable, bounded keeping the cause -------------------------


def test_a_secret_in_a_handler_exception_never_reaches_conductor(
    worker: InProcessWorker, repo: str, base: str, branch: str
) -> None:
    result = run(worker, repo, base, branch, fail="login with {token} refused")

    reason = failed(result, "FAILED", "handler_error: ValueError: login with ********** refused")
    assert TOKEN not in reason


def test_no_piece_of_a_secret_reaches_conductor_when_the_reason_is_shortened_through_it(
    worker: InProcessWorker, repo: str, base: str, branch: str
) -> None:
    cap = MAX_REASON - len("handler_error: ValueError: ")  # the one long word's share
    message = "a" * (cap - 1 - (cap - 1) // 2 - 6) + "{token}" + "b" * 2000
    shortened = bound_reason("handler_error: ValueError: " + message.format(token=TOKEN))
    assert TOKEN[:6] + "…" in shortened, "the premise: the bound cuts through the secret"
    result = run(worker, repo, base, branch, fail=message)

    reason = failed(result, "FAILED", "handler_error: ValueError: aaa", "*…bbb")
    assert [i for i in range(len(TOKEN) - 3) if TOKEN[i : i + 4] in reason] == []


def test_a_merge_conflict_reason_reads_as_a_sentence_not_server_json(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, base: str, branch: str
) -> None:
    first = run(worker, repo, base, branch, files={"same.txt": "first"})
    assert first.status == "COMPLETED", task_of(first).reason_for_incompletion
    second = run(worker, repo, base, branch, files={"same.txt": "second"})

    reason = failed(second, "FAILED_WITH_TERMINAL_ERROR")
    assert reason == (
        f"merge_conflict: merging into branch {branch!r} conflicts on same.txt "
        "(lakeFS: conflict found); nothing was published"
    )


def test_a_1024_byte_key_failure_keeps_its_cause(
    worker: InProcessWorker, lakefs: LakeFS, repo: str, branch: str, tmp_path: Path
) -> None:
    key = "long/" + "k" * 1019
    assert len(key.encode()) == 1024  # lakeFS's longest key
    ref = seed(lakefs, repo, {key: b"x"}, tmp_path, branch)
    result = run(worker, repo, ref, branch)

    reason = failed(result, "FAILED_WITH_TERMINAL_ERROR", "has a segment longer than 255 bytes")
    assert reason.startswith("unsafe_key: object key 'long/kkk")
    assert reason.endswith(f"it cannot be materialized safely (repository {repo!r} at {ref[:12]})")
    assert "kkk…kkk" in reason
