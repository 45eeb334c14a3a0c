"""TLS and proxy settings, `no_proxy` matching, credentials files: the pure parts."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from perago_worker.credentials import Credentials, CredentialsError
from perago_worker.network import Network, NetworkError, NoProxy, parse_proxy
from perago_worker.settings import (
    ConductorSettings,
    LakeFSSettings,
    ProxySettings,
    Settings,
    TLSSettings,
)

# -- the defaults, pinned -----------------------------------------------------------------------


def test_tls_defaults_verify_against_the_system_store_without_a_client_certificate() -> None:
    tls = Settings().tls
    assert (tls.verify, tls.ca_bundle, tls.client_cert, tls.client_key) == (True, None, None, None)


def test_proxy_defaults_read_the_standard_variables() -> None:
    proxy = Settings().proxy
    assert (proxy.https_proxy, proxy.http_proxy, proxy.no_proxy) == (None, None, None)


def test_credential_files_default_to_none() -> None:
    settings = Settings()
    assert settings.lakefs.access_key_id_file is None
    assert settings.lakefs.secret_access_key_file is None
    assert settings.conductor.auth_key_file is None
    assert settings.conductor.auth_secret_file is None


def test_tls_and_proxy_settings_come_from_perago_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PERAGO_TLS__VERIFY", "false")
    monkeypatch.setenv("PERAGO_TLS__CA_BUNDLE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("PERAGO_PROXY__HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("PERAGO_PROXY__NO_PROXY", ".svc,10.0.0.0/8")
    settings = Settings()
    assert settings.tls.verify is False and settings.tls.ca_bundle == tmp_path / "ca.pem"
    assert settings.proxy.https_proxy == "http://proxy:3128"
    assert settings.proxy.no_proxy == ".svc,10.0.0.0/8"


def test_a_client_key_without_its_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="client_key is set without client_cert"):
        TLSSettings(client_key=tmp_path / "key.pem")


@pytest.mark.parametrize("url", ["https://proxy:3128", "socks5://proxy:1080", "http://"])
def test_a_proxy_that_is_not_plain_http_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="proxy must be an http"):
        ProxySettings(https_proxy=url)


def test_a_value_and_a_file_for_the_same_secret_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not both"):
        LakeFSSettings(secret_access_key="s", secret_access_key_file=tmp_path / "s")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not both"):
        ConductorSettings(auth_key="k", auth_key_file=tmp_path / "k")


# -- proxies ------------------------------------------------------------------------------------


def test_proxy_credentials_become_a_header_and_never_show() -> None:
    proxy = parse_proxy("http://us%40er:p%3Ass@proxy.corp:3128")
    assert (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert proxy.headers == {"Proxy-Authorization": "Basic dXNAZXI6cDpzcw=="}
    assert "p:ss" not in repr(proxy) and "dXN" not in repr(proxy)
    assert parse_proxy("proxy:8080").port == 8080  # scheme-less, as the variables often are


@pytest.mark.parametrize(
    ("entries", "host", "port", "bypass"),
    [
        ("*", "anything.example", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "api.example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        ("example.com:8443", "example.com", 8443, True),
        ("example.com:8443", "example.com", 443, False),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("127.0.0.1", "127.0.0.1", 8000, True),
        ("::1", "[::1]", 8000, True),
        ("[::1]:8000", "::1", 8000, True),
        (" LAKEFS.svc , conductor ", "lakefs.SVC", 80, True),
        ("", "example.com", 443, False),
    ],
)
def test_no_proxy_matching(entries: str, host: str, port: int, bypass: bool) -> None:
    assert NoProxy(entries).matches(host, port) is bypass


def test_proxy_for_picks_by_scheme_and_honours_no_proxy() -> None:
    network = Network(
        https_proxy="http://secure:1", http_proxy="http://plain:2", no_proxy="internal"
    )
    assert network.proxy_for("https://lakefs.example:8000/api") is network.https_proxy
    assert network.proxy_for("http://conductor.example/api") is network.http_proxy
    assert network.proxy_for("https://lakefs.internal") is None
    assert Network().proxy_for("https://lakefs.example") is None


def test_unset_proxy_settings_read_the_environment_once_lowercase_first(tmp_path: Path) -> None:
    environ = {
        "https_proxy": "http://lower:1",
        "HTTPS_PROXY": "http://upper:2",
        "HTTP_PROXY": "http://plain:3",
        "NO_PROXY": "internal",
    }
    network = Network.from_settings(Settings(), environ)
    assert network.https_proxy is not None and network.https_proxy.host == "lower"
    assert network.http_proxy is not None and network.http_proxy.host == "plain"
    assert network.proxy_for("http://x.internal") is None
    explicit = Settings(proxy=ProxySettings(https_proxy="", no_proxy=""))
    network = Network.from_settings(explicit, environ)
    assert network.https_proxy is None, "an empty setting turns the variable's proxy off"
    assert network.proxy_for("http://x.internal") is not None


def test_a_bad_proxy_variable_is_a_network_error() -> None:
    with pytest.raises(NetworkError, match="proxy: a proxy must be an http"):
        Network.from_settings(Settings(), {"HTTPS_PROXY": "https://proxy:443"})


# -- TLS ----------------------------------------------------------------------------------------


def test_verify_off_builds_a_context_that_checks_nothing() -> None:
    context = Network(verify=False).new_ssl_context()
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_the_shared_context_is_built_once_and_others_are_fresh() -> None:
    network = Network()
    assert network.ssl_context() is network.ssl_context()
    assert network.new_ssl_context() is not network.ssl_context()
    assert network.ssl_context().verify_mode == ssl.CERT_REQUIRED


def test_a_ca_bundle_that_cannot_load_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    for path in (tmp_path / "ca.pem", tmp_path / "missing.pem"):
        settings = Settings(tls=TLSSettings(ca_bundle=path))
        with pytest.raises(NetworkError, match=r"tls\.ca_bundle: cannot load"):
            Network.from_settings(settings, {})


# -- credentials files --------------------------------------------------------------------------


def test_credentials_from_values_never_reload() -> None:
    creds = Credentials("key", "secret")
    assert creds.current() == ("key", "secret")
    assert creds.reload() is False
    assert creds.basic() == "Basic a2V5OnNlY3JldA=="


def test_credentials_files_are_reread_when_they_change(tmp_path: Path) -> None:
    key, secret = tmp_path / "key", tmp_path / "secret"
    key.write_text("k1\n")
    secret.write_text("s1\n")
    creds = Credentials(key_file=key, secret_file=secret)
    assert creds.current() == ("k1", "s1")
    version = creds.version
    fresh = tmp_path / "secret.new"
    fresh.write_text("s2-longer\n")
    fresh.replace(secret)  # a Secret volume's update: a new inode
    assert creds.current() == ("k1", "s2-longer")
    assert creds.version == version + 1
    assert creds.current() == ("k1", "s2-longer") and creds.version == version + 1


def test_credentials_keep_the_last_pair_when_a_file_vanishes(tmp_path: Path) -> None:
    key, secret = tmp_path / "key", tmp_path / "secret"
    key.write_text("k1")
    secret.write_text("s1")
    creds = Credentials(key_file=key, secret_file=secret)
    os.unlink(secret)
    assert creds.current() == ("k1", "s1")
    assert creds.reload() is False


def test_unreadable_or_empty_credentials_files_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read credentials"):
        Credentials(key_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialsError, match="is empty"):
        Credentials("k", secret_file=tmp_path / "empty")


def test_a_file_secret_is_masked_in_logs(tmp_path: Path) -> None:
    from perago_worker.observability.logging import secret_values

    (tmp_path / "secret").write_text("file-held-secret-value\n")
    settings = Settings(
        lakefs=LakeFSSettings(access_key_id="k", secret_access_key_file=tmp_path / "secret")
    )
    assert "file-held-secret-value" in secret_values(settings)


def test_a_secret_re_read_from_a_rotated_file_is_masked_in_logs(tmp_path: Path) -> None:
    from perago_worker.credentials import Credentials
    from perago_worker.observability import logging as plog

    key, secret = tmp_path / "key", tmp_path / "secret"
    key.write_text("AKIAROTATED000000001")
    secret.write_text("first-secret-value-0001")
    credentials = Credentials(key_file=key, secret_file=secret, on_new_secret=plog.add_secret)
    assert credentials.secret == "first-secret-value-0001"
    secret.write_text("second-secret-value-0002")
    assert credentials.reload()
    assert plog.mask_text("sent second-secret-value-0002 to lakeFS") == "sent ********** to lakeFS"
