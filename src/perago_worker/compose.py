"""The composition root: settings, server clients and the handler app, built one way.

Every command (`run`, `check`, `register`, `gc`) and the `--processes N` supervisor build
what they need here, so a supervised child, a single worker and a one-off `gc` are wired
from the same settings the same way. Failures a user can fix are `CliError`: one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import os

from pydantic import ValidationError

from perago_worker.app import RegistrationError, Worker, load_app
from perago_worker.conductor import Conductor
from perago_worker.credentials import Credentials, CredentialsError
from perago_worker.lakefs import LakeFS
from perago_worker.network import Network, NetworkError
from perago_worker.observability import logging as plog
from perago_worker.settings import Settings


class CliError(Exception):
    """A user-facing failure: printed as one line."""


def load_settings(config: str | None) -> Settings:
    """The effective settings; `config` names the YAML file (as `PERAGO_CONFIG` does)."""
    if config:
        os.environ["PERAGO_CONFIG"] = config
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise CliError(f"invalid settings: {problems}") from None
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None


def network(settings: Settings) -> Network:
    """The TLS policy and proxies of every client (`tls.*`, `proxy.*`, the proxy variables)."""
    try:
        return Network.from_settings(settings)
    except NetworkError as exc:
        raise CliError(str(exc)) from None


def credentials(settings: Settings) -> tuple[Credentials, Credentials | None]:
    """lakeFS's key pair and Conductor's (None: no authentication), values or files."""
    lake, cond = settings.lakefs, settings.conductor
    try:
        lakefs_pair = Credentials(
            lake.access_key_id,
            lake.secret_access_key.get_secret_value(),
            key_file=lake.access_key_id_file,
            secret_file=lake.secret_access_key_file,
            on_new_secret=plog.add_secret,  # a rotated secret is masked in logs too
        )
        secret = cond.auth_secret.get_secret_value() if cond.auth_secret else ""
        conductor_pair = (
            Credentials(
                cond.auth_key or "",
                secret,
                key_file=cond.auth_key_file,
                secret_file=cond.auth_secret_file,
                on_new_secret=plog.add_secret,
            )
            if (cond.auth_key or cond.auth_key_file) and (secret or cond.auth_secret_file)
            else None
        )
    except CredentialsError as exc:
        raise CliError(str(exc)) from None
    return lakefs_pair, conductor_pair


def clients(settings: Settings) -> tuple[LakeFS, Conductor]:
    """The lakeFS and Conductor clients, each request bounded by its settings' timeout, all
    three HTTP stacks (the lakeFS SDK, the data plane, Conductor) on one TLS policy and
    proxy configuration, credentials re-read from their files when they change."""
    net = network(settings)
    lakefs_pair, conductor_pair = credentials(settings)
    lakefs = LakeFS(
        settings.lakefs.endpoint,
        "",
        "",
        pool_size=settings.transfer_concurrency,
        timeout=settings.lakefs.request_timeout_seconds,
        data_path=settings.lakefs.data_path,
        network=net,
        credentials=lakefs_pair,
    )
    conductor = Conductor(
        settings.conductor.url,
        credentials=conductor_pair,
        request_timeout=settings.conductor.request_timeout_seconds,
        network=net,
    )
    return lakefs, conductor


def setup_tracing(settings: Settings) -> bool:
    """OpenTelemetry spans to `tracing.otlp_endpoint` (`observability.tracing`); False when
    unset. Set but without the `tracing` extra installed is a CliError naming the extra."""
    from perago_worker.observability import tracing

    try:
        return tracing.setup(settings)
    except tracing.TracingUnavailable as exc:
        raise CliError(str(exc)) from None


def load_worker(target: str) -> Worker:
    """The `Worker` named by `module:attribute`; import and registration errors as CliError."""
    try:
        return load_app(target)
    except RegistrationError as exc:
        raise CliError(str(exc)) from None
    except ImportError as exc:
        raise CliError(f"cannot import {target}: {exc}") from None
