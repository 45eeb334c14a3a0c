"""The docs quote the code: every setting, default, timeout, wait, threshold and order they name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perago_worker.settings import (
    ConductorSettings,
    LakeFSSettings,
    ProxySettings,
    Settings,
    TLSSettings,
    TracingSettings,
)

DOC = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()


def test_every_setting_has_a_row_in_the_configuration_reference() -> None:
    names = [
        f"PERAGO_{n.upper()}"
        for n in Settings.model_fields
        if n not in ("lakefs", "conductor", "tracing", "tls", "proxy")
    ]
    names += [f"PERAGO_TLS__{n.upper()}" for n in TLSSettings.model_fields]
    names += [f"PERAGO_PROXY__{n.upper()}" for n in ProxySettings.model_fields]
    names += [f"PERAGO_LAKEFS__{n.upper()}" for n in LakeFSSettings.model_fields]
    names += [f"PERAGO_CONDUCTOR__{n.upper()}" for n in ConductorSettings.model_fields]
    names += [f"PERAGO_TRACING__{n.upper()}" for n in TracingSettings.model_fields]
    missing = [n for n in names if f"`{n}`" not in DOC]
    assert missing == []


FENCES = (Path(__file__).parents[2] / "docs" / "fences.md").read_text()


def _field_default(model: type, name: str) -> object:
    return model.model_fields[name].default  # type: ignore[attr-defined]


def test_fences_doc_quotes_the_timeouts_and_budgets_the_code_uses() -> None:
    quoted = {
        "`clock_skew_seconds` (300 s by default)": _field_default(Settings, "clock_skew_seconds"),
        "`merge_retry_seconds` (60 s)": _field_default(Settings, "merge_retry_seconds"),
        "`lakefs.request_timeout_seconds`, 60 s": _field_default(
            LakeFSSettings, "request_timeout_seconds"
        ),
        "`conductor.request_timeout_seconds`,\n10 s": _field_default(
            ConductorSettings, "request_timeout_seconds"
        ),
    }
    for phrase, default in quoted.items():
        assert phrase in FENCES, phrase
        number = float(phrase.split("(")[-1].split(",")[-1].split()[0].strip("`"))
        assert number == default, (phrase, default)


def test_fences_doc_quotes_the_chain_depth_token_size_and_intent_age() -> None:
    import inspect

    from perago_worker import execution, fences, gc

    assert "deeper than 1,000" in FENCES and execution.MAX_CHAIN == 1000
    token = fences.delivery_token("w")
    assert "12 random hex digits" in FENCES and len(token.split("#")[1]) == 12
    age = inspect.signature(gc.collect).parameters["intent_older_than"].default
    assert "(7 days by\ndefault)" in FENCES and age == 7 * 86400


def _history_walk_page_sizes() -> list[int]:
    """The `amount` of each log request the history walk (`execution.records`, through the
    real `LakeFS.walk_log`) sends, over a target whose log is one empty page."""
    from types import SimpleNamespace

    from perago_worker import execution
    from perago_worker.fences import Target
    from perago_worker.lakefs import LakeFS

    sent: list[int] = []

    class OnePageLog:
        refs = SimpleNamespace(log_commits=None)
        walk_log = LakeFS.walk_log

        def call(self, fn: object, *args: object, **kwargs: Any) -> object:
            sent.append(kwargs["amount"])
            return SimpleNamespace(results=[], pagination=SimpleNamespace(has_more=False))

    list(execution.records(OnePageLog(), Target("repo", "main", ""), not_before=0))  # type: ignore[arg-type]
    return sent


def test_fences_doc_quotes_the_history_walks_page_size() -> None:
    import re

    quoted = re.findall(r"one log request per (\d+) commits", FENCES)
    assert len(quoted) == 1, quoted
    assert _history_walk_page_sizes() == [int(quoted[0])]


def test_fences_doc_quotes_the_intent_branch_name_and_its_truncation() -> None:
    import re

    from perago_worker import fences

    quoted = re.findall(r"`([\w-]+)<execution key\[:(\d+)\]>`", FENCES)
    assert len(quoted) == 1, quoted
    prefix, kept = quoted[0][0], int(quoted[0][1])
    key = "0123456789abcdef" * 8  # longer than any execution key (sha256: 64 hex digits)
    assert fences.intent_branch(key) == prefix + key[:kept]


def test_fences_doc_quotes_the_lease_factor_and_the_unverifiable_fence_budget() -> None:
    import inspect

    from perago_worker.runner import Runner

    assert "renews at half the timeout" in FENCES
    assert _field_default(Settings, "lease_factor") == 0.5
    assert "(60 s of\n  retries before a merge)" in FENCES
    assert inspect.signature(Runner.is_live).parameters["retry_seconds"].default == 60


# -- the configuration reference: every default is the code's -----------------------------------

ROOT = Path(__file__).parents[2]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
HANDLERS = (ROOT / "docs" / "handlers.md").read_text()
DEPLOYMENT = (ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text()


def _rows(markdown: str) -> list[list[str]]:
    """The cells of every table row of a markdown text."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| `")
    ]


