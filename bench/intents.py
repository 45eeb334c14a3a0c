"""Intent branches at scale: claim, adopt, release and gc latency with 100 to 10,000 intents.

    source /tmp/stack.env   # a running stack (python -m perago_worker.devstack up ...)
    .venv/bin/python bench/intents.py --stack-from-env [--counts 100,1000,10000]
                                      [--samples 100] [--rounds 3] [--gc-runs 3]
                                      [--gc-runs-last 1] [--out FILE]

Why: every workspace attempt that publishes leaves its intent branch (`perago-intent-<key>`)
behind, the publish fence's first memory; gc frees one only when Conductor no longer knows
its workflow, or the workflow is terminal and the intent older than `intent_older_than`
(7 days). A busy repository therefore holds thousands of hidden branches, and every attempt
looks one up (`existing_intent`), creates one (`claim`) or, on a terminal merge failure,
deletes one (`release_intent`). This bench answers whether those steps, and gc, get slower
as the branches pile up.

In one new repository it creates intent branches the way the worker does: each intent is
`publish.claim` of a real `Execution` (slot and execution key from `fences`, so the names
are the real ones) at a staged commit of its own that carries the worker's provenance
metadata (`perago.workflow_id`, the execution key, a result). Commits are made on a few
hidden source branches in parallel threads (allow-empty: what a commit holds does not matter
to a branch lookup or to gc, which reads only the commit's metadata and date). The
population grows to each count in turn; at each count, for `rounds` rounds of `samples`:

* **claim**: `publish.claim` of a new execution (a `create_branch`);
* **claim, lost race**: `publish.claim` of an execution that holds an intent (409, then the
  intent's head);
* **adopt (hit / miss)**: `publish.existing_intent` for an existing execution, and for one
  that never claimed (404);
* **published**: `execution.published`, the history check every non-fresh attempt does
  (one log page of the target: independent of the branches, measured as a control);
* **release**: `publish.release_intent` of the round's new claims (the count stays put);
* **listing**: `LakeFS.list_branches` of the intent prefix (what gc pages through, 1,000
  a page) and of the staging prefix (gc's other listing, which the intents must not slow).

Then `gc.collect` against the real Conductor, `intent_older_than=0`. The intents' workflow
ids are fresh UUIDs, which Conductor answers 404 for: the answer that lets gc delete, so
every intent costs gc its full work (a `get_commit` for the workflow id and age, one
Conductor call). `dry_run=True` is the scan (everything but the deletes), `gc-runs` times
(`gc-runs-last` at the largest count, where one scan takes minutes); after the last count
one real pass deletes them all (the scan plus one `delete_branch`
each). Every lakeFS and Conductor call gc makes is timed, so the report says which server
bounds it.

Last, an interleaved stage (`--ab-rounds`): a second new repository gets the smallest
count of intents, and claim, adopt and release alternate between it and the largest
population round by round, so both are measured under the same load (on a shared machine the
load drifts by 2x within minutes, which the per-count figures cannot tell from growth).

Figures are medians (and p95) over all samples of a count; the machine is shared, so the
load average is printed with the results.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lakefs_sdk

from perago_worker import fences, gc, publish
from perago_worker.conductor import Conductor
from perago_worker.devstack.servers import Endpoints, Stack, endpoints_from_env, start_stack
from perago_worker.execution import Execution, published
from perago_worker.lakefs import LakeFS

T = TypeVar("T")
TASK_TYPE = "bench_intents"
REFERENCE = "only"
BRANCH = "main"
PREFIX = "data/"


def log(message: str) -> None:
    print(f"[intents {time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def new_execution(repository: str, workflow_id: str | None = None) -> Execution:
    """A real `Execution` of a first attempt: the key and intent name the worker derives."""
    workflow_id = workflow_id or str(uuid.uuid4())
    target = fences.Target(repository, BRANCH, PREFIX)
    now_ms = int(time.time() * 1000)
    root = fences.Incarnation(str(uuid.uuid4()), 0, now_ms, now_ms)
    slot = fences.slot_key(workflow_id, REFERENCE, TASK_TYPE, target)
    key = fences.execution_key(slot, root)
    # not_before as `execution.resolve` sets it: the root's scheduled time less the skew.
    return Execution(key, slot, root, target, BRANCH, now_ms / 1000 - 300)


def staged_metadata(execution: Execution, workflow_id: str) -> dict[str, str]:
    """The metadata keys a staged commit carries (attempt `_provenance` + the execution)."""
    return {
        gc.WORKFLOW_ID_KEY: workflow_id,
        "perago.task_id": execution.root.task_id,
        "perago.task_type": TASK_TYPE,
        "perago.reference_name": REFERENCE,
        "perago.retry_count": "0",
        "perago.attempt": "1",
        "perago.worker_id": "bench-intents",
        fences.META_TOKEN: fences.delivery_token("bench-intents"),
        "perago.input_ref": BRANCH,
        "perago.environment": "bench",
        fences.META_EXECUTION: execution.key,
        fences.META_RESULT: '{"rows":1}',
    }


@dataclass
class Intent:
    execution: Execution
    commit: str


@dataclass
class Population:
    """The intents of the repository, grown by `grow` in parallel threads."""

    lakefs: LakeFS
    repository: str
    threads: int
    intents: list[Intent] = field(default_factory=list)
    setup_seconds: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def source(self, index: int) -> str:
        return f"bench-src-{index}"

    def prepare(self) -> None:
        for i in range(self.threads):
            self.lakefs.create_branch(self.repository, self.source(i), BRANCH, hidden=True)

    def _make(self, source: str, n: int) -> list[Intent]:
        made = []
        for _ in range(n):
            workflow_id = str(uuid.uuid4())  # Conductor answers 404: gc may delete it
            execution = new_execution(self.repository, workflow_id)
            commit = self.lakefs.call(
                self.lakefs.commits.commit,
                self.repository,
                source,
                lakefs_sdk.CommitCreation(
                    message=f"perago: {TASK_TYPE} ({REFERENCE}) in workflow {workflow_id}",
                    metadata=staged_metadata(execution, workflow_id),
                    allow_empty=True,
                ),
            ).id
            claimed = publish.claim(self.lakefs, execution, commit)
            assert claimed == commit, "a fresh execution's claim is its own"
            made.append(Intent(execution, commit))
        return made

    def grow(self, count: int) -> None:
        missing = count - len(self.intents)
        if missing <= 0:
            return
        started = time.monotonic()
        shares = [
            missing // self.threads + (i < missing % self.threads) for i in range(self.threads)
        ]
        with ThreadPoolExecutor(self.threads, thread_name_prefix="grow") as pool:
            parts = list(
                pool.map(self._make, [self.source(i) for i in range(self.threads)], shares)
            )
        for part in parts:
            self.intents.extend(part)
        seconds = time.monotonic() - started
        self.setup_seconds[count] = seconds
        log(f"grew to {len(self.intents)} intents: {missing} in {seconds:.1f} s "
            f"({missing / seconds:.0f}/s, {self.threads} threads)")  # fmt: skip


def branch_names(lakefs: LakeFS, repository: str, prefix: str) -> list[str]:
    """Every branch under `prefix`, paged as gc pages (`LakeFS.list_branches`)."""
    return [name for name, _head in lakefs.list_branches(repository, prefix)]


def timed(fn: Callable[[], T], into: list[float]) -> T:
    started = time.perf_counter()
    result = fn()
    into.append((time.perf_counter() - started) * 1000)
    return result


@dataclass
class CallTimes:
    """Seconds and calls per SDK method, for every call that goes through a client's `call`."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            self.calls[name] = self.calls.get(name, 0) + 1

    def total(self) -> float:
        return sum(self.seconds.values())


