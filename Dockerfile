# syntax=docker/dockerfile:1
#
# mcpbox in a container. A plain `docker run` gets the `container` confinement level (uid drop,
# Landlock, seccomp, rlimits: Docker's own defaults forbid new namespaces); the CMD passes
# `--min-level container` to allow exactly that, and mcpbox says so when it starts. For the `full`
# level see docs/DEPLOY.md and the commented options in docker-compose.yaml.

# ---- build -----------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin mcpbox \
    && install -m 0755 target/release/mcpbox /usr/local/bin/mcpbox

# ---- runtime ---------------------------------------------------------------------------------
FROM debian:bookworm-slim

# The runtimes that npx/uvx servers need, from Debian: node + npm, python3 (+ pip, only to install
# uv), git (some servers clone or inspect repositories), tzdata (mcp-server-time), tini as PID 1
# (reaps whatever reparents to it and forwards signals to mcpbox).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates=2023* \
        git=1:2.39.* \
        nodejs=18.* \
        npm=9.* \
        python3=3.11.* \
        python3-pip=23.* \
        tini=0.19.* \
        tzdata=20* \
    && rm -rf /var/lib/apt/lists/*

# uv from PyPI, installed into the system python; it must use that python, never download one.
RUN pip install --no-cache-dir --break-system-packages "uv>=0.9,<1"
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON_PREFERENCE=only-system \
    TZ=UTC

COPY --from=build /usr/local/bin/mcpbox /usr/local/bin/mcpbox
COPY deploy/mcpbox.docker.json /etc/mcpbox/mcpbox.json

# mcpbox runs as root inside the container: it needs root to give every server its own
# unprivileged uid (servers never run with mcpbox's uid, nor as root). Its config and tokens stay
# readable by root only.
RUN mkdir -p /var/lib/mcpbox /etc/mcpbox/policies \
    && chmod 0700 /var/lib/mcpbox \
    && chmod 0600 /etc/mcpbox/mcpbox.json
VOLUME ["/var/lib/mcpbox"]
EXPOSE 9090

# /healthz is unauthenticated; python3 is in the image anyway. Adjust the port if the config binds
# another one.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/mcpbox"]
CMD ["serve", "--config", "/etc/mcpbox/mcpbox.json", "--min-level", "container"]