def _documented_default(text: str) -> object:
    """A default as the reference writes it: `none`, `empty`, or a backticked value."""
    import json

    if text == "none":
        return None
    if text == "empty":
        return ""
    value = text.strip("`")
    if value in ("true", "false"):
        return value == "true"
    if value.startswith(("[", "{")):
        return json.loads(value)
    try:
        return float(value)
    except ValueError:
        return value


def _code_default(model: type, name: str) -> object:
    from pydantic import SecretStr

    info = model.model_fields[name]  # type: ignore[attr-defined]
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, bool) or value is None or isinstance(value, str | list | dict):
        return value
    return float(value)


def test_every_default_in_the_configuration_reference_is_the_codes() -> None:
    import re

    models = {
        "lakefs": LakeFSSettings,
        "conductor": ConductorSettings,
        "tracing": TracingSettings,
        "tls": TLSSettings,
        "proxy": ProxySettings,
    }
    rows = [r for r in _rows(DOC) if r[0].startswith("`PERAGO_")]
    assert len(rows) >= len(Settings.model_fields)
    for _env, field, default, _meaning in rows:
        path = field.strip("`").split(".")
        model: type = models[path[0]] if len(path) == 2 else Settings
        name = path[-1]
        if name == "worker_id":  # derived when empty: host-pid-random
            assert default == "`host-pid-random`"
            assert _code_default(Settings, name) == ""
            derived = Settings().worker_id
            assert re.fullmatch(r".+-\d+-[0-9a-f]{6}", derived), derived
            continue
        assert _documented_default(default) == _code_default(model, name), field


# -- operations.md: the drain -------------------------------------------------------------------


def _publish_wait(request_timeout: float) -> float:
    from types import SimpleNamespace

    from perago_worker.runner import Runner

    runner = SimpleNamespace(
        settings=Settings(),
        deps=SimpleNamespace(lakefs=SimpleNamespace(request_timeout=request_timeout)),
    )
    return float(Runner.publish_wait_seconds.fget(runner))  # type: ignore[attr-defined]


def _configmap_settings() -> dict[str, object]:
    import yaml

    configmap = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    settings: dict[str, object] = yaml.safe_load(configmap["data"]["config.yaml"])
    return settings


def test_operations_guide_quotes_the_drain_grace_and_the_publish_wait() -> None:
    grace = _field_default(Settings, "drain_grace_seconds")
    assert f"`drain_grace_seconds`\n   (default {grace:.0f})" in OPERATIONS
    times = "\N{MULTIPLICATION SIGN}"
    formula = f"`merge_retry_seconds + 2 {times} lakefs.request_timeout_seconds`"
    default_timeout = float(_field_default(LakeFSSettings, "request_timeout_seconds"))  # type: ignore[arg-type]
    shipped = _configmap_settings()["lakefs"]["request_timeout_seconds"]  # type: ignore[index]
    quoted = (
        f"{formula} ({_publish_wait(default_timeout):.0f} s with the defaults,\n"
        f"   {_publish_wait(float(shipped)):.0f} s with the {shipped} s timeout of `configmap.yaml`)"
    )
    assert quoted in OPERATIONS
    assert formula in DOC, "configuration.md names the same wait"
    assert f"`merge_retry_seconds + 2 {times}\nlakefs.request_timeout_seconds`" in FENCES


