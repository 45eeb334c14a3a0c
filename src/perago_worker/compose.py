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
from perago_worker.lakefs import LakeFS
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


def clients(settings: Settings) -> tuple[LakeFS, Conductor]:
    """The lakeFS and Conductor clients, each request bounded by its settings' timeout."""
    lakefs = LakeFS(
        settings.lakefs.endpoint,
        settings.lakefs.access_key_id,
        settings.lakefs.secret_access_key.get_secret_value(),
        pool_size=settings.transfer_concurrency,
        timeout=settings.lakefs.request_timeout_seconds,
        data_path=settings.lakefs.data_path,
    )
    conductor = Conductor(
        settings.conductor.url,
        auth_key=settings.conductor.auth_key,
        auth_secret=(
            settings.conductor.auth_secret.get_secret_value()
            if settings.conductor.auth_secret
            else None
        ),
        request_timeout=settings.conductor.request_timeout_seconds,
    )
    return lakefs, conductor


def load_worker(target: str) -> Worker:
    """The `Worker` named by `module:attribute`; import and registration errors as CliError."""
    try:
        return load_app(target)
    except RegistrationError as exc:
        raise CliError(str(exc)) from None
    except ImportError as exc:
        raise CliError(f"cannot import {target}: {exc}") from None
