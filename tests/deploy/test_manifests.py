"""The deployment files agree with the code they deploy.

Every YAML parses; the Dockerfile, the Kubernetes manifests and the compose file wire the port,
probes, scratch root, config file and credentials the way `Settings` reads them; the drain
grace fits inside the termination grace; every config file loads into `Settings`; the alert
rules use only metrics and label values the code exports, each with its runbook section in
docs/operations.md; and, when `promtool` is installed, Prometheus itself checks and unit-tests
the rules.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from perago_worker import preflight
from perago_worker.app import load_app
from perago_worker.contract import Status
from perago_worker.devstack import tools
from perago_worker.observability import metrics
from perago_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
OPERATIONS = ROOT / "docs" / "operations.md"
FENCES = ROOT / "docs" / "fences.md"
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
ALL_YAML = sorted([*CONFIGS, *(ROOT / "deploy").rglob("*.yaml")])

DEFAULTS = Settings.model_fields
DEFAULT_PORT = DEFAULTS["http_port"].default
DEFAULT_DRAIN_GRACE = DEFAULTS["drain_grace_seconds"].default
SPECIAL_ENV = {"PERAGO_CONFIG"}  # read by settings_customise_sources, not a field

ALERT_SPEC = {  # name -> the `for` duration the rule must have (None: fires at once)
    "PeragoHighFailureRate": "10m",
    "PeragoNoPolls": "5m",
    "PeragoFenceRejections": None,
    "PeragoSlowMaterialization": "15m",
    "PeragoWorkerNotRunning": "10m",
    "PeragoWorkerDown": "5m",
}
SEVERITIES = {"critical", "warning", "info"}


# -- helpers ----------------------------------------------------------------------------------


def load_all(path: Path) -> list[Any]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def load_one(path: Path) -> Any:
    docs = load_all(path)
    assert len(docs) == 1, f"{path} should hold one document"
    return docs[0]


def k8s(kind: str) -> dict[str, Any]:
    found = [
        doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path) if doc["kind"] == kind
    ]
    assert len(found) == 1, f"expected one {kind} in {K8S}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return k8s("Deployment")["spec"]["template"]["spec"]


def worker_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return containers[0]


def env_field(name: str) -> tuple[str, ...]:
    """The Settings field path of a PERAGO_ environment variable (`PERAGO_LAKEFS__ENDPOINT`)."""
    assert name.startswith("PERAGO_"), name
    parts = tuple(name.removeprefix("PERAGO_").lower().split("__"))
    model: Any = Settings
    for part in parts[:-1]:
        assert part in model.model_fields, f"{name}: {part} is not a settings field"
        model = model.model_fields[part].annotation
        assert isinstance(model, type) and hasattr(model, "model_fields"), f"{name}: not nested"
    assert parts[-1] in model.model_fields, f"{name} names no settings field"
    return parts


def assert_settings_env(names: Any) -> None:
    for name in names:
        if name in SPECIAL_ENV:
            continue
        env_field(name)


def make_settings(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], config: Path | None = None
) -> Settings:
    """Settings as a process with exactly `env` (and the config file) would build them."""
    for key in list(os.environ):
        if key.startswith("PERAGO_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    if config is not None:
        monkeypatch.setenv("PERAGO_CONFIG", str(config))
    return Settings()


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends in a continuation"
    result = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        result.append((instruction.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, rest in final_stage():
        if ins == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def only(instruction: str) -> str:
    found = [rest for ins, rest in final_stage() if ins == instruction]
    assert len(found) == 1, f"expected one {instruction} in the final stage, found {found}"
    return found[0]


def exported_series() -> dict[str, MetricWrapperBase]:
    """Every series name the metrics module exposes, mapped to its metric object.

    prometheus-client keeps a counter's name without `_total` in `_name` and exposes
    `<name>_total`; a histogram exposes `_bucket`, `_sum` and `_count`.
    """
    series: dict[str, MetricWrapperBase] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        name = obj._name
        if obj._type == "counter":
            names = [f"{name}_total"]
        elif obj._type == "histogram":
            names = [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
        else:
            names = [name]
        for n in names:
            series[n] = obj
    assert series, "no metrics found in perago_worker.observability.metrics"
    return series


def documented_metric_names() -> list[str]:
    """One name per metric, as a user sees it: counters with _total, histograms bare."""
    names = []
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            names.append(f"{obj._name}_total" if obj._type == "counter" else obj._name)
    return sorted(names)


def alert_rules() -> list[dict[str, Any]]:
    doc = load_one(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


# -- every file parses ------------------------------------------------------------------------


def test_the_files_exist() -> None:
    for path in (DOCKERFILE, ROOT / ".dockerignore", ALERTS, COMPOSE, OPERATIONS):
        assert path.is_file(), path
    assert {p.name for p in CONFIGS} >= {"dev.yaml", "prod.yaml", "personal.yaml"}
    assert {p.name for p in K8S.glob("*.yaml")} >= {
        "configmap.yaml",
        "secret.yaml",
        "deployment.yaml",
        "podmonitor.yaml",
        "hpa.yaml",
        "pdb.yaml",
        "kustomization.yaml",
    }


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict)


# -- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_base_user_install_and_entrypoint() -> None:
    instructions = dockerfile()
    bases = [rest.split()[0] for ins, rest in instructions if ins == "FROM"]
    assert bases and all(b == "python:3.11-slim" for b in bases), bases
    runs = " ".join(rest for ins, rest in instructions if ins == "RUN")
    assert "pip install -c requirements.lock ." in runs
    assert (ROOT / "requirements.lock").is_file()
    copied = " ".join(rest for ins, rest in instructions if ins == "COPY")
    for needed in ("pyproject.toml", "README.md", "LICENSE", "requirements.lock", "src"):
        assert needed in copied, f"the build does not copy {needed}"

    user = only("USER").split(":")[0]
    assert user == "10001"
    assert "--uid 10001" in " ".join(rest for ins, rest in final_stage() if ins == "RUN")
    assert json.loads(only("ENTRYPOINT")) == ["perago-worker"]
    cmd = json.loads(only("CMD"))
    assert cmd == ["run", "perago_worker.devstack.demo_app:app"]
    assert load_app(cmd[1]).tasks, "the default CMD's app has no handlers"
    assert only("STOPSIGNAL") == "SIGTERM"


def test_dockerfile_port_healthcheck_env_and_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    assert only("EXPOSE").split() == [str(DEFAULT_PORT)]

    healthcheck = only("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    assert command[0] == "python", "python:slim has no curl: the healthcheck must use python"
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(command))
    assert url is not None
    assert int(url.group(1)) == DEFAULT_PORT
    assert url.group(2) == "/healthz"

    env = image_env()
    assert env["PERAGO_LOG_FORMAT"] == "json"
    assert env["PERAGO_SCRATCH_ROOT"] == "/var/lib/perago/attempts"
    perago_env = {k: v for k, v in env.items() if k.startswith("PERAGO_")}
    assert_settings_env(perago_env)
    settings = make_settings(monkeypatch, perago_env)
    assert settings.log_format == "json"
    assert json.loads(only("VOLUME")) == [str(settings.scratch_root)]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.removeprefix("!").rstrip("/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, f"**/{pat}") for p in prefixes):
                result = not negate
        return result

    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "requirements.lock",
        "src/perago_worker/cli.py",
        "src/perago_worker/devstack/demo_app.py",
    ):
        assert not ignored(needed), f".dockerignore drops {needed}, which the build needs"
    for junk in (".git/config", ".venv/bin/python", "tests/conftest.py"):
        assert ignored(junk), f".dockerignore lets {junk} into the build context"


# -- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture
def k8s_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """The settings a replica builds: image ENV < container env; the ConfigMap's file."""
    return pod_settings(monkeypatch, tmp_path, pod_spec(), worker_container())