def test_every_supervisor_drain_wait_quoted_is_the_codes() -> None:
    import re

    import yaml

    from perago_worker.supervisor import DRAIN_MARGIN_SECONDS

    for name, text in (("operations.md", OPERATIONS), ("deployment.yaml", DEPLOYMENT)):
        margins = [float(m) for m in re.findall(r"drain_grace_seconds \+ (\d+)", text)]
        assert margins, f"{name} quotes no supervisor drain wait"
        assert set(margins) == {DRAIN_MARGIN_SECONDS}, (name, margins)
    grace = yaml.safe_load(DEPLOYMENT)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"`terminationGracePeriodSeconds` ({grace} in `deployment.yaml`)" in OPERATIONS
    # "the same 90 s suffices": the supervisor is done before the kubelet kills the pod.
    drain = float(_configmap_settings()["drain_grace_seconds"])  # type: ignore[arg-type]
    assert drain + DRAIN_MARGIN_SECONDS < grace


def test_docs_say_a_cancelled_attempt_never_merges_and_only_a_live_one_is_reported_aborted() -> (
    None
):
    import inspect

    from perago_worker.context import TaskContext
    from perago_worker.runner import Runner

    # The code: past the grace, cancel unless publishing; report only what is still live.
    source = inspect.getsource(Runner._abort_leftovers)
    assert "cancel_unless_publishing" in source and "self.is_live(entry" in source
    ctx = TaskContext("t", "w", "x", "x", 0, 1, "me", "dev")
    assert ctx.cancel_unless_publishing("drain grace over") and not ctx.begin_publish()
    publishing = TaskContext("t", "w", "x", "x", 0, 1, "me", "dev")
    assert publishing.begin_publish() and not publishing.cancel_unless_publishing("late")
    # The docs say exactly that, and no longer that every aborted attempt is reported.
    assert "if the\n   attempt fence still shows it as the live delivery" in OPERATIONS
    assert "An attempt that has already begun to claim or merge is not\n   cancelled" in (
        OPERATIONS
    )
    assert "the rest are aborted and reported FAILED" not in DOC
    assert "or the worker is draining" not in HANDLERS
    assert "during the grace a draining worker cancels\n  nothing" in HANDLERS


# -- operations.md: gc --------------------------------------------------------------------------


def test_operations_guide_quotes_the_gc_thresholds_and_budgets() -> None:
    from perago_worker import gc

    older = _field_default(Settings, "gc_older_than_seconds")
    intent = _field_default(Settings, "gc_intent_older_than_seconds")
    assert (
        f"`gc_older_than_seconds`, {older:.0f}, and `gc_intent_older_than_seconds`, "
        f"{intent:.0f} or {intent / 86400:.0f} days" in OPERATIONS.replace("\n", " ")
    )
    assert (
        f"retries transient faults for at most {gc.DEFAULT_CONDUCTOR_RETRY_SECONDS:.0f} seconds"
        in OPERATIONS
    )
    assert _field_default(Settings, "gc_every_seconds") == 0
    assert "`0` is off, the default" in OPERATIONS


def test_operations_guide_quotes_the_gc_schedule_the_code_and_manifests_use() -> None:
    import re

    import yaml

    from perago_worker import gc

    text = OPERATIONS.replace("\n  ", " ").replace("\n", " ")
    every = _configmap_settings()["gc_every_seconds"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    compose_every = compose["services"]["worker"]["environment"]["PERAGO_GC_EVERY_SECONDS"]
    assert float(every) == float(compose_every) == 3600  # type: ignore[arg-type]
    assert "`configmap.yaml` and `compose.yaml` set 3600" in text
    delays = [gc.PeriodicGc(100.0, gc.GcReport, None)._first_delay for _ in range(200)]
    assert "a random 50 to 100 % of the interval" in text
    assert min(delays) >= 50 and max(delays) <= 100
    assert f"up to {gc.LOGGED_ITEMS} names" in text
    assert f"gets at most {gc.STOP_WAIT_SECONDS:.0f} s more" in text
    job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "gc-cronjob.yaml").read_text())
    minute = job["spec"]["schedule"].split()[0]
    assert re.fullmatch(r"\d+", minute) and job["spec"]["schedule"].endswith(" * * * *")
    assert text.count(f"at minute {minute} of every hour") >= 2
    deadline = job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert f"`activeDeadlineSeconds: {deadline}`" in text
    assert f"a {deadline // 60}-minute deadline" in text