@contextmanager
def timing_calls(client: LakeFS | Conductor, into: CallTimes) -> Iterator[None]:
    """Time every `client.call(fn, ...)` (both adapters route each request through it)."""
    original = client.call

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", repr(fn))
        if name == "<lambda>":  # a raw request wrapped by an adapter method: name that method
            name = sys._getframe(1).f_code.co_name
        started = time.perf_counter()
        try:
            return original(fn, *args, **kwargs)
        finally:
            into.add(name, time.perf_counter() - started)

    client.call = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        del client.call  # the class's method again


@dataclass
class GcRun:
    seconds: float
    intents: int
    lakefs: CallTimes
    conductor: CallTimes


def run_gc(
    lakefs: LakeFS, conductor: Conductor, repository: str, scratch: Path, *, dry_run: bool
) -> GcRun:
    lake, cond = CallTimes(), CallTimes()
    with timing_calls(lakefs, lake), timing_calls(conductor, cond):
        started = time.monotonic()
        report = gc.collect(
            scratch,
            lakefs,
            conductor,
            [repository],
            older_than=3600,
            intent_older_than=0,
            dry_run=dry_run,
        )
        seconds = time.monotonic() - started
    assert not report.unverifiable and not report.kept_live, report.unverifiable_reasons
    return GcRun(seconds, len(report.intent_branches), lake, cond)