def pod_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pod: dict[str, Any], container: dict[str, Any]
) -> Settings:
    """The settings `container` of `pod` builds: image ENV < container env; the ConfigMap."""
    env = {k: v for k, v in image_env().items() if k.startswith("PERAGO_")}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    secret = k8s("Secret")
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            env.update(secret.get("stringData", {}))
    config_path = env.pop("PERAGO_CONFIG")

    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = k8s("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    relative = config_path.removeprefix(mount["mountPath"]).lstrip("/")
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    key = items.get(relative, relative)
    assert key in configmap["data"], f"PERAGO_CONFIG={config_path} names no ConfigMap key"

    file = tmp_path / "config.yaml"
    file.write_text(configmap["data"][key])
    return make_settings(monkeypatch, env, file)


def test_deployment_shape() -> None:
    deployment = k8s("Deployment")
    assert deployment["apiVersion"] == "apps/v1"
    assert deployment["spec"]["replicas"] == 3
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    resources = worker_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_container_port_and_probes_match_the_settings(k8s_settings: Settings) -> None:
    container = worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == DEFAULT_PORT == k8s_settings.http_port

    def probe_port(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else int(port)

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probe_port(container["livenessProbe"]) == k8s_settings.http_port
    assert probe_port(container["readinessProbe"]) == k8s_settings.http_port


def test_termination_grace_exceeds_the_drain_grace(k8s_settings: Settings) -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace == 90
    assert grace > k8s_settings.drain_grace_seconds
    assert grace > DEFAULT_DRAIN_GRACE
    # The last long poll ends before the drain's wait begins.
    assert grace > k8s_settings.drain_grace_seconds + k8s_settings.poll_timeout_ms / 1000


def test_scrape_annotations_agree_with_the_port(k8s_settings: Settings) -> None:
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == k8s_settings.http_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_security_context_and_scratch_volume(k8s_settings: Settings) -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == only("USER").split(":")[0]
    container = worker_container()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    scratch = mounts.get(str(k8s_settings.scratch_root))
    assert scratch is not None, f"nothing is mounted at scratch_root {k8s_settings.scratch_root}"
    assert "emptyDir" in volumes[scratch]
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_the_configmap_settings_are_production_ready(k8s_settings: Settings) -> None:
    assert k8s_settings.environment == "prod"
    assert k8s_settings.allowed_repositories
    assert k8s_settings.log_format == "json"
    assert k8s_settings.lakefs.secret_access_key.get_secret_value(), "the Secret feeds it"


def test_configmap_holds_no_secrets() -> None:
    data = yaml.safe_load(k8s("ConfigMap")["data"]["config.yaml"])
    assert "secret_access_key" not in data.get("lakefs", {})
    assert "access_key_id" not in data.get("lakefs", {})
    assert "auth_secret" not in data.get("conductor", {})
    assert "handler_secrets" not in data


def test_secret_keys_are_settings_environment_variables() -> None:
    secret = k8s("Secret")
    data = secret.get("stringData", {})
    assert set(data) == {
        "PERAGO_LAKEFS__ACCESS_KEY_ID",
        "PERAGO_LAKEFS__SECRET_ACCESS_KEY",
        "PERAGO_CONDUCTOR__AUTH_KEY",
        "PERAGO_CONDUCTOR__AUTH_SECRET",
    }
    assert_settings_env(data)
    for value in data.values():
        assert "REPLACE" in value, "secret.yaml is a template: placeholders only"


def test_container_env_names_are_settings_environment_variables() -> None:
    names = [e["name"] for e in worker_container().get("env", []) if e["name"].startswith("PERAGO")]
    assert "PERAGO_CONFIG" in names
    assert_settings_env(names)


def test_podmonitor_scrapes_the_http_port() -> None:
    monitor = k8s("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    port_names = {p["name"] for p in worker_container()["ports"]}
    assert endpoints
    for endpoint in endpoints:
        assert endpoint["port"] == "http" and endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_one(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


# -- the gc CronJob ---------------------------------------------------------------------------

CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("dow", 0, 7))


def cron_field(text: str, low: int, high: int) -> set[int]:
    """The values one numeric cron field selects (`*`, `a`, `a-b`, `a,b`, `*/n`, `a-b/n`)."""
    values: set[int] = set()
    for part in text.split(","):
        span, slash, step_text = part.partition("/")
        step = int(step_text) if slash else 1
        if step < 1:
            raise ValueError(f"step {step} in {text!r}")
        if span == "*":
            start, end = low, high
        elif "-" in span:
            first, _, last = span.partition("-")
            start, end = int(first), int(last)
        else:
            start = int(span)
            end = high if slash else start
        if not low <= start <= end <= high:
            raise ValueError(f"{text!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return values


def parse_cron(schedule: str) -> list[set[int]]:
    """The five fields of a standard cron schedule, as Kubernetes' CronJob reads it."""
    fields = schedule.split()
    if len(fields) != len(CRON_FIELDS):
        raise ValueError(f"{schedule!r} has {len(fields)} fields, not 5")
    return [cron_field(f, low, high) for f, (_, low, high) in zip(fields, CRON_FIELDS, strict=True)]


def gc_job() -> dict[str, Any]:
    return k8s("CronJob")


def gc_pod() -> dict[str, Any]:
    pod: dict[str, Any] = gc_job()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return pod


def gc_container() -> dict[str, Any]:
    containers = gc_pod()["containers"]
    assert len(containers) == 1
    return containers[0]


def test_the_gc_cronjob_runs_gc_in_the_workers_image() -> None:
    assert gc_job()["apiVersion"] == "batch/v1"
    container = gc_container()
    assert container["args"] == ["gc"]
    assert container["image"] == worker_container()["image"]
    assert "command" not in container, "the image's ENTRYPOINT is perago-worker"


def test_the_gc_cronjob_has_the_workers_config_and_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    worker = pod_settings(monkeypatch, tmp_path, pod_spec(), worker_container())
    job = pod_settings(monkeypatch, tmp_path, gc_pod(), gc_container())
    assert gc_container()["envFrom"] == worker_container()["envFrom"]
    # Everything gc reads: the servers, credentials, repositories, thresholds, scratch root.
    for name in (
        "environment",
        "lakefs",
        "conductor",
        "allowed_repositories",
        "gc_older_than_seconds",
        "gc_intent_older_than_seconds",
        "gc_ledger_older_than_seconds",
        "scratch_root",
    ):
        assert getattr(job, name) == getattr(worker, name), name
    assert job.allowed_repositories, "gc collects branches of allowed_repositories"


def test_the_gc_cronjob_mounts_config_and_a_writable_scratch_root_like_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    scratch_root = str(pod_settings(monkeypatch, tmp_path, gc_pod(), gc_container()).scratch_root)
    volumes = {v["name"]: v for v in gc_pod()["volumes"]}
    mounts = {m["mountPath"]: m for m in gc_container()["volumeMounts"]}
    worker_volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    worker_mounts = {m["mountPath"]: m for m in worker_container()["volumeMounts"]}
    config = mounts["/etc/perago"]
    assert config["readOnly"] is True
    assert volumes[config["name"]] == worker_volumes[worker_mounts["/etc/perago"]["name"]]
    assert scratch_root in mounts and "emptyDir" in volumes[mounts[scratch_root]["name"]]
    assert gc_container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts, "a read-only root needs a writable /tmp"


def test_the_gc_cronjob_never_overlaps_and_is_bounded() -> None:
    spec = gc_job()["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 0
    assert gc_pod()["restartPolicy"] in ("Never", "OnFailure")
    limits = gc_container()["resources"]["limits"]
    assert limits["cpu"] and limits["memory"]
    assert gc_container()["resources"]["requests"]["memory"]
    assert gc_pod()["securityContext"] == pod_spec()["securityContext"]
    assert gc_container()["securityContext"] == worker_container()["securityContext"]


def test_the_gc_cronjob_schedule_parses_and_runs_hourly_at_most() -> None:
    minutes, hours, days, months, weekdays = parse_cron(gc_job()["spec"]["schedule"])
    assert days == set(range(1, 32)) and months == set(range(1, 13))
    assert weekdays == set(range(8))
    runs_per_day = len(minutes) * len(hours)
    # No more often than the staging threshold lets anything become collectable.
    assert 1 <= runs_per_day <= 86400 // DEFAULTS["gc_older_than_seconds"].default


@pytest.mark.parametrize(
    "schedule", ["* * * *", "60 * * * *", "*/0 * * * *", "5-1 * * * *", "x * * * *"]
)
def test_the_schedule_parser_refuses_what_kubernetes_would(schedule: str) -> None:
    with pytest.raises(ValueError):
        parse_cron(schedule)


def test_the_shipped_workers_also_collect_on_a_schedule(k8s_settings: Settings) -> None:
    # Attempt folders are in each pod's emptyDir: only the worker's own schedule reaches them.
    assert 0 < k8s_settings.gc_every_seconds <= 86400


def test_the_compose_worker_collects_on_a_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: str(v) for k, v in load_one(COMPOSE)["services"]["worker"]["environment"].items()}
    assert 0 < make_settings(monkeypatch, env).gc_every_seconds <= 86400


# -- config files -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_loads_into_settings(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    settings = make_settings(monkeypatch, {}, path)
    raw = load_one(path)
    assert settings.environment == raw["environment"]
    # No secrets in files: they come from the environment.
    assert not settings.lakefs.access_key_id
    assert not settings.lakefs.secret_access_key.get_secret_value()
    assert settings.conductor.auth_secret is None
    assert not settings.handler_secrets


def test_prod_config(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(monkeypatch, {}, ROOT / "config" / "prod.yaml")
    assert settings.environment == "prod"
    assert settings.allowed_repositories
    assert settings.log_format == "json"
    # prod is refused without target roots: the file, not luck, makes it start.
    raw = load_one(ROOT / "config" / "prod.yaml")
    assert raw["allowed_repositories"]


def test_personal_config_derives_its_task_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(monkeypatch, {}, ROOT / "config" / "personal.yaml")
    assert settings.environment == "personal-alice"
    assert settings.task_domain == "alice"


# -- alert rules ------------------------------------------------------------------------------

KNOWN_LABEL_VALUES = {
    ("perago_tasks_total", "status"): {s.value for s in Status},
    ("perago_phase_seconds_bucket", "phase"): set(metrics.PHASES),
    ("perago_worker_state", "state"): set(metrics.STATES),
}


def test_alert_names_severity_and_annotations() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} == set(ALERT_SPEC)
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for") == ALERT_SPEC[name], name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        runbook = annotations["runbook_url"]
        path, _, anchor = runbook.partition("#")
        assert path.endswith("docs/operations.md"), runbook
        assert anchor == name.lower(), runbook
        assert anchor in anchors, f"docs/operations.md has no section #{anchor}"


def test_alert_metrics_and_labels_exist_in_the_code() -> None:
    series = exported_series()
    for rule in alert_rules():
        expr = rule["expr"]
        used = set(re.findall(r"\bperago_[a-z0-9_]+\b", expr))
        assert used, f"{rule['alert']} uses no perago metric"
        unknown = used - set(series)
        assert not unknown, f"{rule['alert']} uses metrics the code does not export: {unknown}"

        available = {"le"} | {label for name in used for label in series[name]._labelnames}
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (s.strip() for s in grouping.split(","))):
                assert label in available, f"{rule['alert']}: no label {label!r}"

        for name, matchers in re.findall(r"\b(perago_[a-z0-9_]+)\{([^}]*)\}", expr):
            allowed = set(series[name]._labelnames) | (
                {"le"} if name.endswith("_bucket") else set()
            )
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
                assert label in allowed, f"{rule['alert']}: {name} has no label {label!r}"
                known = KNOWN_LABEL_VALUES.get((name, label))
                if known is None:
                    continue
                values = value.split("|") if op in ("=~", "!~") else [value]
                assert set(values) <= known, f"{rule['alert']}: {label} values {values} unknown"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _promtool_cases() -> Iterator[dict[str, Any]]:
    """promtool unit tests: each alert fires on a broken worker and not on a healthy one."""
    yield {
        "interval": "1m",
        "input_series": [
            {
                "series": 'perago_tasks_total{task_type="bad",status="COMPLETED",kind="ok"}',
                "values": "0+8x40",
            },
            {
                "series": 'perago_tasks_total{task_type="bad",status="FAILED",kind="handler_error"}',
                "values": "0+2x40",
            },
            {
                "series": 'perago_tasks_total{task_type="good",status="COMPLETED",kind="ok"}',
                "values": "0+20x40",
            },
            {
                "series": 'perago_tasks_total{task_type="good",status="FAILED_WITH_TERMINAL_ERROR",kind="bad_params"}',
                "values": "0+1x40",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "PeragoHighFailureRate", "exp_alerts": []},
            {
                "eval_time": "30m",
                "alertname": "PeragoHighFailureRate",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "task_type": "bad"}}],
            },
        ],
    }
    yield {
        "interval": "1m",
        "input_series": [
            {"series": 'perago_last_poll_timestamp_seconds{instance="stuck"}', "values": "0x30"},
            # healthy: polled at every sample, so the value is the sample's own time
            {"series": 'perago_last_poll_timestamp_seconds{instance="ok"}', "values": "0+60x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "PeragoNoPolls", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "PeragoNoPolls",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "stuck"}}],
            },
        ],
    }
    labels = 'task_type="t",fence="attempt",kind="superseded"'
    yield {
        "interval": "1m",
        "input_series": [
            {"series": f"perago_fence_rejections_total{{{labels}}}", "values": "0 0 0 1x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "PeragoFenceRejections", "exp_alerts": []},
            {
                "eval_time": "5m",
                "alertname": "PeragoFenceRejections",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "info",
                            "task_type": "t",
                            "fence": "attempt",
                            "kind": "superseded",
                        }
                    }
                ],
            },
            {"eval_time": "40m", "alertname": "PeragoFenceRejections", "exp_alerts": []},
        ],
    }

    def bucket(task_type: str, phase: str, le: str, values: str) -> dict[str, str]:
        return {
            "series": f'perago_phase_seconds_bucket{{task_type="{task_type}",phase="{phase}",le="{le}"}}',
            "values": values,
        }

    yield {
        "interval": "1m",
        "input_series": [
            # every materialization of "slow" lands between 300 s and 900 s
            bucket("slow", "materialize", "300", "0x40"),
            bucket("slow", "materialize", "900", "0+1x40"),
            bucket("slow", "materialize", "+Inf", "0+1x40"),
            # a slow handler is not a slow materialization
            bucket("fast", "materialize", "300", "0+1x40"),
            bucket("fast", "materialize", "900", "0+1x40"),
            bucket("fast", "materialize", "+Inf", "0+1x40"),
            bucket("fast", "handler", "300", "0x40"),
            bucket("fast", "handler", "900", "0+1x40"),
            bucket("fast", "handler", "+Inf", "0+1x40"),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "PeragoSlowMaterialization", "exp_alerts": []},
            {
                "eval_time": "30m",
                "alertname": "PeragoSlowMaterialization",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "task_type": "slow"}}],
            },
        ],
    }
    yield {
        "interval": "1m",
        "input_series": [
            {"series": 'perago_worker_state{state="running",instance="down"}', "values": "0x30"},
            {"series": 'perago_worker_state{state="failed",instance="down"}', "values": "1x30"},
            {"series": 'perago_worker_state{state="running",instance="up"}', "values": "1x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "PeragoWorkerNotRunning", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "PeragoWorkerNotRunning",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "state": "running",
                            "instance": "down",
                        }
                    }
                ],
            },
        ],
    }
    yield {
        "interval": "1m",
        "input_series": [
            # a worker whose scrape fails from minute 3 on: its metrics stop with it
            {"series": 'up{job="w",instance="hung"}', "values": "1 1 1 0x40"},
            {
                "series": 'perago_worker_state{state="running",job="w",instance="hung"}',
                "values": "1 1 1",
            },
            # a healthy worker, and a target down that never was a perago worker
            {"series": 'up{job="w",instance="ok"}', "values": "1x40"},
            {
                "series": 'perago_worker_state{state="running",job="w",instance="ok"}',
                "values": "1x40",
            },
            {"series": 'up{job="other",instance="db"}', "values": "0x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "PeragoWorkerDown", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "PeragoWorkerDown",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "job": "w", "instance": "hung"}}
                ],
            },
        ],
    }