# -- operations.md: scale, polls, alerts, metrics ----------------------------------------------


def test_operations_guide_scale_table_quotes_the_defaults() -> None:
    fields = Settings.model_fields
    le = next(m.le for m in fields["poll_timeout_ms"].metadata if hasattr(m, "le"))
    for phrase in (
        f"(`PERAGO_CONCURRENCY`, default {_field_default(Settings, 'concurrency')})",
        f"`poll_batch` (default {_field_default(Settings, 'poll_batch')})",
        f"`poll_timeout_ms` (default {_field_default(Settings, 'poll_timeout_ms')}, at most {le})",
        f"`transfer_concurrency` (default {_field_default(Settings, 'transfer_concurrency')})",
    ):
        assert phrase in OPERATIONS, phrase
    cache = _field_default(Settings, "cache_max_bytes")
    assert f"(`cache_max_bytes`, default {cache // 1024**3} GiB" in OPERATIONS  # type: ignore[operator]


def test_operations_guide_quotes_the_poll_backoff_and_the_heartbeat_bounds() -> None:
    import yaml

    from perago_worker import runner

    assert (
        f"backs off up to {runner.MAX_POLL_BACKOFF_SECONDS:.0f} s between failed polls"
        in OPERATIONS
    )
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    [no_polls] = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "PeragoNoPolls"]
    stale = float(no_polls["expr"].rsplit(">", 1)[1])
    minutes = int(no_polls["for"].removesuffix("m"))
    assert f"is more than {stale:.0f} s\nold, for {minutes} minutes" in OPERATIONS
    factor = float(_field_default(Settings, "lease_factor"))  # type: ignore[arg-type]
    assert f"(over {stale / factor:.0f} s at the default factor)" in OPERATIONS


def test_metrics_reference_quotes_the_phase_buckets() -> None:
    from perago_worker.observability import metrics

    bounds = [b for b in metrics.PHASE_SECONDS._upper_bounds if b != float("inf")]
    assert f"buckets {bounds[0] * 1000:.0f} ms to {bounds[-1]:.0f} s" in OPERATIONS


# -- operations.md: the preflight's order -------------------------------------------------------


