# asin-broker: `broker serve`, the spool daemon, as a container image.
#
#   docker build -t asin-broker .
#   docker run -d -v asinb-spool:/var/spool/asin-broker -v asinb-state:/var/lib/asin-broker \
#       -v ./config.toml:/etc/asin-broker/config.toml:ro asin-broker
#
# The build needs only the base image and the package registries (PyPI for uv and the
# locked dependencies); no `# syntax=` line, so BuildKit fetches no frontend image from
# Docker Hub either. No secret enters the image: keys' secrets come at run time from
# environment variables or secret files that the config names.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: resolve the locked dependencies and the project into a venv -------------------
FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/asin-broker \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src
# Dependencies first, so a source change does not re-resolve them.
COPY pyproject.toml uv.lock README.md LICENSE ./
RUN /opt/uv/bin/uv sync --frozen --no-dev --extra redis --no-install-project
COPY broker ./broker
RUN /opt/uv/bin/uv sync --frozen --no-dev --extra redis --no-editable

# ---- runtime: the venv, a config and an unprivileged user --------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 asinb \
    && useradd --system --uid 10001 --gid asinb --no-create-home \
        --home-dir /var/lib/asin-broker --shell /usr/sbin/nologin asinb \
    && mkdir -p /var/spool/asin-broker /var/lib/asin-broker /etc/asin-broker \
    && chown asinb:asinb /var/spool/asin-broker /var/lib/asin-broker \
    && chmod 0700 /var/lib/asin-broker
COPY --from=build /opt/asin-broker /opt/asin-broker
# The package's starter config (`asin-broker init`'s): the embedded simulator's demo key, no
# secret. Not ./config.toml, which an operator may have edited for real keys. Mount your own.
COPY --from=build /src/broker/templates/config.toml /etc/asin-broker/config.toml
ENV PATH=/opt/asin-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_STATE_HOME=/var/lib \
    ASINB_CONFIG=/etc/asin-broker/config.toml
WORKDIR /etc/asin-broker
USER asinb:asinb
VOLUME ["/var/spool/asin-broker", "/var/lib/asin-broker"]
EXPOSE 9464
# The first SIGTERM stops claiming jobs and lets the current one commit its rows; give
# `docker stop` a grace period of 30 s (docker stop -t 30; compose stop_grace_period).
STOPSIGNAL SIGTERM
# Polls the default port: a CMD with another --port needs its own HEALTHCHECK.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9464/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["asin-broker"]
# /metrics has no authentication: it listens on every interface of the container only so
# that Prometheus can scrape it over the container network. Do not publish port 9464.
CMD ["serve", "--config", "/etc/asin-broker/config.toml", "--spool", "/var/spool/asin-broker", \
     "--host", "0.0.0.0", "--allow-remote", "--port", "9464"]