@needs_promtool
def test_promtool_unit_tests_fire_each_alert(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    # promtool compares annotations exactly; test the expressions, `for` and labels only.
    rules = copy.deepcopy(load_one(ALERTS))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    tests_file = tmp_path / "tests.yaml"
    tests_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules_file.name],
                "evaluation_interval": "1m",
                "tests": list(_promtool_cases()),
            },
            sort_keys=False,
        )
    )
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tests_file)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose ----------------------------------------------------------------------------------


def test_compose_wires_the_worker_to_lakefs_and_conductor(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_one(COMPOSE)
    services = compose["services"]
    assert {"lakefs", "conductor", "worker"} <= set(services)
    assert services["lakefs"]["image"].startswith("treeverse/lakefs")
    assert "conductor" in services["conductor"]["image"]

    worker = services["worker"]
    build = worker["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    env = {k: str(v) for k, v in worker["environment"].items()}
    assert_settings_env(k for k in env if k.startswith("PERAGO_"))
    image = {k: v for k, v in image_env().items() if k.startswith("PERAGO_")}
    settings = make_settings(monkeypatch, {**image, **env})

    assert urlsplit(settings.lakefs.endpoint).hostname == "lakefs"
    assert urlsplit(settings.conductor.url).hostname == "conductor"
    lakefs_env = services["lakefs"]["environment"]
    assert settings.lakefs.access_key_id == lakefs_env["LAKEFS_INSTALLATION_ACCESS_KEY_ID"]
    assert (
        settings.lakefs.secret_access_key.get_secret_value()
        == lakefs_env["LAKEFS_INSTALLATION_SECRET_ACCESS_KEY"]
    )
    published = [str(p) for p in worker.get("ports", [])]
    assert any(p.split(":")[-1] == str(settings.http_port) for p in published), published
    mounts = [str(v).split(":")[1] for v in worker.get("volumes", [])]
    assert str(settings.scratch_root) in mounts

    stop = re.fullmatch(r"(\d+)s", str(worker["stop_grace_period"]))
    assert stop is not None
    assert int(stop.group(1)) > settings.drain_grace_seconds
    if "command" in worker:
        assert load_app(worker["command"][-1]).tasks


# -- operations guide -------------------------------------------------------------------------


def test_operations_guide_documents_every_metric() -> None:
    text = OPERATIONS.read_text()
    missing = [n for n in documented_metric_names() if f"`{n}`" not in text]
    assert missing == []


def test_operations_guide_troubleshooting_order() -> None:
    text = OPERATIONS.read_text().lower()
    start = text.index("## troubleshooting")
    section = text[start:]
    steps = ["process", "network", "credentials", "disk and memory", "handler compatibility"]
    positions = [section.index(f"### {i}. {step}") for i, step in enumerate(steps, 1)]
    assert positions == sorted(positions)


# -- one Conductor version everywhere ---------------------------------------------------------

# An image reference to a Conductor server (`conductoross/conductor:3.32.3`, also with a
# registry or a `${VAR:-default}` around it) and a prose mention (`Conductor OSS 3.32.3`).
CONDUCTOR_IMAGE = re.compile(
    r"(?P<image>[\w./-]*conductor[\w./-]*):(?P<tag>v?\d+\.\d+\.\d+[\w.+-]*)"
)
CONDUCTOR_MENTION = re.compile(r"\bConductor(?: OSS)?\s+`?v?(?P<version>\d+\.\d+\.\d+)", re.I)
VERSION_DOCS = [ROOT / "README.md", OPERATIONS, FENCES]


def deploy_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())


def declared_images() -> list[tuple[str, str]]:
    """(where, image) of every container image the compose file and the manifests declare."""
    found = [
        (f"compose service {name}", str(service["image"]))
        for name, service in load_one(COMPOSE)["services"].items()
        if "image" in service
    ]
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                found.append((f"{path.name} {container['name']}", str(container["image"])))
    return found


def test_every_conductor_image_in_deploy_is_the_tested_version() -> None:
    conductor = [(w, i) for w, i in declared_images() if "conductor" in i.lower()]
    assert conductor, "compose runs a Conductor server"
    for where, image in conductor:
        name, _, tag = image.rpartition(":")
        assert "$" not in image, f"{where}: {image} is not pinned (a variable can change it)"
        assert name == "conductoross/conductor", f"{where}: {image} is not the conductor-oss image"
        assert tag == tools.CONDUCTOR_VERSION, f"{where}: {image} is not {tools.CONDUCTOR_VERSION}"


@pytest.mark.parametrize(
    "path",
    [*deploy_files(), *VERSION_DOCS],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_conductor_version_named_is_the_tested_version(path: Path) -> None:
    text = path.read_text()
    named = [m.group("tag") for m in CONDUCTOR_IMAGE.finditer(text)]
    named += [m.group("version") for m in CONDUCTOR_MENTION.finditer(text)]
    wrong = [v for v in named if v.removeprefix("v") != tools.CONDUCTOR_VERSION]
    assert wrong == [], (
        f"{path.name} names Conductor {wrong}, the suite runs {tools.CONDUCTOR_VERSION}"
    )


def test_the_version_scan_finds_what_it_must_and_nothing_else() -> None:
    tags = [
        m.group("tag")
        for m in CONDUCTOR_IMAGE.finditer(
            "image: ${CONDUCTOR_IMAGE:-conductoross/conductor-standalone:3.15.0}\n"
            "url: http://conductor:8080/api\n"
            "url: http://conductor-server.conductor.svc.cluster.local:8080/api\n"
            "image: ghcr.io/acme/conductor:v3.32.1\n"
        )
    ]
    assert tags == ["3.15.0", "v3.32.1"]
    mentions = [
        m.group("version")
        for m in CONDUCTOR_MENTION.finditer(
            "runs against Conductor OSS 3.32.3; the Conductor OSS `3.31.2` server; Conductor 3.15.0"
        )
    ]
    assert mentions == ["3.32.3", "3.31.2", "3.15.0"]


def test_the_tested_conductor_version_is_inside_the_supported_range() -> None:
    version = preflight.parse_version(tools.CONDUCTOR_VERSION)
    assert version is not None
    assert preflight.version_supported(version)
    low, high = preflight.SUPPORTED_CONDUCTOR
    assert (low, high) == ((3, 32, 0), (3, 33, 0))
    assert "3.32.x" in OPERATIONS.read_text() and f"tested: {tools.CONDUCTOR_VERSION}" in (
        OPERATIONS.read_text()
    )


def _section(markdown: str, heading: str) -> str:
    """The text under `## heading`, up to the next `## `."""
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else len(markdown)]


def test_the_fences_doc_names_the_supported_range_and_the_tested_version() -> None:
    section = _section(FENCES.read_text(), "Supported Conductor versions")
    found = re.findall(r"Supported: (\d+)\.(\d+)\.x, tested on (\d+\.\d+\.\d+)", section)
    assert len(found) == 1, found
    major, minor, tested = int(found[0][0]), int(found[0][1]), found[0][2]
    low, high = preflight.SUPPORTED_CONDUCTOR
    assert (low, high) == ((major, minor, 0), (major, minor + 1, 0))
    assert tested == tools.CONDUCTOR_VERSION  # what every Conductor image in deploy/ runs
    lines = re.findall(r"behaviours of Conductor (\d+)\.(\d+)\b", section)
    assert lines == [(str(major), str(minor))]


def test_the_fences_doc_dates_each_behaviour_as_the_operations_guide_does() -> None:
    section = _section(FENCES.read_text(), "Supported Conductor versions")
    since = set(re.findall(r"since (\d+\.\d+\.\d+)", section))
    table = set(re.findall(r"\| (\d+\.\d+\.\d+) \|$", OPERATIONS.read_text(), re.M))
    assert since, "the fences doc dates no behaviour"
    assert since == table


# -- the version comparison (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.32.3", (3, 32, 3)),
        ("3.32.3-SNAPSHOT", (3, 32, 3)),
        ("v3.32.3", (3, 32, 3)),
        ("3.32.10", (3, 32, 10)),
        (" 3.32.3\n", (3, 32, 3)),
        ("3.33.0-rc.1", (3, 33, 0)),
        ("3.32.3+build.7", (3, 32, 3)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert preflight.parse_version(text) == expected


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "3.32",
        "3",
        "3.32.x",
        "latest",
        "v",
        "3.32.3 beta",
        "x3.32.3",
        None,
        3,
        3.32,
        ["3.32.3"],
    ],
)
def test_parse_version_rejects_garbage(garbage: object) -> None:
    assert preflight.parse_version(garbage) is None


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ((3, 32, 0), True),
        ((3, 32, 3), True),
        ((3, 32, 99), True),
        ((3, 31, 2), False),
        ((3, 21, 0), False),
        ((3, 15, 0), False),
        ((3, 33, 0), False),
        ((4, 0, 0), False),
        ((2, 99, 99), False),
    ],
)
def test_version_supported_bounds(version: tuple[int, int, int], supported: bool) -> None:
    assert preflight.version_supported(version) is supported


