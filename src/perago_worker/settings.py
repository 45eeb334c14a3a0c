"""Typed runtime configuration: environment variables (`PERAGO_…`) over a YAML file.

Precedence, highest first: explicit arguments (tests, the CLI), environment variables,
the file named by `PERAGO_CONFIG` (or `--config`), defaults. Nested fields use `__`:
`PERAGO_LAKEFS__ENDPOINT`. Secrets are `SecretStr`: they print as `**********`.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_NAME = re.compile(r"^(dev|staging|prod|personal-[a-z0-9][a-z0-9-]{0,40})$")


class LakeFSSettings(BaseModel):
    # A misspelt key (`request_timeout` for `request_timeout_seconds`) is refused, naming
    # the field, rather than silently leaving the default in place.
    model_config = ConfigDict(extra="forbid")

    endpoint: str = "http://127.0.0.1:8000"
    access_key_id: str = ""
    secret_access_key: SecretStr = SecretStr("")
    access_key_id_file: Path | None = Field(
        None,
        description="A file holding the access key (a Kubernetes Secret volume): read at start "
        "and again whenever it changes or lakeFS answers 401; instead of access_key_id",
    )
    secret_access_key_file: Path | None = Field(
        None, description="A file holding the secret, read like access_key_id_file"
    )
    request_timeout_seconds: float = Field(60.0, gt=0)
    data_path: Literal["auto", "presign", "api"] = Field(
        "auto",
        description="How object bodies travel: presign (straight to and from the object "
        "store on URLs lakeFS presigns), api (through the lakeFS server), or auto (presign "
        "when the server's storage config says it can)",
    )
    ui_url: str | None = Field(
        None,
        description="Base address of the lakeFS web UI: the log event of a merge then "
        "carries the commit's page, {ui_url}/repositories/{repo}/commits/{commit}",
    )

    @field_validator("endpoint")
    @classmethod
    def _strip_api(cls, value: str) -> str:
        value = value.rstrip("/")
        return value.removesuffix("/api/v1")

    @model_validator(mode="after")
    def _one_source(self) -> LakeFSSettings:
        if self.access_key_id and self.access_key_id_file:
            raise ValueError("set access_key_id or access_key_id_file, not both")
        if self.secret_access_key.get_secret_value() and self.secret_access_key_file:
            raise ValueError("set secret_access_key or secret_access_key_file, not both")
        return self


class TaskOptionsSetting(BaseModel):
    """Per-environment overrides of a task's options (`@app.task(...)`); None keeps the code's."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int | None = Field(None, ge=1)
    retries: int | None = Field(None, ge=0)
    retry_logic: Literal["FIXED", "EXPONENTIAL_BACKOFF", "LINEAR_BACKOFF"] | None = None
    retry_delay_seconds: int | None = Field(None, ge=0)
    total_timeout_seconds: int | None = Field(None, ge=1)
    rate_limit_per_frequency: int | None = Field(None, ge=0)
    rate_limit_frequency_seconds: int | None = Field(None, ge=1)


class ConductorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is refused, not ignored

    url: str = "http://127.0.0.1:8080/api"
    auth_key: str | None = None
    auth_secret: SecretStr | None = None
    auth_key_file: Path | None = Field(
        None, description="A file holding auth_key, read at start and again when it changes"
    )
    auth_secret_file: Path | None = Field(
        None,
        description="A file holding auth_secret, read at start and again when it changes "
        "(the next token request uses it)",
    )
    allow_unsupported_version: bool = Field(
        False,
        description="Start even when the Conductor server's version is outside the supported "
        "range (preflight.SUPPORTED_CONDUCTOR): the check then warns instead of failing",
    )
    request_timeout_seconds: float = Field(
        10.0, gt=0, description="Bound on every Conductor request (the long poll adds its wait)"
    )
    ui_url: str | None = Field(
        None,
        description="Base address of the Conductor web UI: every published commit's metadata "
        "then carries perago.workflow_url, {ui_url}/execution/{workflow_id}",
    )

    @field_validator("url")
    @classmethod
    def _api_root(cls, value: str) -> str:
        value = value.rstrip("/")
        return value if value.endswith("/api") else value + "/api"

    @model_validator(mode="after")
    def _one_source(self) -> ConductorSettings:
        if self.auth_key and self.auth_key_file:
            raise ValueError("set auth_key or auth_key_file, not both")
        if self.auth_secret is not None and self.auth_secret_file:
            raise ValueError("set auth_secret or auth_secret_file, not both")
        return self


