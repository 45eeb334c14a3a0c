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
    endpoint: str = "http://127.0.0.1:8000"
    access_key_id: str = ""
    secret_access_key: SecretStr = SecretStr("")
    request_timeout_seconds: float = Field(60.0, gt=0)
    data_path: Literal["auto", "presign", "api"] = Field(
        "auto",
        description="How object bodies travel: presign (straight to and from the object "
        "store on URLs lakeFS presigns), api (through the lakeFS server), or auto (presign "
        "when the server's storage config says it can)",
    )

    @field_validator("endpoint")
    @classmethod
    def _strip_api(cls, value: str) -> str:
        value = value.rstrip("/")
        return value.removesuffix("/api/v1")


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
    url: str = "http://127.0.0.1:8080/api"
    auth_key: str | None = None
    auth_secret: SecretStr | None = None
    allow_unsupported_version: bool = Field(
        False,
        description="Start even when the Conductor server's version is outside the supported "
        "range (preflight.SUPPORTED_CONDUCTOR): the check then warns instead of failing",
    )
    request_timeout_seconds: float = Field(
        10.0, gt=0, description="Bound on every Conductor request (the long poll adds its wait)"
    )

    @field_validator("url")
    @classmethod
    def _api_root(cls, value: str) -> str:
        value = value.rstrip("/")
        return value if value.endswith("/api") else value + "/api"


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