class _FakeConductor:
    url = "http://conductor.test/api"

    def __init__(self, answer: Any) -> None:
        self._answer = answer
        self.metadata = type("M", (), {"api_client": type("A", (), {"call_api": self._call})()})()

    def _call(self, path: str, method: str, **_: Any) -> Any:
        assert (path, method) == (preflight.ADMIN_CONFIG_PATH, "GET")
        if isinstance(self._answer, BaseException):
            raise self._answer
        return self._answer

    def call(self, fn: Any, *args: Any, retry_seconds: float | None = None, **kwargs: Any) -> Any:
        assert retry_seconds is not None and retry_seconds <= 10, "the read is bounded"
        return fn(*args, **kwargs)


def _check(answer: Any, allow: bool = False) -> preflight.Result:
    return preflight.version_check(_FakeConductor(answer), allow_unsupported=allow)  # type: ignore[arg-type]


def test_version_check_passes_in_the_range() -> None:
    result = _check({"version": "3.32.3", "buildDate": "x"})
    assert (result.ok, result.warning, result.mark) == (True, False, "ok")
    assert "3.32.3" in result.detail


@pytest.mark.parametrize("version", ["3.15.0", "3.31.2", "3.33.0", "4.0.0-SNAPSHOT"])
def test_version_check_fails_outside_the_range_naming_version_and_range(version: str) -> None:
    result = _check({"version": version})
    assert (result.ok, result.mark) == (False, "FAIL")
    assert version in result.detail and ">= 3.32.0, < 3.33.0" in result.detail
    assert "ALLOW_UNSUPPORTED_VERSION" in result.detail