class TLSSettings(BaseModel):
    """How every client (the lakeFS SDK, the data plane, Conductor) checks its servers."""

    model_config = ConfigDict(extra="forbid")

    verify: bool = Field(
        True,
        description="Verify server certificates and host names; false accepts any "
        "certificate (tests only)",
    )
    ca_bundle: Path | None = Field(
        None,
        description="PEM file of the CA certificates to trust, instead of the system's "
        "(which honour SSL_CERT_FILE and SSL_CERT_DIR)",
    )
    client_cert: Path | None = Field(
        None, description="PEM client certificate (mutual TLS), its chain after it"
    )
    client_key: Path | None = Field(
        None, description="Its private key (unencrypted PEM); none: the key is in client_cert"
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TLSSettings:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key is set without client_cert")
        return self


class ProxySettings(BaseModel):
    """Forwarding proxies, for every client alike; none reads the standard variables."""

    model_config = ConfigDict(extra="forbid")

    https_proxy: str | None = Field(
        None,
        description="Proxy (http://[user:password@]host:port) for https targets; none: "
        "$https_proxy or $HTTPS_PROXY; empty: no proxy",
    )
    http_proxy: str | None = Field(
        None,
        description="Proxy for plain http targets; none: $http_proxy or $HTTP_PROXY; "
        "empty: no proxy",
    )
    no_proxy: str | None = Field(
        None,
        description="Comma-separated hosts, domains (.example.com), host:port, IPs and CIDR "
        "ranges reached directly, or *; none: $no_proxy or $NO_PROXY",
    )

    @field_validator("https_proxy", "http_proxy")
    @classmethod
    def _http_proxy_url(cls, value: str | None) -> str | None:
        if value:
            from perago_worker.network import parse_proxy

            parse_proxy(value)
        return value


class TracingSettings(BaseModel):
    """OpenTelemetry traces (`observability.tracing`): off while `otlp_endpoint` is unset."""

    model_config = ConfigDict(extra="forbid")

    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector address, e.g. http://otel-collector:4318 (/v1/traces "
        "is appended unless the path ends with it); none: no spans, no OpenTelemetry import",
    )
    service_name: str = Field("perago-worker", min_length=1, description="service.name of spans")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Headers of every export request (an API key), masked"
    )
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of attempts traced (a parent-based ratio sampler)"
    )
    timeout_seconds: float = Field(10.0, gt=0, description="Bound on one export request")


