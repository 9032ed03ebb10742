# Production image: `gateway serve` as a non-root user (uid and gid 10001).
#
#   docker build -t media-gateway .                        # on the official Python image
#   docker build --build-arg BASE=python:3.11-slim-bookworm@sha256:… -t media-gateway .   # pinned
#   docker build --build-arg LOCK=requirements-parquet.lock -t media-gateway:parquet .     # + Parquet task files
#
# BASE is any Debian-like image with python3 (3.11+, with its venv module), groupadd and useradd;
# CI builds on a debootstrapped Debian (tests/container/). Dependencies come from a lock file
# with hashes (`make lock`), so a build installs exactly what was tested.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG LOCK=requirements.lock
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/gateway
# Dependencies first: a source change does not reinstall them.
COPY ${LOCK} /tmp/requirements.txt
RUN /opt/gateway/bin/pip install --require-hashes --no-deps -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
RUN /opt/gateway/bin/pip install --no-deps --no-build-isolation --no-compile /src \
 && /opt/gateway/bin/pip uninstall --yes pip setuptools wheel \
 && /opt/gateway/bin/python3 -m compileall -q /opt/gateway/lib

FROM ${BASE}
RUN groupadd --gid 10001 gateway \
 && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /var/lib/gateway --create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway
# The config file is the operator's (mount it at /etc/gateway/gateway.toml, with `host = "0.0.0.0"`
# in [server]); no environment default here overrides it.
ENV PATH=/opt/gateway/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 GATEWAY_CONFIG=/etc/gateway/gateway.toml
USER 10001:10001
WORKDIR /var/lib/gateway
# The SQLite registry (`sqlite:////var/lib/gateway/registry.db`); unused with PostgreSQL.
VOLUME /var/lib/gateway
EXPOSE 8080
# Reads host and port from the same config and environment as `gateway serve`. Kept only in the
# Docker image format (`podman build --format docker`); Kubernetes uses its own probes instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["gateway", "health"]
# Exec form: SIGTERM reaches the gateway, which lets running streams finish (shutdown_timeout).
ENTRYPOINT ["gateway"]
CMD ["serve"]