def test_version_check_only_warns_outside_the_range_when_allowed() -> None:
    result = _check({"version": "3.15.0"}, allow=True)
    assert (result.ok, result.warning, result.mark) == (True, True, "warn")
    assert "3.15.0" in result.detail and "allow_unsupported_version" in result.detail


@pytest.mark.parametrize(
    "answer",
    [{}, {"version": "garbage"}, {"version": None}, {"version": 3}, [], None, RuntimeError("404")],
    ids=["no-version", "garbage", "null", "number", "list", "empty", "error"],
)
def test_version_check_warns_when_the_version_cannot_be_read(answer: Any) -> None:
    result = _check(answer)
    assert (result.ok, result.warning, result.mark) == (True, True, "warn")
    assert ">= 3.32.0, < 3.33.0" in result.detail


# -- autoscaling and disruptions --------------------------------------------------------------


def scaled_object() -> dict[str, Any]:
    return k8s("ScaledObject")


def pod_capacity(settings: Settings) -> int:
    """Attempts one pod of the Deployment takes at once: the sum over the app's task types of
    their concurrency, times the processes of `run --processes N`."""
    args = worker_container()["args"]
    app = load_app(args[1])
    processes = int(args[args.index("--processes") + 1]) if "--processes" in args else 1
    per_process = sum(
        settings.concurrency_for(name, spec.options.concurrency) for name, spec in app.tasks.items()
    )
    return processes * per_process