@dataclass
class CountFigures:
    count: int
    samples: dict[str, list[float]]  # operation -> milliseconds
    listing: dict[str, list[float]]  # prefix -> milliseconds per full listing
    gc_runs: list[GcRun]


def measure(
    pop: Population,
    conductor: Conductor,
    scratch: Path,
    *,
    samples: int,
    rounds: int,
    gc_runs: int,
) -> CountFigures:
    lakefs, repo = pop.lakefs, pop.repository
    times: dict[str, list[float]] = {
        k: []
        for k in ("claim", "claim_lost_race", "adopt_hit", "adopt_miss", "published", "release")
    }
    listing: dict[str, list[float]] = {"intent": [], "staging": []}
    for _ in range(rounds):
        existing = random.sample(pop.intents, min(samples, len(pop.intents)))
        commits = [i.commit for i in existing]
        fresh = [new_execution(repo) for _ in range(samples)]
        for execution, commit in zip(fresh, itertools.cycle(commits), strict=False):
            claimed = timed(partial(publish.claim, lakefs, execution, commit), times["claim"])
            assert claimed == commit
        for intent in existing:
            other = commits[0] if intent.commit != commits[0] else commits[-1]
            claimed = timed(
                partial(publish.claim, lakefs, intent.execution, other), times["claim_lost_race"]
            )
            assert claimed == intent.commit, "a lost race adopts the intent's commit"
        for intent in existing:
            found = timed(
                partial(publish.existing_intent, lakefs, intent.execution), times["adopt_hit"]
            )
            assert found == intent.commit
        for _ in range(samples):
            never = new_execution(repo)
            found = timed(partial(publish.existing_intent, lakefs, never), times["adopt_miss"])
            assert found is None
        for intent in existing:
            record = timed(partial(published, lakefs, intent.execution), times["published"])
            assert record is None
        for execution in fresh:
            timed(partial(publish.release_intent, lakefs, execution), times["release"])
        for prefix, key in ((fences.INTENT_PREFIX, "intent"), (fences.STAGING_PREFIX, "staging")):
            names = timed(partial(branch_names, lakefs, repo, prefix), listing[key])
            if key == "intent":
                assert len(names) == len(pop.intents), (len(names), len(pop.intents))
    runs = []
    for _ in range(gc_runs):
        run = run_gc(lakefs, conductor, repo, scratch, dry_run=True)
        assert run.intents == len(pop.intents), (run.intents, len(pop.intents))
        runs.append(run)
        log(f"gc scan of {run.intents}: {run.seconds:.1f} s")
    return CountFigures(len(pop.intents), times, listing, runs)


AB_OPS = ("claim", "adopt_hit", "adopt_miss", "release")


def interleaved(
    big: Population, small: Population, *, samples: int, rounds: int
) -> dict[int, dict[str, list[float]]]:
    """The same operations alternately on the largest population and a small one.

    On a shared machine the load drifts by 2x within minutes, so figures taken at different
    counts minutes apart can differ by load alone; alternating the two repositories round by
    round (the order flipped every round) compares them under the same load.
    """
    out: dict[int, dict[str, list[float]]] = {
        len(p.intents): {op: [] for op in AB_OPS} for p in (big, small)
    }
    for rnd in range(rounds):
        for pop in (big, small) if rnd % 2 == 0 else (small, big):
            times = out[len(pop.intents)]
            lakefs, repo = pop.lakefs, pop.repository
            existing = random.sample(pop.intents, min(samples, len(pop.intents)))
            fresh = [new_execution(repo) for _ in existing]
            for execution, intent in zip(fresh, existing, strict=True):
                claimed = timed(
                    partial(publish.claim, lakefs, execution, intent.commit), times["claim"]
                )
                assert claimed == intent.commit
            for intent in existing:
                found = timed(
                    partial(publish.existing_intent, lakefs, intent.execution), times["adopt_hit"]
                )
                assert found == intent.commit
            for _ in existing:
                never = new_execution(repo)
                found = timed(partial(publish.existing_intent, lakefs, never), times["adopt_miss"])
                assert found is None
            for execution in fresh:
                timed(partial(publish.release_intent, lakefs, execution), times["release"])
    return out


