# One image for the four services and the sidecar: `ensemble creator`, `ensemble sidecar --backend local ...`.
# Build: docker build -t ghcr.io/flux-framework/ensemble-operator:0.1.0 .

# Build stage: install the project and its dependencies into a virtualenv that the runtime stage copies.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ensemble
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ensemble_core ensemble_core
COPY ensemble_cli ensemble_cli
COPY services services
COPY sidecar sidecar
RUN /opt/ensemble/bin/pip install . \
    && /opt/ensemble/bin/ensemble --help > /dev/null

# Runtime stage: no compiler, no sources, a user without a login or a home.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="ensemble-operator" \
      org.opencontainers.image.description="Ensemble Operator services and sidecar" \
      org.opencontainers.image.source="https://github.com/flux-framework/ensemble-operator" \
      org.opencontainers.image.licenses="MIT"
# A numeric user, so that Kubernetes' runAsNonRoot can check it. /run/ensemble is where docker compose
# shares the generated operator secret (a named volume takes this directory's owner); /var/lib/ensemble
# is where the local sidecar's jobs run.
RUN groupadd --gid 10001 ensemble \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ensemble \
    && mkdir -p /run/ensemble /var/lib/ensemble \
    && chown 10001:10001 /run/ensemble /var/lib/ensemble
COPY --from=build /opt/ensemble /opt/ensemble
ENV PATH=/opt/ensemble/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/ensemble
USER 10001:10001
EXPOSE 8080 50051
ENTRYPOINT ["ensemble"]
CMD ["--help"]