class Settings(BaseSettings):
    """Everything a deployment decides. One deployment serves one environment."""

    model_config = SettingsConfigDict(
        env_prefix="PERAGO_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    environment: str = Field("dev", description="dev, staging, prod or personal-NAME")
    task_domain: str | None = Field(
        None, description="Conductor task domain to poll; personal-NAME defaults to NAME"
    )
    allowed_repositories: list[str] = Field(
        default_factory=list,
        description="The environment's target roots; empty allows every repository (dev only)",
    )
    lakefs: LakeFSSettings = Field(default_factory=LakeFSSettings)
    conductor: ConductorSettings = Field(default_factory=ConductorSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)

    worker_id: str = Field(default="", description="Defaults to host-pid-random")
    scratch_root: Path = Field(Path("~/.cache/perago/attempts"))
    min_free_disk_mb: int = Field(512, ge=0)
    keep_failed_workspaces: bool = False
    cache_max_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="Bound of the object cache, shared by every process using the folder; "
        "0 disables it",
    )
    cache_mode: Literal["copy"] = Field(
        "copy", description="Cache hits are private copies (reflinks where supported), verified"
    )
    portable_names: bool = Field(
        False,
        description="Also refuse keys and files whose names are equal ignoring case "
        "(names equal under Unicode normalization are always refused)",
    )

    concurrency: int = Field(4, ge=1, description="Attempts in flight per task type")
    concurrency_per_task: dict[str, int] = Field(default_factory=dict)
    task_options: dict[str, TaskOptionsSetting] = Field(
        default_factory=dict,
        description="Per task type, overrides of the options its decorator declares "
        "(concurrency, retries, retry_logic, retry_delay_seconds, total_timeout_seconds, "
        "rate limit)",
    )
    poll_batch: int = Field(4, ge=1, le=100)
    poll_timeout_ms: int = Field(2000, ge=0, le=5000)
    lease_factor: float = Field(0.5, gt=0, le=0.8)
    drain_grace_seconds: float = Field(60.0, ge=0)
    task_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description="Deadline of an attempt (up to the start of its publish) for tasks that "
        "set no timeout=; none: the definition's timeoutSeconds, max(3600, 4 x response timeout)",
    )
    task_isolation: Literal["thread", "process"] = Field(
        "thread",
        description="Where handlers run unless a task sets isolation=: a thread of the worker, "
        "or a child process that is killed at the deadline",
    )
    transfer_concurrency: int = Field(32, ge=1, le=256)
    report_retry_seconds: float = Field(120.0, gt=0)
    merge_retry_seconds: float = Field(
        60.0, gt=0, description="How long a publish retries its merge (fenced before each try)"
    )
    clock_skew_seconds: float = Field(
        300.0,
        ge=0,
        description="Allowed clock difference between Conductor and lakeFS when the target's "
        "history is searched for an execution's merge",
    )
    gc_every_seconds: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="`run` collects garbage (what `perago-worker gc` removes) this often on "
        "one thread of the daemon; 0 turns it off",
    )
    gc_older_than_seconds: float = Field(
        3600.0,
        ge=0,
        allow_inf_nan=False,
        description="gc removes attempt folders and staging branches older than this",
    )
    gc_intent_older_than_seconds: float = Field(
        7 * 86400.0,
        ge=0,
        allow_inf_nan=False,
        description="gc removes intent branches of terminal workflows older than this",
    )
    gc_ledger_older_than_seconds: float = Field(
        30 * 86400.0,
        ge=0,
        allow_inf_nan=False,
        description="gc removes the execution ledger entries of a terminal workflow (or of "
        "one Conductor answers 404 for) once its newest entry is older than this",
    )
    queue_depth_every_seconds: float = Field(
        15.0,
        ge=0,
        allow_inf_nan=False,
        description="`run` reads Conductor's queue size of every task type it serves (one "
        "request) this often into perago_queue_depth; 0 turns it off",
    )

    http_host: str = "0.0.0.0"
    http_port: int = Field(9464, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "console"

    handler_config: dict[str, str] = Field(default_factory=dict)
    handler_secrets: dict[str, SecretStr] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("PERAGO_CONFIG")
        if config_file:
            path = Path(config_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"PERAGO_CONFIG names {path}, which is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError("must be dev, staging, prod or personal-<name> (lowercase)")
        return value

    @field_validator("cache_mode", mode="before")
    @classmethod
    def _link_mode_removed(cls, value: Any) -> Any:
        if value == "link":
            from perago_worker.cache import LINK_MODE_REMOVED

            raise ValueError(LINK_MODE_REMOVED)
        return value

    @field_validator("scratch_root")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if self.task_domain is None and self.environment.startswith("personal-"):
            self.task_domain = self.environment.removeprefix("personal-")
        if self.environment == "prod" and not self.allowed_repositories:
            raise ValueError(
                "allowed_repositories must be set in prod (the environment's target roots)"
            )
        return self

    def concurrency_for(self, task_type: str, declared: int | None = None) -> int:
        """Slots of a task type: `concurrency_per_task`, then `task_options`, then what its
        decorator declares (`declared`), then `concurrency`."""
        if task_type in self.concurrency_per_task:
            return self.concurrency_per_task[task_type]
        override = self.task_options.get(task_type)
        if override is not None and override.concurrency is not None:
            return override.concurrency
        return declared if declared is not None else self.concurrency

    def repository_allowed(self, repository: str) -> bool:
        return not self.allowed_repositories or repository in self.allowed_repositories

    def handler_value(self, key: str) -> str:
        if key in self.handler_secrets:
            return self.handler_secrets[key].get_secret_value()
        if key in self.handler_config:
            return self.handler_config[key]
        known = sorted({*self.handler_config, *self.handler_secrets})
        from perago_worker.context import UnknownConfigKey

        raise UnknownConfigKey(
            f"configuration key {key!r} is not set for environment {self.environment!r} "
            f"(known keys: {', '.join(known) or 'none'})"
        )

    def masked(self) -> dict[str, Any]:
        """The effective settings for `config show`: secrets masked, never revealed."""
        return self.model_dump(mode="json")
