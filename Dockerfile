# syntax=docker/dockerfile:1
#
# The epicrisis image: one image for `epicrisis serve`, `epicrisis worker` and
# `epicrisis tgi-sim` (the command picks the role; the default is the gRPC server).
#
#   docker build -t epicrisis:0.1.0 .
#   docker run --rm epicrisis:0.1.0 summarize --sample --format text
#
# Base image: pinned by tag. For a reproducible build, pin the digest too, as resolved
# on the day of the release (it is not written here because it cannot be checked from
# this project's CI):
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm --format '{{json .Manifest.Digest}}'
# then append `@sha256:<digest>` to the tag in both FROM lines (keep them identical: the
# runtime stage runs the builder's virtualenv, whose interpreter is the base's).

# ---- builder: a virtualenv with the dependencies, then the project ---------------------
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The dependency layer: only pyproject.toml, so that editing the sources does not
# reinstall the dependencies. Their list is read from [project].dependencies.
COPY pyproject.toml ./
RUN python -m venv /opt/venv \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# The project itself, without touching the dependencies installed above.
COPY README.md ./
COPY services ./services
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- runtime: the virtualenv on a slim base, no compilers, no pip, a numeric non-root user
FROM python:3.11.13-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="epicrisis" \
      org.opencontainers.image.description="Discharge summaries from FHIR R4 Bundles (gRPC server, Celery worker, TGI simulator)" \
      org.opencontainers.image.licenses="Apache-2.0"

# HOME=/tmp: the root file system is read-only in Kubernetes; /tmp is the one writable
# place (an emptyDir), for any library that keeps a cache under $HOME.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EPICRISIS_GRPC_HOST=0.0.0.0 \
    EPICRISIS_GRPC_PORT=50051 \
    EPICRISIS_METRICS_HOST=0.0.0.0 \
    EPICRISIS_METRICS_PORT=9464 \
    EPICRISIS_LOG_FORMAT=json

RUN groupadd --system --gid 10001 epicrisis \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin epicrisis

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /tmp

# 50051: gRPC (epicrisis serve), TLS and API keys; 50052: the gRPC health status alone, in
# plaintext, when EPICRISIS_HEALTH_PORT=50052 (as docker-compose.yml and deploy/k8s set it,
# for their health checks); 9464: Prometheus /metrics (serve and worker).
EXPOSE 50051 50052 9464

# No HEALTHCHECK here: the image runs three different roles. docker-compose.yml and the
# Kubernetes manifests give each role its own check (gRPC health for the server).
ENTRYPOINT ["epicrisis"]
CMD ["serve"]