def test_the_scaled_object_scales_the_deployment_on_the_demand(k8s_settings: Settings) -> None:
    scaler = scaled_object()
    assert scaler["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaler["spec"]
    deployment = k8s("Deployment")
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    # The workers export the queue depth: with none running, nothing would scale them up.
    assert spec["minReplicaCount"] >= 1
    assert spec["minReplicaCount"] <= deployment["spec"]["replicas"] <= spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert urlsplit(meta["serverAddress"]).scheme in ("http", "https")
    # One replica's share of the demand is what one pod can take at once.
    assert float(meta["threshold"]) == pod_capacity(k8s_settings)
    assert k8s_settings.queue_depth_every_seconds > 0, "the ConfigMap keeps the gauge on"


def test_the_scaling_query_counts_each_queue_once_and_uses_exported_metrics() -> None:
    query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    series = exported_series()
    used = set(re.findall(r"\bperago_[a-z0-9_]+\b", query))
    assert used == {"perago_attempts_in_flight", "perago_queue_depth"}
    assert used <= set(series)
    # Every replica exports the same depth: it is taken once per task type (max), not summed.
    assert re.search(r"max by \(task_type\) \(perago_queue_depth\{", query)
    assert "sum(perago_queue_depth" not in query.replace(" ", "")
    # An empty side (the reader off, no attempt yet) must not empty the whole sum.
    assert query.count("or vector(0)") == 2
    # It counts this Deployment's pods (the Deployment names them `<name>-<hash>-<id>`).
    assert f'pod=~"{k8s("Deployment")["metadata"]["name"]}-.*"' in query


def test_the_scaled_object_scales_down_slower_than_a_drain() -> None:
    behavior = scaled_object()["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down = behavior["scaleDown"]
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert down["stabilizationWindowSeconds"] >= 300
    for policy in down["policies"]:
        if policy["type"] == "Pods":
            assert policy["value"] == 1
            assert policy["periodSeconds"] > grace, "one pod drains before the next goes"


def test_the_disruption_budget_covers_the_workers_one_at_a_time() -> None:
    pdb = k8s("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    spec = pdb["spec"]
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert "minAvailable" not in spec, "maxUnavailable keeps working whatever the replica count"
    rolling = k8s("Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert spec["maxUnavailable"] == rolling["maxUnavailable"] == 1
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # A node drain always leaves one replica serving.
    assert scaled_object()["spec"]["minReplicaCount"] > spec["maxUnavailable"]
