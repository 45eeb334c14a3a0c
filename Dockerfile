# syntax=docker/dockerfile:1
#
# perago-worker image. Default command: the demo handlers (perago_worker.devstack.demo_app).
# For your own handlers, build FROM this image and install your package (docs/operations.md,
# "Your handlers in the image"), then run `run yourpkg.handlers:app`.
#
#   docker build -t perago-worker .
#   docker run --rm -p 9464:9464 -e PERAGO_LAKEFS__ENDPOINT=... perago-worker

# -- build: a virtualenv with the project and exactly the pins of requirements.lock ----------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README.md is part of the package metadata (pyproject: readme = "README.md").
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY src ./src
RUN python -m venv /opt/perago \
    && /opt/perago/bin/pip install -c requirements.lock . \
    && /opt/perago/bin/perago-worker --version

# -- runtime ---------------------------------------------------------------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="perago-worker" \
      org.opencontainers.image.description="Conductor task worker: per-attempt lakeFS workspaces, fenced publish by merge" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, numeric non-root user: Kubernetes can verify runAsNonRoot against it.
RUN groupadd --system --gid 10001 perago \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/perago --create-home \
       --shell /usr/sbin/nologin perago \
    && mkdir -p /var/lib/perago/attempts \
    && chown -R 10001:10001 /var/lib/perago \
    && chmod 0700 /var/lib/perago/attempts

COPY --from=build /opt/perago /opt/perago

# Environment variables override the YAML file named by PERAGO_CONFIG (settings precedence):
# set scratch_root and log_format here or with env, not in a mounted config file.
ENV PATH=/opt/perago/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PERAGO_LOG_FORMAT=json \
    PERAGO_SCRATCH_ROOT=/var/lib/perago/attempts

# Attempt folders and the object cache (<scratch_root>/.cache): local disk, never shared.
VOLUME ["/var/lib/perago/attempts"]

USER 10001:10001
WORKDIR /home/perago

# /healthz, /readyz, /metrics, /status (settings.http_port, default 9464).
EXPOSE 9464

# Liveness only: /healthz fails when the worker is in state `failed`. python:slim has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4).status == 200 else 1)"]

# SIGTERM drains: no new polls, in-flight attempts get drain_grace_seconds (60), exit 0.
# Give the container more than that to stop (docker stop -t 90, stop_grace_period: 90s,
# terminationGracePeriodSeconds: 90); Docker's default of 10 s cuts the drain short.
STOPSIGNAL SIGTERM

ENTRYPOINT ["perago-worker"]
CMD ["run", "perago_worker.devstack.demo_app:app"]
