"""Specification of `perago_worker.settings`: env over YAML, secrets masked, derived fields."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from perago_worker.settings import Settings

SECRETS = ("lakefs-s3cr3t", "conductor-s3cr3t", "handler-s3cr3t")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PERAGO_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "perago.yaml"
    path.write_text(
        "environment: staging\n"
        "lakefs:\n"
        "  endpoint: http://from-file:8000\n"
        "  access_key_id: AKIA-FILE\n"
        "concurrency: 7\n"
    )
    monkeypatch.setenv("PERAGO_CONFIG", str(path))
    return path


# --- sources and precedence --------------------------------------------------------------


def test_yaml_file_named_by_perago_config_is_read(config_file: Path) -> None:
    settings = Settings()
    assert settings.environment == "staging"
    assert settings.lakefs.endpoint == "http://from-file:8000"
    assert settings.concurrency == 7


def test_env_var_overrides_yaml_nested_field(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERAGO_LAKEFS__ENDPOINT", "http://from-env:9000")
    assert Settings().lakefs.endpoint == "http://from-env:9000"


def test_env_override_keeps_sibling_fields_from_yaml(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERAGO_LAKEFS__ENDPOINT", "http://from-env:9000")
    assert Settings().lakefs.access_key_id == "AKIA-FILE"


def test_env_var_overrides_yaml_top_level_field(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERAGO_CONCURRENCY", "2")
    assert Settings().concurrency == 2


def test_explicit_argument_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERAGO_CONCURRENCY", "2")
    assert Settings(concurrency=9).concurrency == 9


def test_missing_config_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERAGO_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="PERAGO_CONFIG"):
        Settings()


def test_unknown_yaml_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("concurency: 3\n")
    monkeypatch.setenv("PERAGO_CONFIG", str(path))
    with pytest.raises(ValidationError, match="concurency"):
        Settings()


@pytest.mark.parametrize(
    ("section", "misspelt"), [("lakefs", "request_timeout"), ("conductor", "urll")]
)
def test_an_unknown_key_under_lakefs_or_conductor_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, misspelt: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"{section}:\n  {misspelt}: 5\n")
    monkeypatch.setenv("PERAGO_CONFIG", str(path))
    with pytest.raises(ValidationError, match=misspelt):
        Settings()


def test_lakefs_endpoint_api_suffix_is_stripped() -> None:
    settings = Settings(lakefs={"endpoint": "http://lakefs:8000/api/v1/"})
    assert settings.lakefs.endpoint == "http://lakefs:8000"


def test_conductor_url_gets_api_root() -> None:
    assert Settings(conductor={"url": "http://conductor:8080/"}).conductor.url == (
        "http://conductor:8080/api"
    )


# --- secrets -----------------------------------------------------------------------------


@pytest.fixture
def secret_settings() -> Settings:
    return Settings(
        lakefs={"access_key_id": "AKIA", "secret_access_key": SECRETS[0]},
        conductor={"auth_key": "key", "auth_secret": SECRETS[1]},
        handler_secrets={"token": SECRETS[2]},
    )


def test_secrets_never_appear_in_repr(secret_settings: Settings) -> None:
    text = repr(secret_settings) + str(secret_settings)
    for secret in SECRETS:
        assert secret not in text


def test_secrets_never_appear_in_json_dump(secret_settings: Settings) -> None:
    text = json.dumps(secret_settings.model_dump(mode="json"))
    for secret in SECRETS:
        assert secret not in text


def test_secrets_never_appear_in_masked_view(secret_settings: Settings) -> None:
    text = json.dumps(secret_settings.masked())
    for secret in SECRETS:
        assert secret not in text
    assert secret_settings.masked()["lakefs"]["secret_access_key"] == "**********"


def test_secret_from_env_is_masked_but_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERAGO_LAKEFS__SECRET_ACCESS_KEY", SECRETS[0])
    settings = Settings()
    assert SECRETS[0] not in repr(settings)
    assert settings.lakefs.secret_access_key.get_secret_value() == SECRETS[0]


def test_handler_value_reveals_secret_to_handler(secret_settings: Settings) -> None:
    assert secret_settings.handler_value("token") == SECRETS[2]


# --- derived fields and validation -------------------------------------------------------


def test_personal_environment_derives_task_domain() -> None:
    assert Settings(environment="personal-alice").task_domain == "alice"


def test_explicit_task_domain_wins_over_personal_derivation() -> None:
    assert Settings(environment="personal-alice", task_domain="team").task_domain == "team"


@pytest.mark.parametrize("environment", ["dev", "staging"])
def test_shared_environments_have_no_default_task_domain(environment: str) -> None:
    assert Settings(environment=environment).task_domain is None


def test_prod_without_allowed_repositories_is_refused() -> None:
    with pytest.raises(ValidationError, match="allowed_repositories must be set in prod"):
        Settings(environment="prod")


def test_prod_with_allowed_repositories_is_accepted() -> None:
    settings = Settings(environment="prod", allowed_repositories=["audio-lake"])
    assert settings.repository_allowed("audio-lake")
    assert not settings.repository_allowed("video-lake")


def test_empty_allowed_repositories_allows_any() -> None:
    assert Settings().repository_allowed("anything")


@pytest.mark.parametrize(
    "environment", ["Prod", "production", "personal-", "personal-Alice", "personal_alice", ""]
)
def test_bad_environment_name_is_refused(environment: str) -> None:
    with pytest.raises(ValidationError, match="environment"):
        Settings(environment=environment)


def test_scratch_root_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings(scratch_root="~/scratch").scratch_root == tmp_path / "scratch"


def test_default_scratch_root_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings().scratch_root == tmp_path / ".cache" / "perago" / "attempts"


def test_worker_id_is_generated_when_unset() -> None:
    first, second = Settings().worker_id, Settings().worker_id
    assert first
    assert first != second


def test_worker_id_is_kept_when_set() -> None:
    assert Settings(worker_id="w-7").worker_id == "w-7"


def test_concurrency_for_uses_per_task_override() -> None:
    settings = Settings(concurrency=4, concurrency_per_task={"render": 1})
    assert settings.concurrency_for("render") == 1
    assert settings.concurrency_for("other") == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [("concurrency", 0), ("poll_batch", 101), ("poll_timeout_ms", 5001), ("lease_factor", 0.9)],
)
def test_out_of_range_tuning_is_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})