def render_interleaved(ab: dict[int, dict[str, list[float]]], load: str) -> str:
    counts = sorted(ab)
    lines = [
        f"Interleaved (the two repositories alternate round by round; load average {load}):",
        "",
        "| measured (ms, p50 / p95) | " + " | ".join(fmt_count(c) for c in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for op in AB_OPS:
        cells = [
            f"{statistics.median(ab[c][op]):.1f} / {percentile(ab[c][op], 0.95):.1f}"
            for c in counts
        ]
        lines.append(f"| {LABELS[op]} | " + " | ".join(cells) + " |")
    n = len(ab[counts[0]]["claim"])
    return "\n".join([*lines, "", f"{n} samples per operation and repository."]) + "\n"


# -- the report -------------------------------------------------------------------------------

LABELS = {
    "claim": "claim (new execution: `create_branch`)",
    "claim_lost_race": "claim, lost race (409 + head)",
    "adopt_hit": "adopt: `existing_intent`, found",
    "adopt_miss": "adopt: `existing_intent`, none (404)",
    "published": "`published` (history check, control)",
    "release": "release (`delete_branch`)",
}


def fmt_count(n: int) -> str:
    return f"{n:,}"


def render(
    figures: list[CountFigures],
    deletion: GcRun | None,
    setup: dict[int, float],
    argv: str,
    loads: list[str],
) -> str:
    counts = [f.count for f in figures]
    head = "| measured (ms, p50 / p95) | " + " | ".join(fmt_count(c) for c in counts) + " |"
    lines = [head, "|---|" + "---|" * len(counts)]
    for op, label in LABELS.items():
        cells = []
        for f in figures:
            values = f.samples[op]
            cells.append(f"{statistics.median(values):.1f} / {percentile(values, 0.95):.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (
        ("intent", "list intent prefix (all pages)"),
        ("staging", "list staging prefix"),
    ):
        cells = [
            f"{statistics.median(f.listing[key]):.1f} / {max(f.listing[key]):.1f} max"
            for f in figures
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n_samples = len(figures[0].samples["claim"]) if figures else 0
    lines += [
        "",
        f"{n_samples} samples per operation and count; listings: one per round.",
        "",
        "| intents | setup (to this count) | gc scan, median | per intent | lakeFS calls | "
        "Conductor calls | lakeFS time | Conductor time | scans |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        if not f.gc_runs:
            lines.append(f"| {fmt_count(f.count)} | {setup.get(f.count, 0.0):.1f} s | (no scan) |")
            continue
        med = statistics.median(r.seconds for r in f.gc_runs)
        mid = sorted(f.gc_runs, key=lambda r: r.seconds)[len(f.gc_runs) // 2]
        lines.append(
            f"| {fmt_count(f.count)} | {setup.get(f.count, 0.0):.1f} s | {med:.2f} s | "
            f"{med / f.count * 1000:.2f} ms | {sum(mid.lakefs.calls.values())} | "
            f"{sum(mid.conductor.calls.values())} | {mid.lakefs.total():.2f} s | "
            f"{mid.conductor.total():.2f} s | "
            + ", ".join(f"{r.seconds:.1f}" for r in f.gc_runs)
            + " s |"
        )
    if deletion is not None:
        lines += [
            "",
            f"Deletion pass (`gc.collect`, not a dry run) of {fmt_count(deletion.intents)} intents: "
            f"{deletion.seconds:.1f} s, {deletion.seconds / max(1, deletion.intents) * 1000:.2f} ms "
            f"per intent; lakeFS {deletion.lakefs.total():.1f} s over "
            f"{sum(deletion.lakefs.calls.values())} calls "
            f"({', '.join(f'{k} {v}' for k, v in sorted(deletion.lakefs.calls.items()))}), "
            f"Conductor {deletion.conductor.total():.1f} s over "
            f"{sum(deletion.conductor.calls.values())} calls.",
        ]
    if figures and figures[-1].gc_runs:
        mid = sorted(figures[-1].gc_runs, key=lambda r: r.seconds)[len(figures[-1].gc_runs) // 2]
        per_call = (
            "; ".join(
                f"{name} {mid.lakefs.calls[name]} calls {mid.lakefs.seconds[name] / mid.lakefs.calls[name] * 1000:.2f} ms"
                for name in sorted(mid.lakefs.calls)
            )
            + "; "
            + "; ".join(
                f"Conductor {name} {mid.conductor.calls[name]} calls "
                f"{mid.conductor.seconds[name] / mid.conductor.calls[name] * 1000:.2f} ms"
                for name in sorted(mid.conductor.calls)
            )
        )
        lines += ["", f"gc scan at {fmt_count(figures[-1].count)}, per call (mean): {per_call}."]
    return (
        f"Command: `{argv}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; load average per count: "
        + "; ".join(loads)
        + ")\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack-from-env", action="store_true",
                        help="use the stack the PERAGO_TEST_* variables name (else start one)")  # fmt: skip
    parser.add_argument("--counts", default="100,1000,10000", help="intent counts, ascending")
    parser.add_argument("--samples", type=int, default=100, help="samples per operation and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gc-runs", type=int, default=3, help="gc scans per count")
    parser.add_argument(
        "--gc-runs-last",
        type=int,
        default=1,
        help="gc scans at the largest count (each takes minutes; the deletion pass follows)",
    )
    parser.add_argument("--threads", type=int, default=8, help="threads creating intents")
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=6,
        help="rounds alternating the largest count with a new repository of the smallest (0: off)",
    )
    parser.add_argument("--keep", action="store_true", help="skip the final deletion pass")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    argv = " ".join([".venv/bin/python bench/intents.py", *sys.argv[1:]])

    work = Path(tempfile.mkdtemp(prefix="intents-bench-"))
    stack: Stack | None = None
    try:
        endpoints: Endpoints | None
        if args.stack_from_env:
            endpoints = endpoints_from_env(os.environ)
            if endpoints is None:
                print(
                    "--stack-from-env: source the env file `devstack up` printed", file=sys.stderr
                )
                return 2
        else:
            stack = start_stack(work / "stack", log=log)
            endpoints = stack.endpoints
        lakefs = LakeFS(
            endpoints.lakefs_url,
            endpoints.lakefs_access_key_id,
            endpoints.lakefs_secret_access_key,
        )
        conductor = Conductor(endpoints.conductor_url)
        repository = f"intents-{uuid.uuid4().hex[:8]}"
        lakefs.create_repository(repository)
        log(f"repository {repository}")
        pop = Population(lakefs, repository, args.threads)
        pop.prepare()
        figures: list[CountFigures] = []
        loads: list[str] = []
        for count in counts:
            pop.grow(count)
            log(f"measuring at {len(pop.intents)} intents")
            figures.append(
                measure(
                    pop,
                    conductor,
                    work / "scratch",
                    samples=args.samples,
                    rounds=args.rounds,
                    gc_runs=args.gc_runs_last if count == counts[-1] else args.gc_runs,
                )
            )
            loads.append(f"{fmt_count(count)}: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
            text = render(figures, None, pop.setup_seconds, argv, loads)
            print(text, flush=True)
        ab_text = ""
        if args.ab_rounds and len(counts) > 1:
            small = Population(lakefs, f"intents-{uuid.uuid4().hex[:8]}", args.threads)
            lakefs.create_repository(small.repository)
            small.prepare()
            small.grow(counts[0])
            log(f"interleaving {len(pop.intents)} and {len(small.intents)} intents")
            ab = interleaved(pop, small, samples=args.samples // 2 or 1, rounds=args.ab_rounds)
            ab_text = render_interleaved(ab, ", ".join(f"{x:.2f}" for x in os.getloadavg()))
            print(ab_text, flush=True)
        deletion = None
        if not args.keep:
            deletion = run_gc(lakefs, conductor, repository, work / "scratch", dry_run=False)
            left = list(lakefs.list_branches(repository, fences.INTENT_PREFIX))
            assert not left, f"{len(left)} intents left after the deletion pass"
            log(f"deletion pass: {deletion.intents} intents in {deletion.seconds:.1f} s")
        text = render(figures, deletion, pop.setup_seconds, argv, loads)
        text += "\n" + ab_text if ab_text else ""
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
