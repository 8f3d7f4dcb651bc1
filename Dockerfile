# One image for the four services and the sidecar: `ensemble creator`, `ensemble sidecar --backend local ...`.
# Build: docker build -t ghcr.io/flux-framework/ensemble-operator:0.1.0 .

# The base image. Pin it by digest for a release build, e.g.
#   docker build --build-arg BASE=python:3.11-slim-bookworm@sha256:<digest> .
# (`docker buildx imagetools inspect python:3.11-slim-bookworm` prints the digest). The default is a tag
# because no registry was reachable where this file was last changed, so no digest could be read and checked.
ARG BASE=python:3.11-slim-bookworm

# Build stage: install the dependencies from requirements.lock, each file checked against its recorded
# sha256 (--require-hashes: a changed or substituted file fails the build), then the project itself
# without letting pip resolve anything else (--no-deps).
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/ensemble
WORKDIR /src
COPY requirements.lock ./
RUN /opt/ensemble/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY ensemble_core ensemble_core
COPY ensemble_cli ensemble_cli
COPY services services
COPY sidecar sidecar
RUN /opt/ensemble/bin/pip install --no-deps --no-build-isolation . \
    && /opt/ensemble/bin/pip check \
    && /opt/ensemble/bin/ensemble --help > /dev/null \
    && /opt/ensemble/bin/pip uninstall --yes --quiet setuptools wheel pip
# (no installer or build backend is left in what the runtime stage copies)

# Runtime stage: no compiler, no sources, a user without a login or a home.
FROM ${BASE}
LABEL org.opencontainers.image.title="ensemble-operator" \
      org.opencontainers.image.description="Ensemble Operator services and sidecar" \
      org.opencontainers.image.source="https://github.com/flux-framework/ensemble-operator" \
      org.opencontainers.image.licenses="MIT"
# A numeric user, so that Kubernetes' runAsNonRoot can check it. Under /run/ensemble docker compose mounts
# the stack's secrets, a named volume per directory (a new volume takes its directory's owner: ours, so
# that the one-shot `secrets` service can write them); /var/lib/ensemble is where the local sidecar's jobs run,
# /var/lib/ensemble/nats compose's NATS store.
RUN groupadd --gid 10001 ensemble \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ensemble \
    && mkdir -p /var/lib/ensemble/nats /run/ensemble/operator /run/ensemble/sidecar /run/ensemble/nats \
       /run/ensemble/nats-creator /run/ensemble/nats-poller /run/ensemble/nats-decider /run/ensemble/nats-actuator /run/ensemble/nats-reader \
    && chown -R 10001:10001 /run/ensemble /var/lib/ensemble
COPY --from=build /opt/ensemble /opt/ensemble
ENV PATH=/opt/ensemble/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/ensemble
USER 10001:10001
EXPOSE 8080 50051
ENTRYPOINT ["ensemble"]
CMD ["--help"]
