# syntax=docker/dockerfile:1
# ftp-gateway's container image: `docker build -t ftp-gateway .` then
#   docker run -p 2121:2121 -p 30000-30099:30000-30099 -p 9090:9090 ftp-gateway
# tests/test_container.py runs this file's install steps (docker/install.sh) in a venv and starts its
# ENTRYPOINT + CMD from there; keep the install in that script.

# -- builder: compilers and the install; nothing of it but /opt/venv reaches the image ---------------
FROM python:3.12-slim AS builder
# A C compiler for the few dependencies (argon2-cffi, asyncpg, uvloop) on a platform without their wheels.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY pathio_backends /src/pathio_backends
COPY docker/install.sh /usr/local/bin/install-ftp-gateway
RUN install-ftp-gateway /opt/venv /src

# -- the image: the slim base, the venv, a non-root user ---------------------------------------------
FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FTP_GATEWAY_CONFIG=/etc/ftp-gateway/config.toml
# A fixed UID and GID, so a Kubernetes securityContext (runAsUser, fsGroup) and volume owners can name it.
RUN groupadd --system --gid 10001 ftp-gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin ftp-gateway \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
COPY docker/config.toml /etc/ftp-gateway/config.toml
# The user database and the files of the built-in defaults go here (see docker/config.toml).
WORKDIR /data
USER 10001:10001
# Control connection, admin endpoint (/healthz, /readyz, /metrics), passive data ports.
EXPOSE 2121 9090 30000-30099
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
ENTRYPOINT ["ftp-gateway"]
CMD ["serve"]