def test_operations_guide_lists_the_preflight_checks_in_the_order_they_run(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from perago_worker.preflight import run_preflight

    def down(*_: Any, **__: Any) -> Any:
        raise ConnectionError("down")

    conductor = SimpleNamespace(get_task_defs=down, url="http://conductor.test/api")
    lakefs = SimpleNamespace(
        auth=SimpleNamespace(get_current_user=down), call=down, endpoint="http://lakefs.test"
    )
    settings = Settings(scratch_root=tmp_path, allowed_repositories=["NAME"], min_free_disk_mb=0)
    results = run_preflight(settings, None, lakefs, conductor, app_error="x")  # type: ignore[arg-type]
    section = OPERATIONS[OPERATIONS.index("## Troubleshooting") :]
    section = section[: section.index("### 1. Process")]
    documented = [row[0].split("`")[1] for row in _rows(section)]
    assert documented == [r.name for r in results]


# -- lakefs.request_timeout_seconds bounds every lakeFS request ---------------------------------


def test_the_lakefs_request_timeout_bounds_control_and_data_plane_requests_as_documented() -> None:
    import socket
    import threading
    import time

    from perago_worker.lakefs import LakeFS

    row = next(r for r in _rows(DOC) if r[1] == "`lakefs.request_timeout_seconds`")
    assert "every lakeFS request, control plane" in row[3] and "data plane" in row[3]

    # A server that accepts connections and never answers: only a timeout ends a request.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    lake = LakeFS(
        f"http://127.0.0.1:{server.getsockname()[1]}",
        "key",
        "secret",
        timeout=0.3,
        retry_seconds=0.1,
    )
    outcomes: dict[str, tuple[str, float]] = {}

    def attempt(name: str, request: Any) -> None:
        started = time.monotonic()
        try:
            request()
            outcomes[name] = ("answered", time.monotonic() - started)
        except Exception as exc:
            outcomes[name] = (type(exc).__name__, time.monotonic() - started)

    requests = {
        "control plane (branch head)": lambda: lake.branch_head("repo", "main"),
        "data plane (object listing)": lambda: list(lake.list_objects("repo", "main", "")),
    }
    threads = [
        threading.Thread(target=attempt, args=item, daemon=True) for item in requests.items()
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert set(outcomes) == set(requests), f"a request hung: only {outcomes} ended"
        for name, (how, seconds) in outcomes.items():
            assert how != "answered" and seconds < 10, (name, how, seconds)
    finally:
        stop.set()
        lake.close()
        for conn in held:
            conn.close()
        server.close()


# -- the data path: every number the docs quote is the presigned path's ------------------------


def test_the_data_path_section_quotes_the_presigned_paths_thresholds_and_renewals() -> None:
    from perago_worker.lakefs import presigned

    section = DOC[DOC.index("## The data path") :]
    mib = 1 << 20
    quoted = [
        f"files of {presigned.MULTIPART_THRESHOLD // mib} MiB and more",
        f"files under {presigned.SMALL_UPLOAD_BYTES // 1024} KiB through the API in one request",
        f"in {presigned.PART_SIZE // mib} MiB parts, {presigned.PART_THREADS} at a time",
        f"within {presigned.EXPIRY_MARGIN_SECONDS:.0f} s of its expiry",
        f"its first {presigned.PART_URL_BATCH} part URLs",
        f"older than\n  {presigned.URL_MAX_AGE_SECONDS / 60:.0f} minutes",
        f"files over {presigned.SINGLE_PUT_MAX // (1024 * mib)} GiB",
    ]
    missing = [text for text in quoted if text not in section]
    assert missing == []
    ops = OPERATIONS[OPERATIONS.index("## The object store") :]
    assert f"files over {presigned.SINGLE_PUT_MAX // (1024 * mib)} GiB go through the\n  API" in ops


def test_handlers_guide_quotes_the_publish_bound_a_lease_outlives_the_deadline_by() -> None:
    merge = _field_default(Settings, "merge_retry_seconds")
    request = _field_default(LakeFSSettings, "request_timeout_seconds")
    bound = float(merge) + 2 * float(request)  # type: ignore[arg-type]
    assert "two lakeFS request timeouts (180 s by default)" in HANDLERS and bound == 180


def test_the_docs_quote_the_ledgers_gc_window_as_the_code_has_it() -> None:
    import inspect

    from perago_worker import gc

    window = float(_field_default(Settings, "gc_ledger_older_than_seconds"))  # type: ignore[arg-type]
    intents = float(_field_default(Settings, "gc_intent_older_than_seconds"))  # type: ignore[arg-type]
    assert inspect.signature(gc.collect).parameters["ledger_older_than"].default == window
    assert window == 30 * 86400 and intents == 7 * 86400
    assert "`--ledger-older-than` (30 days by default, against 7 for the" in FENCES
    assert "before `--ledger-older-than` (30 days by default)" in FENCES
    assert "`gc_ledger_older_than_seconds`, 2592000 or 30 days" in OPERATIONS.replace("\n", " ")


def test_handlers_guide_quotes_the_result_reason_and_masking_limits_as_the_code_has_them() -> None:
    from perago_worker import contract, publish
    from perago_worker.observability import logging as plog

    text = HANDLERS.replace("\n", " ")
    assert "at most 256 KiB of JSON" in text and publish.MAX_RESULT_METADATA == 256 * 1024
    assert f"most {contract.MAX_REASON} UTF-16 units" in text
    assert f"secrets of {plog.MIN_SECRET} or more characters" in text
