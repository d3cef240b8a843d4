# syntax=docker/dockerfile:1
# The token-budget-operator image: `tokenbudget run` as a non-root user.
#
#   docker build -t ghcr.io/token-budget-operator/token-budget-operator:0.1.0 .
#
# For people with Docker. `make image` builds the same image without a container engine
# (image/build.py: Debian's python3 from mmdebstrap instead of python:3.11-slim, no pip in the
# venv) and is what the tests build and run (tests/e2e/test_image.py); this file itself is
# not built here. Both are described by image/image.toml: tests/unit/test_image_spec.py checks
# that the entrypoint, user, workdir, exposed ports, environment and labels below are its.
# The tag must equal the chart's appVersion (charts/token-budget-operator/Chart.yaml), which
# equals the package version in pyproject.toml.
#
# The chart runs it with readOnlyRootFilesystem, all capabilities dropped, seccomp
# RuntimeDefault and an emptyDir at /tmp (the webhook server writes its certificate files to
# a temporary directory).

# Pinned by tag. For reproducible builds pin by digest as well and let a bot (Renovate,
# Dependabot) bump it:  FROM python:3.11-slim@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11-slim` prints the current digest).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs (see .dockerignore): the build does not see tests or charts.
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="token-budget-operator" \
      org.opencontainers.image.description="Quotas for LLM tokens: budgets, warnings, reroutes, throttles and blocks." \
      org.opencontainers.image.source="https://github.com/token-budget-operator/token-budget-operator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# A numeric, non-root user (65532, "nonroot" as in distroless): Kubernetes can check
# runAsNonRoot only against a numeric USER.
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin nonroot
USER 65532:65532
WORKDIR /tmp
# 8080 /metrics, 8081 /healthz, 9443 admission webhooks (HTTPS).
EXPOSE 8080 8081 9443
ENTRYPOINT ["tokenbudget", "run"]
